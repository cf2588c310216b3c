"""The engine driven by a fake runtime under MockClock: supervision and rollouts."""

import errno

import pytest
import trio

from deployfs.model.errors import CommandError, Kind
from tests.control.harness import Harness, deploy_v1, manifest, watch


async def test_first_deploy_runs_replicas_healthy(h, autojump_clock):
    v1 = await deploy_v1(h)
    insts = h.svc.by_slot()
    assert [i.rec.slot for i in insts] == [0, 1, 2]
    assert all(i.rec.health == "healthy" and i.rec.version == v1 for i in insts)
    assert h.svc.health() == "healthy"
    assert len(h.rt.running("web")) == 3


async def test_rolling_update_keeps_bounds_and_renumbers(h, autojump_clock):
    v1 = await deploy_v1(h)
    seen = watch(h)
    v2 = h.write(manifest(image="/bin/v2"))
    assert h.cmd("apply") == f"ok rolling {v1}->{v2}"
    assert h.svc.rec.update_status == "rolling"
    assert await h.settle() == f"done {v2}"
    assert seen["max_running"] == 4  # replicas + batch, never more
    assert seen["min_ready"] >= 3
    insts = h.svc.by_slot()
    assert [(i.rec.slot, i.rec.version) for i in insts] == [(0, v2), (1, v2), (2, v2)]
    assert h.svc.rec.previous_version == v1 and h.svc.rec.update_status == "none"
    assert [p.version for p in h.rt.running("web")] == [v2] * 3
    ev = h.events()
    assert any(e.startswith(f"rolling update started {v1}→{v2} strategy=rolling batch=1") for e in ev)
    assert any(e.startswith(f"rolling update complete: {v2}") for e in ev)
    # one batch at a time: each new instance healthy before an old one drains
    order = [e for e in ev if e.startswith("instance") and ("healthy" in e or "draining" in e)][3:]
    assert [("healthy" in e) for e in order] == [True, False] * 3


async def test_batches_and_pause(h, autojump_clock):
    await deploy_v1(h, replicas=5)
    seen = watch(h, replicas=5, batch=2)
    h.write(manifest(image="/bin/v2", replicas=5, update_batch=2, update_pause=3))
    t0 = trio.current_time()
    h.cmd("apply")
    await h.settle()
    assert seen["max_running"] == 7
    assert trio.current_time() - t0 >= 6  # two pauses between three batches (2+2+1)


async def test_bad_version_fails_and_leaves_old_untouched(h, autojump_clock):
    v1 = await deploy_v1(h)
    old = {p.pid for p in h.rt.running("web")}
    h.write(manifest(image="/bin/v2"))
    h.prober.behaviour[h.write(manifest(image="/bin/v2"))] = "fail"
    h.cmd("apply")
    out = await h.settle()
    assert out.startswith("failed: instance 3 (") and "unhealthy" in out and "detected" in out
    assert h.svc.rec.update_status == "failed"
    assert {p.pid for p in h.rt.running("web")} == old
    assert all(not h.rt.procs[pid].signals for pid in old)
    assert h.svc.rec.version != v1 and h.svc.rec.previous_version == v1
    # a failed service needs a person: rollback converges to v1; the broken release is no rollback target
    h.cmd("rollback")
    assert await h.settle() == f"done {v1}"
    assert (h.svc.rec.version, h.svc.rec.previous_version) == (v1, None)
    assert {p.pid for p in h.rt.running("web")} == old  # nothing to replace: old ones are the target


async def test_bad_image_fails_fast(h, autojump_clock):
    await deploy_v1(h)
    h.write(manifest(image="/missing"))
    t0 = trio.current_time()
    h.cmd("apply")
    out = await h.settle()
    assert "failed to start" in " ".join(h.events()) and out.startswith("failed: instance 3")
    assert trio.current_time() - t0 < 1


async def test_exiting_version_fails(h, autojump_clock):
    await deploy_v1(h)
    h.prober.behaviour[h.write(manifest(image="/bin/v2"))] = "exit"
    h.cmd("apply")
    assert "exited" in await h.settle()


