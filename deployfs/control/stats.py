"""What the engine counts per service for the metrics (docs/operations.md).

Plain numbers, kept by the engine as things happen; the view turns them into
Prometheus families at scrape time.  They live as long as the server process
(a restarted server starts from zero, which Prometheus reads as a counter
reset); everything that must survive a restart is in the store instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.histogram import Histogram

# Few buckets: each is a line per service in every scrape (bench/supervise.py: 200 services).
# Rollouts: seconds for a small service, tens of minutes with pauses and soaks.
ROLLOUT_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass
class ServiceStats:
    rollouts_started: int = 0
    rollouts_completed: int = 0
    rollouts_failed: int = 0
    rollout_seconds: Histogram = field(default_factory=lambda: Histogram(ROLLOUT_BUCKETS))  # completed ones
    restarts: int = 0  # (probes are the node agent's to count: node/agent.py ProbeStats)
