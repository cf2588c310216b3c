"""Cleans up after a test cluster whose test process died without its teardown (killed by a
timeout, SIGKILL): the harness starts this beside the nodes with a pipe on its stdin; when the
pipe closes, whether the harness closed it or died, every process deployfs started for the
nodes' state dirs (instances, routers: found by their marker) is killed and every mount left
is lazily unmounted.  The servers themselves die with the test process (PR_SET_PDEATHSIG).

Usage: python -m tests.cluster.reaper STATE_DIR:MOUNTPOINT ...
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time


def main(pairs: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the tests is not for us
    sys.stdin.buffer.read()  # until EOF: the harness closed the pipe, or it died
    from tests.mount import in_mount_table, reap
    time.sleep(0.2)  # the servers are dying of their parent's death: let them go first
    for _ in range(2):  # twice: a server killed mid-start may have forked once more
        for pair in pairs:
            state, mnt = pair.rsplit(":", 1)
            reap(state)
            if in_mount_table(mnt):
                subprocess.run(["fusermount3", "-u", "-z", mnt], check=False, capture_output=True)
        time.sleep(0.2)


if __name__ == "__main__":
    main(sys.argv[1:])
