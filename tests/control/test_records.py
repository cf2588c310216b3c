"""Everything needed to carry on is in the records (issue 12 item 2): a server started on the
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
    h.engine = Engine(h.store, h.rt, h.prober)


async def test_the_restart_budget_carries_on_across_a_restart_of_deployfs(tmp_path, autojump_clock, wall):
    h = Harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.engine.run)
        await deploy_v1(h, replicas=1, max_restarts=2)
        for restarts in (1, 2):  # two crashes, two restarts: the budget is spent
            h.rt.procs[h.svc.by_slot()[0].rec.pid].exit(1)
            await trio.sleep(5)
            assert h.svc.by_slot()[0].rec.restarts == restarts
        await restarted(h, n.cancel_scope, down=1)
    [rec] = h.store.list_instances("web")
    assert len(rec.restart_times) == 2 and rec.phase == "ready"
    async with trio.open_nursery() as n:
        await n.start(h.engine.run)
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
        await n.start(h.engine.run)
        await deploy_v1(h, replicas=2)
        v2 = h.write(manifest(image="/bin/v2", replicas=2, update_pause=30))
        h.cmd("apply")
        with trio.fail_after(10):  # the first batch is done: the pause runs
            while h.store.get_service("web").batch_ended in (None, 0.0):
                await trio.sleep(0.1)
        ended = trio.current_time()
        await restarted(h, n.cancel_scope, down=5)
    async with trio.open_nursery() as n:
        await n.start(h.engine.run)
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
    h.engine = Engine(h.store, h.rt, h.prober, node="n7")
    async with trio.open_nursery() as n:
        await n.start(h.engine.run)
        await deploy_v1(h, replicas=2)
        assert [r.node for r in h.store.list_instances("web")] == ["n7", "n7"]
        n.cancel_scope.cancel()
