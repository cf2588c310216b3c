"""Shared by the benchmarks: start things, measure in child processes, print ratios."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import mount  # noqa: E402,F401  (re-exported: the same real-mount helpers the tests use)

TIMER = r"""
import os, sys, time, json
path, n, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = []
for _ in range(n):
    t = time.perf_counter_ns()
    if kind == "read":
        fd = os.open(path, os.O_RDONLY); os.read(fd, 4096); os.close(fd)
    else:
        os.stat(path)
    out.append(time.perf_counter_ns() - t)
print(json.dumps(out))
"""


def timed(path: str, n: int, kind: str) -> float:
    """Median µs of an operation on ``path``, measured in a child process."""
    r = subprocess.run([sys.executable, "-c", TIMER, path, str(n), kind], capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise SystemExit(r.stderr)
    return statistics.median(json.loads(r.stdout)) / 1000


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def wait_for(pred, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)