async def test_pause_step_resume(h, autojump_clock):
    await deploy_v1(h)
    h.write(manifest(image="/bin/v2"))
    h.cmd("apply")
    await trio.sleep(0.05)  # the first batch is in hand
    h.cmd("pause")
    assert await h.settle() == "paused"
    assert h.svc.progress() == (1, 3)  # the batch in hand finished
    await trio.sleep(10)
    assert h.svc.progress() == (1, 3)  # nothing moves while paused
    h.cmd("step")
    await trio.sleep(0.01)
    assert await h.settle() == "paused"
    assert h.svc.progress() == (2, 3)
    h.cmd("resume")
    assert (await h.settle()).startswith("done")
    assert h.svc.progress() == (3, 3)


async def test_a_step_through_the_last_batch_ends_done_not_paused(h, autojump_clock):
    # `deploy step` on the last batch printed `paused` (exit 3): once the batch was ready and
    # before its old instance was retired, nothing looked in flight, so the rollout looked paused.
    await deploy_v1(h)
    v2 = h.write(manifest(image="/bin/v2"))
    h.cmd("apply")
    await trio.sleep(0.05)
    h.cmd("pause")
    assert await h.settle() == "paused"
    h.cmd("step")
    await trio.sleep(0.01)
    assert await h.settle() == "paused"
    assert h.svc.progress() == (2, 3)
    seen: list[str | None] = []
    h.engine.listeners.append(lambda name: seen.append(h.svc.outcome()))
    h.cmd("step")  # the last batch
    while h.svc.rec.update_status != "none":
        await h.svc.wait_change()
    assert "paused" not in seen, seen  # what `wait` would have said after the last step
    assert await h.settle() == f"done {v2}"


async def test_apply_during_rollout_rolls_over_to_the_newest(h, autojump_clock):
    v1 = await deploy_v1(h)
    seen = watch(h)
    h.write(manifest(image="/bin/v2"))
    h.cmd("apply")
    await trio.sleep(0.1)
    v3 = h.write(manifest(image="/bin/v3"))
    h.cmd("apply")
    assert await h.settle() == f"done {v3}"
    assert seen["max_running"] <= 4
    assert h.svc.rec.previous_version == v1  # v2 never went fully in force
    assert {p.version for p in h.rt.running("web")} == {v3}


async def test_replace_strategy(h, autojump_clock):
    await deploy_v1(h)
    v2 = h.write(manifest(image="/bin/v2", update="replace"))
    h.cmd("apply")
    assert await h.settle() == f"done {v2}"
    assert [i.rec.slot for i in h.svc.by_slot()] == [0, 1, 2]


async def test_restart_replaces_every_instance_with_the_same_version(h, autojump_clock):
    v1 = await deploy_v1(h)
    before = {p.pid for p in h.rt.running("web")}
    h.cmd("restart")
    assert await h.settle() == f"done {v1}"
    after = {p.pid for p in h.rt.running("web")}
    assert len(after) == 3 and not before & after


async def test_scale_rewrites_the_manifest_and_scales(h, autojump_clock):
    await deploy_v1(h)
    h.cmd("scale", "5")
    await h.settle()
    assert len(h.rt.running("web")) == 5
    assert b"replicas 5" in h.store.get_file("web").data
    h.cmd("scale", "1")
    await h.settle()
    assert [i.rec.slot for i in h.svc.by_slot()] == [0]
    with pytest.raises(CommandError) as e:
        h.cmd("scale", "lots")
    assert e.value.kind == Kind.INVALID


async def test_crashed_instance_is_restarted_then_given_up(h, autojump_clock):
    await deploy_v1(h, max_restarts=2)
    victim = h.svc.by_slot()[0]
    h.rt.procs[victim.rec.pid].exit(1)
    await trio.sleep(1)
    assert victim.rec.restarts == 1 and victim.running and not h.rt.procs[victim.rec.pid].exited
    for _ in range(3):
        if victim.rec.pid is not None:  # (none once given up: the agent stopped what was left of it)
            h.rt.procs[victim.rec.pid].exit(1)
        await trio.sleep(2)
    assert victim.rec.state == "failed" and h.svc.health() == "degraded"
    assert any("giving up" in e for e in h.events())


async def test_stop_then_apply_starts_again(h, autojump_clock):
    await deploy_v1(h)
    h.cmd("stop")
    await h.settle()
    assert h.rt.running("web") == [] and h.svc.health() == "stopped"
    h.cmd("apply")
    await h.settle()
    assert len(h.rt.running("web")) == 3 and h.svc.health() == "healthy"


