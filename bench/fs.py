"""FUSE cost of a state file: deployfs vs a bare pyfuse3 filesystem, same run.

Reports median open+read+close and stat of `version`, their ratios, and the
FUSE requests one `cat` makes (counted from --debug logging).  Target: <= 1.5x.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

from common import ROOT, machine, mount, timed, wait_for

N = 3000


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="bench-fs-")
    bare_mnt = os.path.join(tmp, "bare")
    os.makedirs(bare_mnt)
    bare = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "barefs.py"), bare_mnt])
    wait_for(lambda: os.path.exists(os.path.join(bare_mnt, "version")), what="bare mount")
    m = mount.start(tmp)
    try:
        m.write_manifest("web", "image sleep\nargs 3600\nreplicas 1\nhealth_interval 1\n")
        m.ctl("apply web")
        m.sh("cat active/web/wait", timeout=30)
        ours = m.p("active", "web", "version")
        theirs = os.path.join(bare_mnt, "version")
        for _ in range(2):  # warm both, then measure interleaved
            timed(ours, 200, "read"), timed(theirs, 200, "read")
        rows = []
        for kind in ("read", "stat"):
            b, d = timed(theirs, N, kind), timed(ours, N, kind)
            rows.append((kind, b, d))
    finally:
        mount.stop(m)
        bare.send_signal(signal.SIGTERM)
        bare.wait(timeout=20)
    # FUSE requests per `cat`: run one with --debug and count the lines it logs
    dbg = mount.start(tempfile.mkdtemp(prefix="bench-fs-dbg-"), "--debug")
    try:
        dbg.write_manifest("web", "image sleep\nargs 3600\nreplicas 1\nhealth_interval 1\n")
        dbg.ctl("apply web")
        dbg.sh("cat active/web/wait", timeout=30)
        time.sleep(0.5)
        before = dbg.server_log().count("fuse ")
        subprocess.run(["cat", dbg.p("active/web/version")], capture_output=True, timeout=10)
        time.sleep(0.3)
        per_cat = dbg.server_log().count("fuse ") - before
    finally:
        mount.stop(dbg)
    print(f"bench/fs.py on {machine()}")
    print(f"{'operation':<22}{'bare pyfuse3':>14}{'deployfs':>12}{'ratio':>8}")
    for kind, b, d in rows:
        name = "open+read+close" if kind == "read" else "stat"
        print(f"{name:<22}{b:>11.0f} µs{d:>9.0f} µs{d / b:>7.2f}x")
    print(f"FUSE requests per `cat active/web/version`: {per_cat}")


if __name__ == "__main__":
    main()
