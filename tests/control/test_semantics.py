"""Rollout semantics a newcomer and an attacker tripped over (issues 14 and 18), fake runtime, MockClock."""

import types

import pytest
import trio

from deployfs.control import engine as engine_module
from tests.control.harness import Harness, deploy_v1, manifest, watch


async def good_version_back(h, version: str, replicas: int = 3) -> None:
    with trio.fail_after(10):
        while h.svc.health() != "healthy" or [i.rec.version for i in h.svc.instances.values()] != [version] * replicas:
            await h.svc.wait_change()


async def apply(h, image: str, how: str = "ok", **kw) -> str:
    v = h.write(manifest(image=image, **kw))
    h.prober.behaviour[v] = how
    h.cmd("apply")
    return v


# -- 14.1: only a version that completed a rollout becomes the rollback target ----------------


async def test_rollback_of_a_failed_release_returns_to_the_last_good_one(h, autojump_clock):
    v1 = await deploy_v1(h)
    v2 = await apply(h, "/bin/v2")
    assert await h.settle() == f"done {v2}"
    v3 = await apply(h, "/bin/v3", "exit")
    assert (await h.settle()).startswith("failed")
    assert (h.svc.rec.version, h.svc.rec.previous_version) == (v3, v2)
    h.cmd("rollback")
    assert await h.settle() == f"done {v2}"
    # previous_version points at the good one before v2, never at the broken v3
    assert (h.svc.rec.version, h.svc.rec.previous_version) == (v2, v1)
    assert h.svc.rec.previous_manifest.startswith("image /bin/v1\n")
    h.cmd("rollback")
    assert await h.settle() == f"done {v1}"
    assert (h.svc.rec.version, h.svc.rec.previous_version) == (v1, v2)
    assert v3 not in {p.version for p in h.rt.running("web")}


async def test_rollback_mid_rollout_and_while_paused_never_targets_the_abandoned_release(h, autojump_clock):
    v1 = await deploy_v1(h)
    v2 = await apply(h, "/bin/v2")
    assert await h.settle() == f"done {v2}"
    await apply(h, "/bin/v3", update_pause=5)
    while h.svc.progress()[0] < 1:
        await h.svc.wait_change()
    h.cmd("rollback")  # mid-rollout
    assert await h.settle() == f"done {v2}"
    assert h.svc.rec.previous_version == v1
    v4 = await apply(h, "/bin/v4")
    await trio.sleep(0.05)
    h.cmd("pause")
    assert await h.settle() == "paused"
    h.cmd("rollback")  # while paused
    assert await h.settle() == f"done {v2}"
    assert h.svc.rec.previous_version == v1 and v4 not in {p.version for p in h.rt.running("web")}


async def test_apply_during_a_rolling_restart_keeps_the_rollback_target(h, autojump_clock):
    # a regression: previous_version became empty and rollback had nothing to roll back to
    v1 = await deploy_v1(h)
    h.cmd("restart")
    await trio.sleep(0.1)
    assert h.svc.rec.update_status == "rolling"
    v2 = await apply(h, "/bin/v2")
    assert await h.settle() == f"done {v2}"
    assert h.svc.rec.previous_version == v1
    h.cmd("rollback")
    assert await h.settle() == f"done {v1}"


# -- 14.2: restart keeps the scale and surges ------------------------------------------------


@pytest.mark.parametrize("scale", [5, 2])
async def test_restart_keeps_the_replicas_set_by_scale_and_surges(h, autojump_clock, scale):
    await deploy_v1(h)
    h.cmd("scale", str(scale))
    await h.settle()
    seen = watch(h, replicas=scale)
    before = {p.pid for p in h.rt.running("web")}
    h.cmd("restart")
    assert (await h.settle()).startswith("done")
    assert h.svc.rec.replicas == scale and len(h.rt.running("web")) == scale
    assert not before & {p.pid for p in h.rt.running("web")}
    # a new instance is ready before each old one drains, as in a rolling update
    assert seen["max_running"] == scale + 1 and seen["min_ready"] >= scale
    assert f"replicas {scale}\n" in h.svc.rec.manifest


# -- 14.3: a failed rollout never leaves the service weaker ------------------------------------


async def test_a_release_that_passes_then_fails_gets_the_good_version_back_at_once(h, autojump_clock):
    v1 = await deploy_v1(h)
    old = {p.pid for p in h.rt.running("web")}
    h.prober.fail_after = 0.5  # healthy at 0.3 s, an old instance retired, then unhealthy
    await apply(h, "/bin/v2", "flaky-later")
    out = await h.settle()
    assert out.startswith("failed: instance 3") and "unhealthy" in out
    assert any(e == "instance 0 draining (replaced)" for e in h.events())  # it did retire an old one
    await good_version_back(h, v1)
    running = h.rt.running("web")
    assert [p.version for p in running] == [v1] * 3
    survivors = old & {p.pid for p in running}
    assert 0 < len(survivors) < 3 and all(not h.rt.procs[pid].signals for pid in survivors)
    assert sorted(i.rec.slot for i in h.svc.by_slot()) == [0, 1, 2]
    assert h.svc.rec.update_status == "failed"  # still needs a person
    h.cmd("rollback")
    assert await h.settle() == f"done {v1}"


