"""A Prometheus-style histogram: counts per bucket and a sum, kept by whoever observes.

Below control and node both: the controller counts rollouts in one, the node agent its
probes, and the metrics render either.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


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