async def test_command_errors(h, autojump_clock):
    with pytest.raises(CommandError) as e:
        h.cmd("apply")
    assert e.value.kind == Kind.NOT_FOUND
    h.store.put_file("web", b"image /bin/x\nreplicas three\n")
    with pytest.raises(CommandError) as e:
        h.cmd("apply")
    assert e.value.kind == Kind.INVALID and "line 2" in e.value.message
    await deploy_v1(h)
    for verb in ("resume", "step"):
        with pytest.raises(CommandError) as e:
            h.cmd(verb)
        assert e.value.kind == Kind.BUSY
    with pytest.raises(CommandError) as e:
        h.cmd("rollback")
    assert e.value.kind == Kind.BUSY


async def test_service_and_instance_caps(tmp_path, autojump_clock):
    from deployfs.control.engine import Engine
    h = Harness(tmp_path)
    h.local(max_services=1, max_instances=4)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await deploy_v1(h)
        h.write(manifest(), name="other")
        with pytest.raises(CommandError) as e:
            h.cmd("apply", name="other")
        assert e.value.kind == Kind.NO_SPACE and "limit of 1 services" in e.value.message
        h.cmd("scale", "9")
        await trio.sleep(2)
        assert len(h.rt.running("web")) == 4
        assert any("limit of 4 instances is reached" in ev for ev in h.events())
        n.cancel_scope.cancel()


def held_router_harness(tmp_path):
    from deployfs.control.engine import Engine
    from tests.fakes import HeldRouter
    h = Harness(tmp_path)
    router = HeldRouter()
    h.local(router=router)
    return h, router


async def test_done_waits_until_the_router_has_the_ready_instances(tmp_path, autojump_clock):
    # `cat wait` answering "done" promises a port that serves: a client that
    # connects right after must not meet a router still being told.
    h, router = held_router_harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        h.write(manifest(port=8080))
        h.cmd("apply")
        with trio.move_on_after(30):
            while len(h.svc.endpoints()) < 3:
                await h.svc.wait_change()
        await trio.sleep(5)
        assert len(h.svc.endpoints()) == 3 and h.svc.outcome() is None  # ready, but not done
        assert not any("deploy complete" in ev for ev in h.events())
        router.deliver()
        with trio.fail_after(5):
            await h.settle()
        assert h.svc.outcome().startswith("done")
        assert router.table["web"][1] == h.svc.endpoints()
        n.cancel_scope.cancel()


async def test_changing_only_the_protocol_reroutes_without_a_rollout(tmp_path, autojump_clock):
    h, router = held_router_harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        h.write(manifest(port=8080))
        h.cmd("apply")
        with trio.move_on_after(30):
            while len(h.svc.endpoints()) < 3:
                await h.svc.wait_change()
        router.deliver()
        with trio.fail_after(5):
            await h.settle()
        assert router.protocols["web"] == "tcp"  # an exec health check: bytes
        before = {id(p) for p in h.rt.running("web")}
        h.write(manifest(port=8080, protocol="http"))
        assert h.cmd("apply").startswith("ok ")
        assert router.protocols["web"] == "http"
        assert {id(p) for p in h.rt.running("web")} == before  # nothing restarted
        n.cancel_scope.cancel()


async def test_a_router_that_cannot_listen_fails_the_rollout(tmp_path, autojump_clock):
    # The port was free when checked at apply, then taken before the router bound
    # it: `done` would promise a port that serves another program.
    h, router = held_router_harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        h.write(manifest(port=8080))
        h.cmd("apply")
        router.refused["web"] = "cannot listen on 127.0.0.1:8080: Address already in use"
        router.deliver()
        with trio.fail_after(30):
            out = await h.settle()
        assert out == "failed: router: cannot listen on 127.0.0.1:8080: Address already in use"
        assert not any("deploy complete" in ev for ev in h.events())
        n.cancel_scope.cancel()


async def test_a_large_spawn_batch_does_not_hold_the_trio_loop(h, autojump_clock):
    # Issue 18.12: `scale 1000` spawned every process in one stretch without a
    # checkpoint, so the ctl write (and every other FUSE request) waited for all
    # of them. Another task must get to run between spawns.
    await deploy_v1(h, replicas=1)
    ticks = 0
    at_start: list[int] = []
    h.rt.on_start = lambda proc: at_start.append(ticks)

    async def other_requests():
        nonlocal ticks
        while len(at_start) < 200:  # spins only while the batch is spawned (autojump needs idle)
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as n:
        n.start_soon(other_requests)
        h.cmd("scale", "201")
    # The other task ran all through the batch (trio shuffles its run queue, so
    # not exactly once per spawn); without a checkpoint it would not run at all.
    assert len(at_start) == 200 and at_start[-1] - at_start[0] >= 100