async def test_good_version_is_restored_within_the_surge_bound(h, autojump_clock):
    # Two batches pass, the third is starting, then the release turns bad: one old left, one new ready.
    v1 = await deploy_v1(h, replicas=3)
    seen = watch(h)
    h.prober.fail_after = 0.7
    await apply(h, "/bin/v2", "flaky-later")
    assert (await h.settle()).startswith("failed")
    await good_version_back(h, v1)
    assert seen["max_running"] <= 4
    # the ready instance of the failed release served until the good version was back
    assert "instance 4 draining (rollout failed; the good version is back)" in h.events()


# -- nits ------------------------------------------------------------------------------------


async def test_stop_says_stop_not_scaled_down(h, autojump_clock):
    await deploy_v1(h)
    h.cmd("stop")
    await h.settle()
    drains = [e for e in h.events() if " draining " in e]
    assert drains and all(e.endswith("(stop)") for e in drains)


async def test_rollout_duration_counts_from_its_start_across_a_restart_of_deployfs(tmp_path, autojump_clock,
                                                                                   monkeypatch):
    # Wall-clock time that follows the mock clock, so the 10 s below are visible to time.time().
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(time=lambda: 1.8e9 + trio.current_time()))
    h = Harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        v1 = await deploy_v1(h, replicas=2)
        v2 = h.write(manifest(image="/bin/v2", replicas=2, update_pause=5))
        h.cmd("apply")
        await trio.sleep(3)  # the first batch is done, the pause runs
        n.cancel_scope.cancel()  # deployfs is killed mid-rollout; the instances live on
    await trio.sleep(7)
    h.local()
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        assert any(e.startswith("instance") and "adopted" in e for e in h.events())
        assert await h.settle() == f"done {v2}"
        n.cancel_scope.cancel()
    took = float(next(e for e in h.events() if e.startswith(f"rolling update complete: {v2}")).split()[-1][:-1])
    assert took >= 10, took
    assert h.store.get_service("web").previous_version == v1


# -- 14.11: a starting instance is probed on a short, growing cadence ------------------------


async def test_a_starting_instance_is_seen_ready_soon_after_it_is(h, autojump_clock):
    # Ready 0.3 s after it starts; with checks every 2 s a fixed cadence of min(interval, 0.5)
    # would see it at 0.5 s.  20 ms doubling: probes at 0, .02, .06, .14, .30 s.
    h.write(manifest(replicas=1, health_interval=2))
    t0 = trio.current_time()
    h.cmd("apply")
    while not any(i.phase.value == "ready" for i in h.svc.instances.values()):
        await h.svc.wait_change()
    assert trio.current_time() - t0 < 0.4
    # ...and a starting instance that never comes up is not probed much more than before
    calls = []
    real_probe = h.prober.probe

    v2 = h.write(manifest(image="/bin/v2", replicas=1, health_interval=2))

    async def counting(check, timeout, **kw):
        if check.target[1] == v2:
            calls.append(trio.current_time())
        return await real_probe(check, timeout, **kw)

    h.prober.probe = counting
    h.prober.behaviour[v2] = "fail"
    h.cmd("apply")
    assert (await h.settle()).startswith("failed")  # update_deadline 5
    assert len(calls) <= 5 / 0.5 + 5  # every 0.5 s, plus the five quick ones at the start


async def test_a_record_from_before_good_versions_were_kept_keeps_its_rollback_target(tmp_path, autojump_clock):
    # A state database written by an older deployfs: no good_* fields, previous_version as it was kept.
    h = Harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        v1 = await deploy_v1(h)
        v2 = h.write(manifest(image="/bin/v2"))
        h.cmd("apply")
        assert await h.settle() == f"done {v2}"
        n.cancel_scope.cancel()
    old = h.store.get_service("web")
    old.good_version, old.good_manifest, old.before_good_version, old.before_good_manifest = None, "", None, ""
    h.store.put_service(old)
    h.local()
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await apply(h, "/bin/v3", "exit")
        assert (await h.settle()).startswith("failed")
        assert h.svc.rec.previous_version == v2
        h.cmd("rollback")
        assert await h.settle() == f"done {v2}"
        assert h.svc.rec.previous_version == v1
        n.cancel_scope.cancel()
