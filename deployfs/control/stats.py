"""What the engine counts per service for the metrics (docs/operations.md).

Plain numbers, kept by the engine as things happen; the view turns them into
Prometheus families at scrape time.  They live as long as the server process
(a restarted server starts from zero, which Prometheus reads as a counter
reset); everything that must survive a restart is in the store instead.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Few buckets: each is a line per service in every scrape (bench/supervise.py: 200 services).
# Probes: a good check answers in milliseconds; health_timeout defaults to 5 s.
PROBE_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
# Rollouts: seconds for a small service, tens of minutes with pauses and soaks.
ROLLOUT_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bound, not cumulative; one more for +Inf
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs as Prometheus wants them, ending with +Inf."""
        out, total = [], 0
        for le, n in zip([*map(str, self.bounds), "+Inf"], self.counts):
            total += n
            out.append((le, total))
        return out


@dataclass
class ServiceStats:
    rollouts_started: int = 0
    rollouts_completed: int = 0
    rollouts_failed: int = 0
    rollout_seconds: Histogram = field(default_factory=lambda: Histogram(ROLLOUT_BUCKETS))  # completed ones
    restarts: int = 0
    probe_failures: int = 0
    probe_seconds: Histogram = field(default_factory=lambda: Histogram(PROBE_BUCKETS))  # every probe