async def test_unknown_directives_are_warned_about_once_per_manifest_text(h, autojump_clock):
    # a regression: 1,500 unknown lines gave 1,500 warning events on every apply, even an unchanged one
    text = manifest() + b"".join(b"colour blue%d\n" % i for i in range(1500))
    v1 = h.write(text)
    assert h.cmd("apply").startswith("ok deployed")
    assert await h.settle() == f"done {v1}"
    warned = [e for e in h.events() if e.startswith("warning:")]
    assert len(warned) == 11 and warned[-1] == "warning: 1490 more like these"
    assert "unknown directive 'colour'" in warned[0]
    assert h.cmd("apply") == f"ok unchanged {v1}"
    assert h.cmd("apply") == f"ok unchanged {v1}"
    h.write(text.replace(b"replicas 3", b"replicas 2"))  # a new text: said again, once
    assert h.cmd("apply") == f"ok {v1} replicas=2"
    assert len([e for e in h.events() if e.startswith("warning:")]) == 22


async def test_a_log_that_cannot_be_bounded_does_not_stop_supervision(h, autojump_clock):
    # on a full state disk, bounding a log fails (ENOSPC); that must not kill the engine
    async def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    h.rt.bound_log = full
    v1 = await deploy_v1(h)
    await trio.sleep(25)  # two rounds of bounding the logs
    h.rt.running("web")[0].exit(1)
    await trio.sleep(1)
    assert await h.settle() == f"done {v1}" and len(h.rt.running("web")) == 3


async def test_delete_survives_a_restart_of_the_server_and_frees_the_name(tmp_path, autojump_clock):
    # A crash mid-delete: the next start finishes the deletion from the record alone.
    from deployfs.control.engine import Engine
    from deployfs.state.events import CLUSTER
    h = Harness(tmp_path)
    h.rt.stop_delay = 3.0  # the instances take a while to stop
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        h.write(manifest(replicas=2))
        h.cmd("apply")
        assert (await h.settle()).startswith("done")
        assert h.engine.command("web", "delete", None, "uid=0") == "ok deleting"
        with pytest.raises(CommandError) as e:
            h.cmd("scale", "3")
        assert e.value.kind == Kind.BUSY
        await trio.sleep(0.5)
        n.cancel_scope.cancel()  # "killed" while the instances are still stopping
    assert h.store.get_service("web").deleting
    engine = h.local()
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        with trio.fail_after(60):
            while "web" in engine.services:
                await trio.sleep(0.1)
        assert h.rt.running("web") == [] and h.store.get_service("web") is None
        assert h.store.list_instances("web") == [] and h.store.get_file("web") is not None
        cluster = engine.events.current(CLUSTER).decode()
        assert "deleting web by uid=0" in cluster and "deleted web" in cluster
        assert engine.command("web", "apply", None, "uid=0").startswith("ok deployed")  # the name is free again
        n.cancel_scope.cancel()


async def test_a_rollback_gives_the_router_back_the_port_of_the_version_it_restores(tmp_path, autojump_clock):
    # newcomer pass: a failed release that dropped the `port` line took the listener with it, and
    # `rollback` to the version with the port said done while nothing listened on it
    from deployfs.control.engine import NullRouter

    class PortRouter(NullRouter):
        port: int | None = None

        def set_backends(self, service, port, backends, weights=None, *, protocol="tcp"):  # type: ignore[no-untyped-def]
            self.port = port

    h, router = Harness(tmp_path), PortRouter()
    h.local(router=router)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await deploy_v1(h, port=8080)
        assert router.port == 8080
        h.prober.behaviour[h.write(manifest(image="/bin/v2"))] = "exit"  # no port line
        h.cmd("apply")
        with trio.fail_after(30):
            assert (await h.settle()).startswith("failed")
        h.cmd("rollback")
        with trio.fail_after(30):
            assert (await h.settle()).startswith("done")
        assert router.port == 8080
        n.cancel_scope.cancel()
