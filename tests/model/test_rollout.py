"""rollout.plan() as a table: the instances as they are, and the one next step the rules give.

The property test (tests/control/test_properties.py) drives whole random histories; this table
pins each rule of the reconcile step on its own, so a change to one shows which rule moved.
"""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployfs.model.rollout import (Complete, Fail, GiveUp, Inst, Phase, Promote, Restart, Start, State, Stop, Target, plan,
                                    split_weights)

V1, V2 = ("v1", 0), ("v2", 0)
ROLLING, MID_BATCH = State("rolling", 0, float("-inf")), State("rolling", 0, None)
CANARY = State("canary", 0, float("-inf"))
RESTARTED = State("rolling", 0, 0.0, restoring=True)  # a server started again mid-rollout


def i(ident: int, key: tuple[str, int], phase: str, **kw: object) -> Inst:
    return Inst(ident, ident, key, Phase[phase.upper()], **kw)  # slot = id: enough for these rows


OLD3 = [i(0, V1, "ready"), i(1, V1, "ready"), i(2, V1, "ready")]
T = Target(V2, 3)
C = Target(V2, 3, strategy="canary", canary=1)

TABLE = [
    # (what, target, instances, state, routed, actions, status after)
    ("a rollout starts its first batch on a new slot", T, OLD3, ROLLING, True, [Start(3)], "rolling"),
    ("a batch still starting: wait", T, OLD3 + [i(3, V2, "starting")], MID_BATCH, True, [], "rolling"),
    ("the batch is ready: one old instance retires", T, OLD3 + [i(3, V2, "ready")], MID_BATCH, True,
     [Stop(0, "replaced")], "rolling"),
    ("a new instance exits: stop it, fail, old ones untouched", T,
     OLD3 + [i(3, V2, "exited", why="exited with status 1")], MID_BATCH, True,
     [Stop(3, "rollout failed"), Fail("instance 3 (v2) exited with status 1")], "failed"),
    ("only ready target instances: complete, renumbered 0..n-1", T,
     [i(3, V2, "ready"), i(4, V2, "ready"), i(5, V2, "ready")], State("rolling", 0, 0.0), True,
     [Complete({3: 0, 4: 1, 5: 2})], "none"),
    ("...but not before the router has them", T,
     [i(3, V2, "ready"), i(4, V2, "ready"), i(5, V2, "ready")], State("rolling", 0, 0.0), False, [], "rolling"),
    ("paused at a batch boundary: nothing moves", T, OLD3[:2] + [i(3, V2, "ready")], State("paused", 0, 0.0), True,
     [], "paused"),
    ("paused with a step: one batch starts", T, OLD3[:2] + [i(3, V2, "ready")], State("paused", 1, 0.0), True,
     [Start(4)], "paused"),
    ("no rollout: an exited instance restarts (restart always)", Target(V2, 2),
     [i(0, V2, "ready"), i(1, V2, "exited", why="x", last_exit=9.0)], State(), True, [Restart(1, "x")], "none"),
    ("no rollout: restart never leaves it", Target(V2, 2, restart="never"),
     [i(0, V2, "ready"), i(1, V2, "exited", why="x", last_exit=9.0)], State(), True, [], "none"),
    ("no rollout: max_restarts within 60 s gives up", Target(V2, 2, max_restarts=5),
     [i(0, V2, "ready"), i(1, V2, "exited", why="x", last_exit=9.0, recent_restarts=5)], State(), True,
     [GiveUp(1, "5 restarts within 60s")], "none"),
    ("scale up starts on the next slot", Target(V2, 3), [i(0, V2, "ready"), i(1, V2, "ready")], State(), True,
     [Start(2)], "none"),
    # -- the canary phase (update canary, not yet promoted) --
    ("canary: the canaries start beside every old instance", Target(V2, 3, strategy="canary", canary=2), OLD3,
     CANARY, True, [Start(3), Start(4)], "canary"),
    ("canary: ready canaries hold, nothing old stops", C, OLD3 + [i(3, V2, "ready")], CANARY, True, [], "canary"),
    ("canary: an old instance that exits is restarted, not retired", C,
     [i(0, V1, "exited", why="x", last_exit=9.0), *OLD3[1:], i(3, V2, "ready")], CANARY, True, [Restart(0, "x")],
     "canary"),
    ("canary: a canary that exits fails the rollout", C, OLD3 + [i(3, V2, "exited", why="exited with status 1")],
     CANARY, True, [Stop(3, "rollout failed"), Fail("instance 3 (v2) exited with status 1")], "failed"),
    ("canary: paused before the canaries start, nothing starts", C, OLD3, State("paused", 0, float("-inf")), True,
     [], "paused"),
    ("canary: healthy for auto_promote seconds: promote", Target(V2, 3, strategy="canary", canary=1, auto_promote=5),
     OLD3 + [i(3, V2, "ready")], State("canary", 0, 4.0), True, [Promote("auto_promote: the canaries were healthy for 5s")],
     "rolling"),
    ("canary: promoted, the rolling rules retire old ones", Target(V2, 3, strategy="canary"),
     OLD3 + [i(3, V2, "ready")], State("rolling", 0, 4.0), True, [Stop(0, "replaced")], "rolling"),
    ("rollback from a canary: the old set is the target, the canaries go", Target(V1, 3, strategy="canary"),
     OLD3 + [i(3, V2, "ready")], ROLLING, True, [Stop(3, "replaced")], "rolling"),
    # -- a server started again with nothing running, a rollout unfinished (a clean stop took its instances) --
    ("restart mid-canary: the good version's strength first, no canary yet",
     Target(V2, 3, strategy="canary", canary=1, good=V1), [], replace(CANARY, restoring=True), True,
     [Start(0, V1), Start(1, V1), Start(2, V1)], "canary"),
    ("restart mid-rolling-update: the good version's strength first", Target(V2, 3, good=V1), [],
     RESTARTED, True, [Start(0, V1), Start(1, V1), Start(2, V1)], "rolling"),
    ("...while the good version starts, nothing else moves", Target(V2, 3, good=V1),
     [i(0, V1, "ready"), i(1, V1, "starting"), i(2, V1, "starting")], RESTARTED, True, [], "rolling"),
    ("...unless the good version goes bad itself: the rolling rules take it from there", Target(V2, 3, good=V1),
     [i(0, V1, "ready"), i(1, V1, "unhealthy", why="x"), i(2, V1, "starting")], RESTARTED, True,
     [Stop(1, "not serving during the rollout"), Stop(2, "not serving during the rollout")], "rolling"),
    ("...once it is back, the canaries start beside it", Target(V2, 3, strategy="canary", canary=1, good=V1),
     OLD3, replace(CANARY, restoring=True), True, [Start(3)], "canary"),
    ("canary: scale up grows the old set, which is what serves", Target(V2, 5, strategy="canary", canary=1, good=V1),
     OLD3 + [i(3, V2, "ready")], CANARY, True, [Start(4, V1), Start(5, V1)], "canary"),
    ("canary: scale down shrinks the old set, saying so", Target(V2, 2, strategy="canary", canary=1, good=V1),
     OLD3 + [i(3, V2, "ready")], CANARY, True, [Stop(2, "scaled down")], "canary"),
    ("scale down stops the highest slot", Target(V2, 1), [i(0, V2, "ready"), i(1, V2, "ready")], State(), True,
     [Stop(1, "scaled down")], "none"),
]


