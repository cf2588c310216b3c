"""A state file over 9P vs over FUSE vs a bare pyfuse3 file, same run.

Median µs of one open+read+close of `active/web/version`: over the FUSE mount
(open/read/close syscalls), over 9P2000.L on TCP loopback (Twalk, Tlopen,
Tread, Tclunk on one connection, as a mounted client does after its attach),
and of the one static file of a bare pyfuse3 filesystem.  Each is measured in
a child process, interleaved.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile

from common import ROOT, machine, mount, timed, wait_for

N = 3000
PORT = 20290  # the ninep range (20200-20299): the tests never use it

NINEP_TIMER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from deployfs.serve.ninep import codec as c
from tests.serve.ninep.client import Client
port, n = int(sys.argv[2]), int(sys.argv[3])
cl = Client(("127.0.0.1", port))
names = ("active", "web", "version")
out = []
for _ in range(n):
    t = time.perf_counter_ns()
    cl.rpc(c.Twalk(0, 1, names)); cl.rpc(c.Tlopen(1, os.O_RDONLY)); cl.rpc(c.Tread(1, 0, 4096)); cl.rpc(c.Tclunk(1))
    out.append(time.perf_counter_ns() - t)
print(json.dumps(out))
"""


def ninep_timed(n: int) -> float:
    r = subprocess.run([sys.executable, "-c", NINEP_TIMER, ROOT, str(PORT), str(n)], capture_output=True, text=True,
                       timeout=300)
    if r.returncode:
        raise SystemExit(r.stderr)
    return statistics.median(json.loads(r.stdout)) / 1000


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="bench-ninep-")
    bare_mnt = os.path.join(tmp, "bare")
    os.makedirs(bare_mnt)
    bare = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "barefs.py"), bare_mnt])
    wait_for(lambda: os.path.exists(os.path.join(bare_mnt, "version")), what="bare mount")
    m = mount.start(tmp, "--9p", f"tcp!127.0.0.1!{PORT}")
    try:
        m.write_manifest("web", "image sleep\nargs 3600\nreplicas 1\nhealth_interval 1\n")
        m.ctl("apply web")
        m.sh("cat active/web/wait", timeout=30)
        ours, theirs = m.p("active", "web", "version"), os.path.join(bare_mnt, "version")
        for _ in range(2):  # warm all three, then measure interleaved
            timed(ours, 200, "read"), timed(theirs, 200, "read"), ninep_timed(200)
        bare_us, fuse_us, ninep_us = timed(theirs, N, "read"), timed(ours, N, "read"), ninep_timed(N)
    finally:
        mount.stop(m)
        bare.send_signal(signal.SIGTERM)
        bare.wait(timeout=20)
    print(f"bench/ninep.py on {machine()}")
    print(f"{'open+read+close of version':<34}{'median':>10}{'vs bare':>10}{'vs FUSE':>10}")
    for name, us in (("bare pyfuse3 file", bare_us), ("deployfs over FUSE", fuse_us),
                     ("deployfs over 9P (TCP loopback)", ninep_us)):
        print(f"{name:<34}{us:>7.0f} µs{us / bare_us:>9.2f}x{us / fuse_us:>9.2f}x")


if __name__ == "__main__":
    main()
