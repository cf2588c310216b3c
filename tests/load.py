"""Real load with wrk (keep-alive HTTP/1.1), stopped on demand, counts parsed."""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass


@dataclass
class Result:
    requests: int
    socket_errors: int
    non_2xx: int
    rps: float
    output: str

    @property
    def failed(self) -> int:
        return self.socket_errors + self.non_2xx

    def __str__(self) -> str:
        return f"{self.requests} requests, {self.failed} failed ({self.rps:.0f} req/s)"


class Load:
    def __init__(self, url: str, connections: int = 8, threads: int = 2, max_seconds: int = 120) -> None:
        self.proc = subprocess.Popen(["wrk", f"-t{threads}", f"-c{connections}", f"-d{max_seconds}s", url],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> Result:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=30)
        return parse(out)


def parse(out: str) -> Result:
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise AssertionError(f"wrk printed no totals:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return Result(int(m.group(1)), sum(map(int, errors.groups())) if errors else 0,
                  int(non2xx.group(1)) if non2xx else 0, float(rps.group(1)) if rps else 0.0, out)


def probe(url: str) -> bool:
    """One GET answered with 2xx (a fresh connection): the port serves."""
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return 200 <= r.status < 300
    except OSError:
        return False

