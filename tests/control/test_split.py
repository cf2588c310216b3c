"""The controller and the node agent meet only in the store."""

import ast
import pathlib

import trio

from deployfs.control import engine as engine_module
from deployfs.node.agent import NodeAgent
from tests.control.harness import Harness, manifest

PROCESS_CALLS = {"start", "stop", "adopt", "find_unrecorded", "sweep", "prune", "bound_log", "probe", "wait"}


def test_the_engine_never_touches_a_process():
    """No process handle, no runtime start/stop/adopt, no prober: those are the agent's."""
    tree = ast.parse(pathlib.Path(engine_module.__file__).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    bad = [ast.unparse(c.func) for c in calls if c.func.attr in PROCESS_CALLS
           and any(name in ast.unparse(c.func.value) for name in ("runtime", "prober", "proc"))]
    assert bad == []
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not imported & {"Process", "StartError", "launch_spec", "find_strays", "MARKER"}


async def test_an_agent_acts_only_on_its_nodes_records(tmp_path, autojump_clock):
    """The engine places its instances on node b while its own agent is node a's: nothing runs
    until an agent for b, on the same store and called by nobody, picks the intents up."""
    h = Harness(tmp_path)
    h.local(node="b")
    h.node.agent = NodeAgent(h.store.records, h.rt, "a", prober=h.prober, events=h.engine.events)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        h.write(manifest(replicas=2))
        h.cmd("apply")
        await trio.sleep(5)
        recs = h.store.list_instances("web")
        assert [(r.node, r.desired, r.pid) for r in recs] == [("b", "run", None)] * 2
        assert h.rt.running("web") == [] and h.svc.outcome() is None
        await n.start(NodeAgent(h.store.records, h.rt, "b", prober=h.prober, events=h.engine.events).run)
        assert (await h.settle()).startswith("done")
        assert len(h.rt.running("web")) == 2
        assert all(r.state == "running" and r.health == "healthy" for r in h.store.list_instances("web"))
        n.cancel_scope.cancel()


async def test_records_of_a_deployfs_before_the_agent_are_adopted_not_restarted(tmp_path, autojump_clock):
    """desired "" (and node "" from before nodes): the engine gives them the intent it acted on."""
    from deployfs.model.manifest import parse
    from deployfs.node.agent import launch_spec
    from deployfs.state.store import InstanceRecord, ServiceRecord

    h = Harness(tmp_path)
    text = manifest(replicas=1).decode()
    m = parse(text, name="web").manifest
    h.store.put_version("web", m.version, text)
    h.store.put_service(ServiceRecord("web", version=m.version, manifest=text, replicas=1, good_version=m.version,
                                      good_manifest=text))
    rec = InstanceRecord("web", 1, 0, m.version, node="", state="running", health="healthy", phase="ready")
    proc = h.rt.start(launch_spec(m, rec, None))
    rec.pid, rec.start_time = proc.pid, proc.start_time
    h.store.put_instance(rec)
    await trio.sleep(1)  # (the fake prober calls a process younger than ready_after not listening yet)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        await trio.sleep(3)
        assert [p.pid for p in h.rt.running("web")] == [proc.pid], h.events()  # adopted, never started again
        now = h.store.list_instances("web")[0]
        assert (now.desired, now.node, now.incarnation, now.pid) == ("run", h.engine.node, 0, proc.pid)
        assert f"instance 0 adopted pid={proc.pid}" in h.events()
        assert h.svc.health() == "healthy"
        n.cancel_scope.cancel()
