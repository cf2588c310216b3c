"""Everything needed to carry on is in the records: a server started on the
same state goes on where the last one was, with nothing that lived only in its memory.
Fake runtime, MockClock; the wall clock follows the mock clock."""

import types

import pytest
import trio

from deployfs.control import engine as engine_module
from deployfs.control.engine import Engine
from tests.control.harness import Harness, deploy_v1, manifest


@pytest.fixture
def wall(monkeypatch):
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(time=lambda: 1.8e9 + trio.current_time()))


async def restarted(h: Harness, nursery_scope: trio.CancelScope, down: float) -> None:
    """deployfs is killed (its instances live on) and started again ``down`` seconds later."""
    nursery_scope.cancel()
    await trio.sleep(down)
    h.local()


async def test_the_restart_budget_carries_on_across_a_restart_of_deployfs(tmp_path, autojump_clock, wall):
    h = Harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await deploy_v1(h, replicas=1, max_restarts=2)
        for restarts in (1, 2):  # two crashes, two restarts: the budget is spent
            h.rt.procs[h.svc.by_slot()[0].rec.pid].exit(1)
            await trio.sleep(5)
            assert h.svc.by_slot()[0].rec.restarts == restarts
        await restarted(h, n.cancel_scope, down=1)
    [rec] = h.store.list_instances("web")
    assert len(rec.restart_times) == 2 and rec.phase == "ready"
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        inst = h.svc.by_slot()[0]
        assert len(inst.restart_times) == 2  # from the records, on the trio clock
        h.rt.procs[inst.rec.pid].exit(1)  # the third crash within the window: given up, not restarted
        await trio.sleep(5)
        assert inst.rec.state == "failed" and inst.rec.restarts == 2
        assert any("giving up" in e for e in h.events())
        n.cancel_scope.cancel()


async def test_a_pause_between_batches_carries_on_across_a_restart_of_deployfs(tmp_path, autojump_clock, wall):
    h = Harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await deploy_v1(h, replicas=2)
        v2 = h.write(manifest(image="/bin/v2", replicas=2, update_pause=30))
        h.cmd("apply")
        with trio.fail_after(10):  # the first batch is done: the pause runs
            while h.store.get_service("web").batch_ended in (None, 0.0):
                await trio.sleep(0.1)
        ended = trio.current_time()
        await restarted(h, n.cancel_scope, down=5)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        assert await h.settle() == f"done {v2}"
        n.cancel_scope.cancel()
    second = max(p.started for p in h.rt.procs.values() if p.version == v2)
    # The second batch waited out the pause from when the first ended, not from the restart
    # (and not "no pause" either, which is what a server that forgot the boundary did).
    assert ended + 29 <= second <= ended + 31, (ended, second)


async def test_an_instance_record_says_where_it_runs(h, autojump_clock):
    await deploy_v1(h, replicas=2, port=18999)
    recs = h.store.list_instances("web")
    assert [(r.node, r.address) for r in recs] == [(engine_module.NODE, "127.0.0.1")] * 2
    assert sorted(h.svc.endpoints()) == sorted(("127.0.0.1", r.port) for r in recs)


async def test_the_node_is_the_engines_own(tmp_path, autojump_clock):
    """--node in a cluster: the records name the node the engine was given, not this host's name."""
    h = Harness(tmp_path)
    h.local(node="n7")
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await deploy_v1(h, replicas=2)
        assert [r.node for r in h.store.list_instances("web")] == ["n7", "n7"]
        n.cancel_scope.cancel()


def _two_nodes(h: Harness) -> Engine:
    """An engine on node n1 that takes n2 (run by a node agent of its own) for alive."""
    e = h.local(node="n1", address="127.0.1.1")
    e.nodes.alive = lambda name: name in ("n1", "n2")
    return e


async def test_a_drain_carries_on_across_a_restart_of_deployfs_never_below_replicas(tmp_path, autojump_clock, wall):
    """`update replace` would stop every old instance first: a drain moves them the rolling way,
    and a server started mid-drain knows it is one from the records (the node's, each instance's)."""
    from deployfs.node.agent import NodeAgent
    from deployfs.state.records import INSTANCES
    from deployfs.state.store import NodeRecord
    from tests.control.harness import watch

    h = Harness(tmp_path)
    async with trio.open_nursery() as outer:  # the other node's agent lives on through the restart
        h.store.put_node(NodeRecord("n2", "127.0.1.2"))
        outer.start_soon(NodeAgent(h.store.records, h.rt, "n2", prober=h.prober,
                                   cache=h.store.cache(INSTANCES)).run)
        h.engine = _two_nodes(h)
        async with trio.open_nursery() as n:
            await n.start(h.node.run)
            v1 = await deploy_v1(h, replicas=4, update="replace")
            assert sorted(i.rec.node for i in h.svc.instances.values()) == ["n1", "n1", "n2", "n2"]
            assert h.engine.command("n2", "drain", None, "uid=0") == "ok draining 2 instances"
            n.cancel_scope.cancel()  # killed before it moved anything
        h.engine = _two_nodes(h)
        seen = watch(h, replicas=4)
        async with trio.open_nursery() as n:
            await n.start(h.node.run)
            assert h.svc.target().strategy == "rolling"
            assert await h.settle() == f"done {v1}"
            assert sorted(i.rec.node for i in h.svc.instances.values()) == ["n1"] * 4
            assert seen["min_ready"] is not None and seen["min_ready"] >= 4, seen
            assert any(e.startswith(f"move off node n2 complete: {v1}") for e in h.events())
            assert [r.draining for r in h.store.list_nodes() if r.name == "n2"] == [False]
            n.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def test_a_paused_canary_keeps_its_auto_promote_clock_across_a_restart(tmp_path, autojump_clock, wall):
    """Paused 5 s into auto_promote 20, deployfs restarted, resumed: 15 s left, not none."""
    h = Harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await deploy_v1(h)
        h.write(manifest(image="/bin/v2", update="canary", auto_promote=20))
        h.cmd("apply")
        assert await h.settle() == "canary"
        await trio.sleep(5)
        h.cmd("pause")
        await restarted(h, n.cancel_scope, down=10)
    assert h.store.get_service("web").paused_at is not None
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await trio.sleep(20)  # longer than auto_promote: nothing promotes while paused
        assert h.svc.rec.canary_phase
        h.cmd("resume")
        assert h.store.get_service("web").paused_at is None
        resumed = trio.current_time()
        while h.svc.rec.canary_phase:
            await h.svc.wait_change()
        assert 14.9 <= trio.current_time() - resumed <= 16  # the 15 s left of 20
        n.cancel_scope.cancel()


