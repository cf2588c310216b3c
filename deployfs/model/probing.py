"""Probe verdicts into health and phase: the rule the engine and the node agent both follow.

Pure (times are passed in): whoever probes an instance -- the engine in-process
today, the node agent (node/agent.py) on the instance's node -- keeps a
:class:`Probed` per instance and hands each verdict to :func:`observe`; when
to probe next is :func:`next_probe`.
"""

from __future__ import annotations

from typing import Protocol

from .manifest import Manifest, format_seconds
from .rollout import Phase

START_PROBE_FIRST = 0.02  # seconds from a starting instance's first probe to its second; doubles after each
START_PROBE_CAP = 0.5  # a starting instance is probed at least this often (or every health_interval if shorter)


class Probed(Protocol):
    """What the rule keeps per instance between verdicts."""
    phase: Phase
    why: str
    started_at: float  # when its process started
    healthy_since: float | None
    first_bad: float | None  # start of the current failing streak
    fails: int
    probes: int  # since it started: a starting instance is probed on a growing cadence


def observe(s: Probed, health: str, m: Manifest, ok: bool, detail: str, now: float) -> tuple[str, list[str]]:
    """Apply one verdict to ``s``; the new health (starting | healthy | unhealthy) and what to say
    of the instance (events, each to follow "instance N ")."""
    said = []
    if ok:
        s.fails, s.first_bad = 0, None
        if health != "healthy":
            health, s.healthy_since = "healthy", now
            said.append("healthy")
        if s.phase is not Phase.READY and now - (s.healthy_since or now) >= m.min_healthy:
            s.phase, s.why = Phase.READY, ""
    else:
        s.fails += 1
        if health == "healthy":  # refusals while starting up are not failures yet
            s.first_bad = s.first_bad or now
        if health == "healthy" and s.fails >= m.health_retries:
            health, s.phase, s.why = "unhealthy", Phase.UNHEALTHY, f"{detail} ({s.fails} checks failed)"
            said.append(f"unhealthy: {s.why}")
        elif health == "starting" and now - s.started_at > m.update_deadline:
            s.first_bad = s.started_at + m.update_deadline
            why = f"not healthy within update_deadline {format_seconds(m.update_deadline)}s: {detail}"
            health, s.phase, s.why = "unhealthy", Phase.UNHEALTHY, why
            said.append(f"unhealthy: {why}")
        elif health == "healthy" and s.phase is Phase.STARTING:
            s.healthy_since = None  # a failure during the soak restarts the soak
            health = "starting"
    return health, said


def next_probe(s: Probed, m: Manifest, probed_at: float) -> tuple[float, float]:
    """(when to probe next, the period it was worked out from) after a probe that began at ``probed_at``."""
    period = m.health_interval
    if s.phase is Phase.STARTING:
        # A starting instance is probed often at first, when it is most likely to have
        # just come up, then less often: each batch of a rollout waits on this.
        period = min(period, START_PROBE_CAP, START_PROBE_FIRST * 2 ** min(s.probes, 20))
        s.probes += 1
    wake = probed_at + period
    if s.healthy_since is not None and s.phase is Phase.STARTING:
        wake = min(wake, s.healthy_since + m.min_healthy)
    return wake, period
