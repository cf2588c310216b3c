"""rollout.plan() as a table: the instances as they are, and the one next step the rules give.

The property test (tests/control/test_properties.py) drives whole random histories; this table
pins each rule of the reconcile step on its own, so a change to one shows which rule moved.
"""

import pytest

from deployfs.model.rollout import (Complete, Fail, GiveUp, Inst, Phase, Promote, Restart, Start, State, Stop, Target, plan,
                                    split_weights)

V1, V2 = ("v1", 0), ("v2", 0)
ROLLING, MID_BATCH = State("rolling", 0, float("-inf")), State("rolling", 0, None)
CANARY = State("canary", 0, float("-inf"))


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


@pytest.mark.parametrize("flags, percent, want", [
    ([True, False, False, False], 10, [10, 30, 30, 30]),
    ([True, True, False], 10, [5, 5, 90]),
    ([True, False, False], 10, [10, 45, 45]),
    ([False, False, True], 33, [34, 33, 33]),
    ([True], 10, [100]),
])
def test_split_weights(flags, percent, want):
    assert split_weights(flags, percent) == want
