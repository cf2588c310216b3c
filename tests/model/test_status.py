"""The service health rule (model/status.py), as rows: instances in, health out."""

import pytest

from deployfs.model.rollout import Phase
from deployfs.model.status import Member, health

V1, V2 = ("v1", 0), ("v2", 0)


def m(slot: int, phase: Phase, key=V1, leaving=False) -> Member:
    return Member(key, slot, phase, leaving=leaving)


@pytest.mark.parametrize("insts, want", [
    ([m(0, Phase.READY), m(1, Phase.READY)], "healthy"),
    ([m(0, Phase.READY)], "degraded"),  # below replicas
    ([m(0, Phase.READY), m(1, Phase.READY), m(2, Phase.UNHEALTHY, V2)], "degraded"),  # trouble still held
    # the failed release's instance being stopped: out of routing, not the service's trouble
    ([m(0, Phase.READY), m(1, Phase.READY), m(2, Phase.UNHEALTHY, V2, leaving=True)], "healthy"),
    ([m(0, Phase.READY), m(1, Phase.READY), m(2, Phase.FAILED)], "degraded"),  # given up: still counts
    ([m(0, Phase.READY, leaving=True), m(1, Phase.STARTING)], "unhealthy"),
])
def test_health(insts, want):
    assert health(False, 2, insts) == want


def test_stopped():
    assert health(True, 2, [m(0, Phase.READY)]) == "stopped"
    assert health(False, 0, []) == "stopped"