def _running_record(h: Harness, **kw: object):
    """Service web (one replica, settled) and the record of its one running instance, as a
    deployfs killed at some moment left them; the process lives on."""
    from deployfs.model.manifest import parse
    from deployfs.node.agent import launch_spec
    from deployfs.state.store import InstanceRecord, ServiceRecord

    text = manifest(replicas=1, port=18999).decode()
    m = parse(text, name="web").manifest
    h.store.put_version("web", m.version, text)
    h.store.put_service(ServiceRecord("web", version=m.version, manifest=text, replicas=1, good_version=m.version,
                                      good_manifest=text))
    rec = InstanceRecord("web", 1, 0, m.version, port=20700, node=h.engine.node, state="running", desired="run",
                         **kw)  # type: ignore[arg-type]
    proc = h.rt.start(launch_spec(m, rec, None))
    rec.pid, rec.start_time = proc.pid, proc.start_time
    h.store.put_instance(rec)
    return rec


async def test_a_restart_in_flight_comes_back_busy_not_routed(tmp_path, autojump_clock, wall):
    """The engine asked for a fresh process (restarts 1) and died before the agent started it
    (incarnation 0): the old process is the one the agent now kills, never a ready backend."""
    h = Harness(tmp_path)
    rec = _running_record(h, health="healthy", phase="ready", restarts=1, incarnation=0)
    await trio.sleep(1)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        inst = h.svc.instances[rec.id]
        assert inst.busy and h.svc.endpoints() == [] and h.svc.progress() == (0, 1)
        with trio.fail_after(10):  # the agent starts the incarnation asked for; then it is ready again
            while inst.busy or inst.phase.value != "ready" or inst.rec.pid == rec.pid:
                await h.svc.wait_change()
        assert h.svc.endpoints() == [("127.0.0.1", 20700)]
        n.cancel_scope.cancel()


async def test_an_unhealthy_instance_comes_back_unhealthy_with_its_failing_streak(tmp_path, autojump_clock, wall):
    """What the view showed (unhealthy, failing since T) is what a server started again carries on from."""
    from deployfs.control.engine import _from_wall

    h = Harness(tmp_path)
    since = engine_module.time.time() - 3
    rec = _running_record(h, health="unhealthy", phase="unhealthy", why="http 503", restarts=0, incarnation=0,
                          first_bad=since)
    await trio.sleep(1)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        inst = h.svc.instances[rec.id]
        assert inst.phase.value == "unhealthy" and h.svc.health() == "unhealthy"
        assert inst.first_bad is not None and abs(inst.first_bad - _from_wall(since)) < 0.01
        n.cancel_scope.cancel()


async def test_a_server_started_under_another_node_name_takes_its_instances_on(tmp_path, autojump_clock):
    # One machine, restarted with another --node: the instances are this host's processes. Left under
    # the old name they were supervised by nobody (a kill went unnoticed, a restart hung in draining).
    h = Harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await deploy_v1(h, replicas=2)
        pids = sorted(i.rec.pid for i in h.svc.instances.values())
        n.cancel_scope.cancel()
    h.local(node="renamed")
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        assert {r.node for r in h.store.list_instances("web")} == {"renamed"}
        assert sorted(i.rec.pid for i in h.svc.instances.values()) == pids  # adopted, not restarted
        h.rt.procs[pids[0]].exit(1)  # supervised: the kill is seen and the instance restarted
        with trio.fail_after(10):
            while not any("restarting" in e for e in h.events()):
                await trio.sleep(0.1)
        h.cmd("restart")
        with trio.fail_after(30):
            while h.svc.rec.update_status != "none" or len(h.svc.instances) != 2:
                await trio.sleep(0.1)
        assert not set(pids) & {i.rec.pid for i in h.svc.instances.values()}
        n.cancel_scope.cancel()
