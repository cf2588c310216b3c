"""Canary rollouts through the engine (fake runtime, MockClock): the phase, promote, abort,
auto_promote, auto_rollback, and the weights handed to the router (docs/manifest.md)."""

import pytest
import trio

from deployfs.control.engine import NullRouter
from deployfs.model.errors import CommandError, Kind
from tests.control.harness import Harness, deploy_v1, manifest, watch


def canary(image: str = "/bin/v2", **kw: object) -> bytes:
    return manifest(image=image, update="canary", **kw)


def pids(h: Harness, version: str) -> set[int]:
    return {p.pid for p in h.rt.running("web") if p.version == version}


async def test_canary_starts_beside_the_old_set_and_holds_until_promote(h, autojump_clock):
    v1 = await deploy_v1(h)
    old = pids(h, v1)
    seen = watch(h)
    v2 = h.write(canary(canary=2))
    assert h.cmd("apply") == f"ok canary {v1}->{v2}"
    assert h.svc.rec.update_status == "canary"
    assert await h.settle() == "canary"
    await trio.sleep(30)  # it holds: nothing more moves without a person
    assert h.svc.outcome() == "canary" and pids(h, v1) == old and len(pids(h, v2)) == 2
    assert all(not h.rt.procs[p].signals for p in old)
    assert h.svc.rec.previous_version == v1
    assert any(e.startswith(f"canary update started {v1}→{v2} strategy=canary canary=2") for e in h.events())
    assert h.cmd("promote") == "ok"
    assert any(e == "canary promoted by uid=0: rolling out the rest" for e in h.events())
    assert await h.settle() == f"done {v2}"
    assert [(i.rec.slot, i.rec.version) for i in h.svc.by_slot()] == [(0, v2), (1, v2), (2, v2)]
    assert seen["max_running"] == 5  # replicas + canary
    assert seen["min_ready"] >= 3
    assert h.svc.rec.previous_version == v1 and not h.svc.rec.canary_phase


@pytest.mark.parametrize("verb", ["rollback", "abort"])
async def test_rollback_or_abort_stops_the_canaries_and_leaves_the_old_set(h, autojump_clock, verb):
    v1 = await deploy_v1(h)
    old = pids(h, v1)
    before = [(i.rec.id, i.rec.slot, i.rec.pid) for i in h.svc.by_slot()]
    h.write(canary())
    h.cmd("apply")
    assert await h.settle() == "canary"
    h.cmd(verb)
    assert await h.settle() == f"done {v1}"
    assert pids(h, v1) == old and [(i.rec.id, i.rec.slot, i.rec.pid) for i in h.svc.by_slot()] == before
    assert all(not h.rt.procs[p].signals for p in old)
    assert len(h.rt.running("web")) == 3
    assert h.svc.rec.version == v1 and h.svc.rec.previous_version is None  # the canary never completed


async def test_promote_and_abort_are_refused_without_a_canary(h, autojump_clock):
    await deploy_v1(h)
    for verb in ("promote", "abort"):
        with pytest.raises(CommandError) as e:
            h.cmd(verb)
        assert e.value.kind is Kind.BUSY


async def test_pause_stops_the_auto_promote_clock_and_resume_carries_it_on(h, autojump_clock, monkeypatch):
    # Issue 20 (newcomer 6): paused 6 s with auto_promote 4, resume promoted at once.
    import deployfs.control.engine as engine_module
    # The pause boundary is in the record, as wall clock: let the wall clock run with the mock one.
    monkeypatch.setattr(engine_module.time, "time", lambda: 1.9e9 + trio.current_time())
    await deploy_v1(h)
    v2 = h.write(canary(auto_promote=20))
    h.cmd("apply")
    assert await h.settle() == "canary"
    t0 = trio.current_time()
    await trio.sleep(5)
    h.cmd("pause")
    await trio.sleep(30)  # longer than auto_promote: nothing may promote while paused
    assert h.svc.rec.canary_phase
    h.cmd("resume")
    resumed = trio.current_time()
    while h.svc.rec.canary_phase:
        await h.svc.wait_change()
    assert 14.9 <= trio.current_time() - resumed <= 16, trio.current_time() - t0  # the 15 s left of 20
    assert await h.settle() == f"done {v2}"


async def test_auto_promote_after_its_seconds_of_healthy_canaries(h, autojump_clock):
    await deploy_v1(h)
    v2 = h.write(canary(auto_promote=20))
    h.cmd("apply")
    assert await h.settle() == "canary"
    t0 = trio.current_time()
    while h.svc.rec.update_status == "canary":
        await h.svc.wait_change()
    assert 19.9 <= trio.current_time() - t0 <= 21
    assert await h.settle() == f"done {v2}"
    assert any("canary promoted by deployfs (auto_promote" in e for e in h.events())


