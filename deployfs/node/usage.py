"""What each instance costs: CPU seconds and resident memory, from /proc.

An instance is its own session (the runtime starts each one with setsid), so
its cost is the sum over the processes of that session: a shell wrapper and
the program it runs count together.  This kernel has no
``/proc/PID/task/TID/children``, so finding a session's members means one
look at every process: one pass over ``/proc/*/stat`` serves every instance
at once, and its result is kept for ``max_age`` seconds.  However often
``instances/N`` or the metrics are read, the cost is at most one pass per
``max_age`` (bench/supervise.py measures it with 1,000 instances).

Not counted: a process that left the session (``setsid`` again), and the
CPU time of a child reaped by someone outside the session (an orphan that
init reaps): its time leaves with it, so ``cpu`` can step back a little.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MAX_AGE = 5.0  # seconds a pass over /proc is reused


@dataclass(frozen=True)
class Cost:
    cpu: float  # seconds, user + system, of the live members and the children they reaped
    rss: int  # bytes, summed over the live members (shared pages count once per member)
    processes: int


def _stat(path: str) -> tuple[int, int, int] | None:
    """(session id, CPU ticks with reaped children, RSS pages) from a /proc/PID/stat, None if gone."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold anything: split after the last one.
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return (int(fields[3]), int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]),
                int(fields[21]))
    except (IndexError, ValueError):
        return None


def scan(proc: str = "/proc") -> dict[int, Cost]:
    """One pass over every process: cost per session id."""
    ticks: dict[int, int] = {}
    pages: dict[int, int] = {}
    count: dict[int, int] = {}
    with os.scandir(proc) as it:
        for entry in it:
            if not entry.name.isdigit() or (st := _stat(f"{proc}/{entry.name}/stat")) is None:
                continue
            sid, t, rss = st
            ticks[sid] = ticks.get(sid, 0) + t
            pages[sid] = pages.get(sid, 0) + rss
            count[sid] = count.get(sid, 0) + 1
    return {sid: Cost(ticks[sid] / HZ, pages[sid] * PAGE, count[sid]) for sid in ticks}


def leader(pid: int, proc: str = "/proc") -> Cost | None:
    """The cost of one session leader alone (its members are found by the next pass)."""
    st = _stat(f"{proc}/{pid}/stat")
    return None if st is None or st[0] != pid else Cost(st[1] / HZ, st[2] * PAGE, 1)


class Usage:
    """Costs per session, from a pass over /proc at most every ``max_age`` seconds.

    Safe to call from any thread (the FUSE loop and the metrics HTTP server both do).
    """

    def __init__(self, max_age: float = MAX_AGE, proc: str = "/proc") -> None:
        self.max_age, self.proc = max_age, proc
        self.passes = 0
        self._costs: dict[int, Cost] = {}
        self._at = -float("inf")
        self._lock = threading.Lock()

    def costs(self) -> dict[int, Cost]:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.max_age:
                self._costs, self._at = scan(self.proc), now
                self.passes += 1
            return self._costs

    def of(self, pid: int | None) -> Cost | None:
        """The cost of the instance whose leader is ``pid`` (its session), None if not running.

        An instance younger than the last pass is not in it: until the next pass it
        counts its leader alone (one read, kept with the pass so it is read once).
        """
        if not pid:
            return None
        cost = self.costs().get(pid)
        if cost is None and (cost := leader(pid, self.proc)) is not None:
            with self._lock:
                self._costs.setdefault(pid, cost)
        return cost