@pytest.mark.parametrize("what, target, insts, state, routed, actions, status", TABLE, ids=[r[0] for r in TABLE])
def test_plan(what, target, insts, state, routed, actions, status):
    p = plan(target, insts, state, 10.0, routed)
    assert p.actions == actions
    assert p.state.status == status


def test_auto_promote_waits_for_its_seconds():
    t = Target(V2, 3, strategy="canary", canary=1, auto_promote=5)
    p = plan(t, OLD3 + [i(3, V2, "ready")], State("canary", 0, None), 10.0)
    assert (p.actions, p.state.status, p.wake_at) == ([], "canary", 15.0)


@settings(max_examples=200, deadline=None)
@given(replicas=st.integers(1, 5), batch=st.integers(1, 3), canary=st.integers(0, 3),
       status=st.sampled_from(["rolling", "paused", "canary"]), pause=st.sampled_from([0.0, 5.0]),
       order=st.randoms(use_true_random=False))
def test_a_restarted_rollout_restores_the_good_version_before_anything_new(replicas, batch, canary, status, pause,
                                                                          order):
    """From nothing running: no target instance starts until ``replicas`` of the good version are ready,
    whichever of the starting ones turns ready first, and then the rollout goes by its own rules
    (at most one batch, or the canaries, at a time; never everything at once)."""
    t = Target(V2, replicas, strategy="canary" if canary else "rolling", batch=batch, pause=pause,
               canary=canary, good=V1)
    st_ = State("canary" if canary and status == "canary" else ("rolling" if status == "canary" else status),
                0, 0.0, restoring=True)
    insts: list[Inst] = []
    now, started_new = 10.0, 0
    for _ in range(4 * replicas + 4):
        p = plan(t, insts, st_, now)
        st_ = p.state
        if any(not isinstance(a, Start) for a in p.actions):
            break  # past the first batch: the rolling rules' own table rows cover the rest
        for a in p.actions:
            assert isinstance(a, Start)
            ready_good = sum(1 for x in insts if x.key == V1 and x.phase is Phase.READY)
            if a.key != V1:
                assert ready_good == replicas, (a, insts)
                started_new += 1
            insts.append(Inst(len(insts), a.slot, a.key or t.key, Phase.STARTING))
        starting = [x for x in insts if x.phase is Phase.STARTING]
        if starting:  # one at a time turns ready, in any order
            x = order.choice(starting)
            insts[x.id] = replace(x, phase=Phase.READY)
        now += 1.0
        if (p.actions == [] and not starting and p.wake_at is None) or started_new:
            break
        now = max(now, p.wake_at or now)
    assert sum(1 for x in insts if x.key == V1) == replicas
    assert started_new <= (min(canary, replicas) if canary else min(batch, replicas))
    if status != "paused":
        assert started_new > 0, "the rollout carries on once the good version is back"


@pytest.mark.parametrize("flags, percent, want", [
    ([True, False, False, False], 10, [10, 30, 30, 30]),
    ([True, True, False], 10, [5, 5, 90]),
    ([True, False, False], 10, [10, 45, 45]),
    ([False, False, True], 33, [34, 33, 33]),
    ([True], 10, [100]),
    ([True, True, True, False, False, False], 50, [17, 17, 16, 17, 17, 16]),  # the canaries' 50, exactly
    ([False, False, False, True, True, True], 20, [27, 27, 26, 7, 7, 6]),  # ties: the canaries' 20, exactly
    ([True, True, False], 1, [1, 0, 99]),  # less than a unit each: fewer canaries get it
])
def test_split_weights(flags, percent, want):
    assert split_weights(flags, percent) == want
