"""The probe-verdict rule, one row per transition (the engine and the node agent both follow it)."""

from dataclasses import dataclass

import pytest

from deployfs.model.manifest import parse
from deployfs.model.probing import next_probe, observe
from deployfs.model.rollout import Phase

M = parse("image /bin/x\nhealth_retries 2\nmin_healthy 1\nupdate_deadline 5\nhealth_interval 2\n", name="web").manifest


@dataclass
class S:
    phase: Phase = Phase.STARTING
    why: str = ""
    started_at: float = 0.0
    healthy_since: float | None = None
    first_bad: float | None = None
    fails: int = 0
    probes: int = 0


@pytest.mark.parametrize("state, health, ok, now, want_health, want_phase, said", [
    # first good probe: healthy, soaking (min_healthy 1)
    (S(), "starting", True, 0.5, "healthy", Phase.STARTING, ["healthy"]),
    # soaked: ready
    (S(healthy_since=0.5), "healthy", True, 1.5, "healthy", Phase.READY, []),
    # refused while starting, within update_deadline: not a failure yet
    (S(), "starting", False, 4.0, "starting", Phase.STARTING, []),
    # past update_deadline while starting: unhealthy
    (S(), "starting", False, 5.5, "unhealthy", Phase.UNHEALTHY,
     ["unhealthy: not healthy within update_deadline 5s: d"]),
    # a failure during the soak restarts it
    (S(healthy_since=0.5), "healthy", False, 1.0, "starting", Phase.STARTING, []),
    # ready, one failure of two allowed: still ready
    (S(phase=Phase.READY, healthy_since=0.0), "healthy", False, 9.0, "healthy", Phase.READY, []),
    # ready, the second failure in a row: unhealthy
    (S(phase=Phase.READY, healthy_since=0.0, fails=1, first_bad=8.0), "healthy", False, 9.0, "unhealthy",
     Phase.UNHEALTHY, ["unhealthy: d (2 checks failed)"]),
])
def test_observe(state, health, ok, now, want_health, want_phase, said):
    got_health, got_said = observe(state, health, M, ok, "d", now)
    assert (got_health, state.phase, got_said) == (want_health, want_phase, said)


def test_a_good_probe_ends_the_failing_streak():
    s = S(phase=Phase.READY, healthy_since=0.0, fails=1, first_bad=8.0)
    observe(s, "healthy", M, True, "ok", 9.0)
    assert (s.fails, s.first_bad, s.phase) == (0, None, Phase.READY)


def test_a_starting_instance_is_probed_on_a_growing_cadence_then_every_interval():
    s = S()
    periods = [next_probe(s, M, 0.0)[1] for _ in range(7)]
    assert periods == [0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5]
    s.phase = Phase.READY
    assert next_probe(s, M, 10.0) == (12.0, 2.0)
    # soaking: the next probe comes no later than the end of the soak
    s = S(healthy_since=0.0, probes=20)
    assert next_probe(s, M, 0.9)[0] == 1.0