async def test_pause_in_the_canary_then_promote_moves_by_steps(h, autojump_clock):
    await deploy_v1(h)
    v2 = h.write(canary())
    h.cmd("apply")
    assert await h.settle() == "canary"
    h.cmd("pause")
    assert await h.settle() == "paused"
    h.cmd("promote")
    assert await h.settle() == "paused" and h.svc.rec.update_status == "paused"
    h.cmd("step")
    assert await h.settle() == "paused"
    h.cmd("resume")
    assert await h.settle() == f"done {v2}"


async def test_step_restart_during_a_canary_are_refused_and_stop_ends_it(h, autojump_clock):
    v1 = await deploy_v1(h)
    v2 = h.write(canary())
    h.cmd("apply")
    assert await h.settle() == "canary"
    for verb in ("restart",):
        with pytest.raises(CommandError) as e:
            h.cmd(verb)
        assert e.value.kind is Kind.BUSY
    h.cmd("pause")
    with pytest.raises(CommandError) as e:
        h.cmd("step")  # the canary is the only batch before a decision
    assert e.value.kind is Kind.BUSY and "promote" in e.value.message
    h.cmd("stop")
    await h.settle()
    assert not h.svc.rec.canary_phase and not h.rt.running("web")
    # The stop abandoned the canary: the good version is in force, and what restart brings back.
    assert h.svc.rec.version == v1 and any(f"canary of {v2} abandoned by stop" in e for e in h.events())
    h.cmd("restart")
    assert await h.settle() == f"done {v1}"
    assert {p.version for p in h.rt.running("web")} == {v1} and h.svc.rec.previous_version != v2


async def test_bad_canary_with_auto_rollback_rolls_back_by_itself(h, autojump_clock):
    v1 = await deploy_v1(h)
    old = pids(h, v1)
    v2 = h.write(canary(auto_rollback="yes"))
    h.prober.behaviour[v2] = "exit"
    h.cmd("apply")
    out = await h.settle()
    assert out.startswith(f"failed: instance 3 ({v2}) ") and out.endswith(f"(rolled back to {v1})"), out
    assert h.svc.rec.update_status == "none" and h.svc.rec.version == v1
    assert pids(h, v1) == old and all(not h.rt.procs[p].signals for p in old)
    assert any("automatic rollback started" in e and "by deployfs (auto_rollback)" in e for e in h.events())
    assert h.cmd("apply") == f"ok canary {v1}->{v2}"  # the broken release again: a new rollout, the note gone
    assert h.svc.outcome() is None or not h.svc.outcome().endswith(f"(rolled back to {v1})")


async def test_auto_rollback_after_old_instances_retired_restores_first(h, autojump_clock):
    v1 = await deploy_v1(h)
    h.prober.fail_after = 1.0
    v2 = h.write(manifest(image="/bin/v2", auto_rollback="yes", update_pause=3))
    h.prober.behaviour[v2] = "flaky-later"
    h.cmd("apply")
    out = await h.settle()
    assert out.endswith(f"(rolled back to {v1})"), out
    assert any("draining (replaced)" in e for e in h.events())  # it failed after retiring an old one
    assert sorted(i.rec.slot for i in h.svc.by_slot()) == [0, 1, 2]
    assert {i.rec.version for i in h.svc.by_slot()} == {v1} and h.svc.health() == "healthy"


async def test_without_auto_rollback_a_failure_waits_for_a_person(h, autojump_clock):
    await deploy_v1(h)
    v2 = h.write(canary())
    h.prober.behaviour[v2] = "exit"
    h.cmd("apply")
    out = await h.settle()
    assert out.startswith("failed: ") and "rolled back" not in out and h.svc.rec.update_status == "failed"


class WeightRouter(NullRouter):
    def __init__(self) -> None:
        self.tables: list[tuple[list[tuple[str, int]], list[int] | None]] = []

    def set_backends(self, service, port, backends, weights=None, *, protocol="tcp") -> None:  # type: ignore[no-untyped-def]
        self.tables.append((list(backends), weights))


def weighted(tmp_path) -> tuple[Harness, WeightRouter]:
    """An engine whose router keeps every table (backends, weights) it was given."""
    h, router = Harness(tmp_path), WeightRouter()
    h.local(router=router)
    return h, router


