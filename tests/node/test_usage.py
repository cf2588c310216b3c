"""Each instance's CPU and memory: one pass over /proc, summed per session, cached."""

import os
import subprocess
import time

from deployfs.node.usage import Usage, scan

# A session of two: the leader waits on a busy child (a shell wrapper running a program).
BUSY = "python3 -c 'import time\nt=time.time()\nwhile time.time()-t<30: pass' & wait"


def test_a_session_is_summed_and_cached():
    p = subprocess.Popen(["sh", "-c", BUSY], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while (c := scan().get(p.pid)) is None or c.processes < 2 or c.cpu < 0.05:
            assert time.monotonic() < deadline, c
            time.sleep(0.02)
        assert c.rss > 1_000_000  # python's, not only the shell's
        u = Usage(max_age=60)
        first = u.of(p.pid)
        assert first is not None and first.processes == 2
        assert u.of(p.pid) is first and u.passes == 1  # within max_age: no second pass
        assert u.of(os.getpid() + 10_000_000) is None and u.of(None) is None
    finally:
        os.killpg(p.pid, 9)
        p.wait()


def test_an_instance_younger_than_the_last_pass_counts_its_leader_until_the_next():
    u = Usage(max_age=60)
    u.costs()
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        c = u.of(p.pid)
        # (not rss > 0: a process just exec'd can show 0 until its per-thread counters are folded in)
        assert c is not None and c.processes == 1 and u.passes == 1, (c, u.passes)
        assert u.of(p.pid) is c
    finally:
        p.kill()
        p.wait()