async def into_canary(h: Harness, **kw: object) -> None:
    """v1 serving on 8080, then a canary release of it applied and holding."""
    await deploy_v1(h, port=8080)
    h.write(canary(port=8080, **kw))
    h.cmd("apply")
    assert await h.settle() == "canary"


@pytest.mark.parametrize("weight, canaries, want", [(10, 1, [30, 30, 30, 10]), (10, 2, [30, 30, 30, 5, 5]),
                                                    (None, 1, None)])
async def test_canary_weight_reaches_the_router(tmp_path, autojump_clock, weight, canaries, want):
    h, router = weighted(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await into_canary(h, canary=canaries, **({"canary_weight": weight} if weight is not None else {}))
        backends, weights = router.tables[-1]
        assert len(backends) == 3 + canaries and weights == want
        h.cmd("promote")
        await h.settle()
        assert router.tables[-1][1] is None  # promoted: every instance counts the same
        n.cancel_scope.cancel()


async def test_a_restarted_server_carries_on_with_the_canary(tmp_path, autojump_clock):
    # The phase lives in the service record: a new engine on the same store adopts the
    # instances and holds the canary (nothing old stops), then promote works as before.
    h = Harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        v1 = await deploy_v1(h)
        v2 = h.write(canary())
        h.cmd("apply")
        assert await h.settle() == "canary"
        n.cancel_scope.cancel()  # "killed": the instances go on
    old = pids(h, v1)
    h.local()
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        assert h.svc.rec.update_status == "canary" and h.svc.rec.canary_phase
        await trio.sleep(10)
        assert await h.settle() == "canary" and pids(h, v1) == old and len(pids(h, v2)) == 1
        h.cmd("promote")
        assert await h.settle() == f"done {v2}"
        n.cancel_scope.cancel()


async def test_auto_promote_counts_across_a_restart_of_the_server(tmp_path, autojump_clock, monkeypatch):
    import deployfs.control.engine as engine_module
    # The record keeps wall-clock time: let the wall clock run with the mock one.
    monkeypatch.setattr(engine_module.time, "time", lambda: 1.9e9 + trio.current_time())
    h = Harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await deploy_v1(h)
        v2 = h.write(canary(auto_promote=60))
        h.cmd("apply")
        assert await h.settle() == "canary"
        await trio.sleep(40)
        n.cancel_scope.cancel()
    h.local()
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        t0 = trio.current_time()
        while h.svc.rec.update_status == "canary":
            await h.svc.wait_change()
        assert trio.current_time() - t0 <= 21  # the 20 s left, not a fresh 60
        assert await h.settle() == f"done {v2}"
        n.cancel_scope.cancel()


async def test_abort_of_a_rolling_update_returns_to_the_good_version(h, autojump_clock):
    v1 = await deploy_v1(h)
    h.write(manifest(image="/bin/v2", update_pause=5))
    h.cmd("apply")
    while not any(i.rec.version != v1 and i.phase.value == "ready" for i in h.svc.instances.values()):
        await h.svc.wait_change()
    h.cmd("abort")
    assert await h.settle() == f"done {v1}"
    assert {i.rec.version for i in h.svc.by_slot()} == {v1} and len(h.svc.by_slot()) == 3
    assert any(e.startswith("rollout aborted: rollback started") and e.endswith("by uid=0") for e in h.events())
    with pytest.raises(CommandError) as e:
        h.cmd("abort")  # nothing in flight
    assert e.value.kind is Kind.BUSY


async def test_a_promote_refused_on_a_full_disk_leaves_the_router_as_it_was(tmp_path, autojump_clock, monkeypatch):
    """The weights go to the router after the command's commit: a commit the full disk refuses
    (the engine's memory restored) never reaches the router."""
    from deployfs.state.store import StoreFull

    h, router = weighted(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await into_canary(h, canary_weight=10)
        table = router.tables[-1]
        assert table[1] == [30, 30, 30, 10]
        exec_ = h.store._exec

        def full_commit(sql, args=()):  # type: ignore[no-untyped-def]
            if sql == "COMMIT":
                raise StoreFull("the state disk is full")
            return exec_(sql, args)
        monkeypatch.setattr(h.store, "_exec", full_commit)
        with pytest.raises(CommandError) as e:
            h.cmd("promote")
        assert e.value.kind is Kind.NO_SPACE
        monkeypatch.setattr(h.store, "_exec", exec_)
        assert h.svc.rec.canary_phase and router.tables[-1] == table
        await trio.sleep(5)
        assert router.tables[-1] == table and await h.settle() == "canary"
        h.cmd("promote")  # room again: it goes through, weights and all
        await h.settle()
        assert router.tables[-1][1] is None
        n.cancel_scope.cancel()
