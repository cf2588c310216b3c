"""A node cut off past its TTL, then back, with real processes: the engine, the real runtime and
probes, and two node agents on one store (n2's is the one that goes silent, its processes running
on, as behind a partition or under SIGSTOP).  Its instances are replaced on n1 by processes that
really pass their health check; when n2 is back, a new agent on that machine adopts its old
processes by pid and stops them, and their records go."""

import os
import sys

import trio

from deployfs.node.agent import NodeAgent
from deployfs.node.health import Probes
from deployfs.node.runtime import LocalRuntime
from deployfs.serve.local import LocalNode
from deployfs.state.records import INSTANCES
from deployfs.state.store import NodeRecord, SqliteStore
from tests.mount import SERVICE

# Test ports 21200-21299: n1's instances in the first half, n2's in the second.
N1_PORTS, N2_PORTS = (21200, 21249), (21250, 21299)
MANIFEST = (f"image {sys.executable}\nargs {SERVICE} --port $PORT --bind $ADDRESS\nreplicas 2\nport 21199\n"
            "health http://$ADDRESS:$PORT/healthz\nhealth_interval 0.1\nhealth_timeout 0.5\nhealth_retries 2\n"
            "update_deadline 10\ndrain_timeout 0.2\nstop_timeout 5\n")


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def until(pred, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


async def test_a_node_cut_off_is_replaced_then_stops_its_processes_when_back(tmp_path):
    state = str(tmp_path / "state")
    store, probes = SqliteStore(state), Probes()
    here = LocalNode(store, LocalRuntime(state, ports=N1_PORTS), probes, state_dir=state, node="n1",
                     address="127.0.1.1")
    engine = here.engine
    up = {"n1", "n2"}
    try:
        async with trio.open_nursery() as n:
            await n.start(here.run)

            async def n2_agent(task_status=trio.TASK_STATUS_IGNORED) -> None:
                agent = NodeAgent(store.records, LocalRuntime(state, ports=N2_PORTS), "n2", prober=probes,
                                  events=engine.events, cache=store.cache(INSTANCES))
                await agent.run(task_status=task_status)

            scope = trio.CancelScope()

            async def n2_until_cut_off(task_status=trio.TASK_STATUS_IGNORED) -> None:
                with scope:
                    await n2_agent(task_status=task_status)
            await n.start(n2_until_cut_off)
            engine.nodes.put(NodeRecord("n2", "127.0.1.2"))
            engine.nodes.alive = lambda name: name in up
            engine.liveness_changed()
            try:
                store.put_file("web", MANIFEST.encode())
                engine.command("web", "apply", None, "uid=0")
                svc = engine.services["web"]
                await until(lambda: (svc.outcome() or "").startswith("done"), 20)
                stale = [i.rec.pid for i in svc.instances.values() if i.rec.node == "n2"]
                assert len(stale) == 1 and running(stale[0])

                scope.cancel()  # n2 goes silent; its process runs on
                up.discard("n2")
                engine.liveness_changed()
                await until(lambda: len(svc.endpoints()) == 2 and all(
                    i.rec.node == "n1" for i in svc.instances.values()), 20)
                assert running(stale[0])  # nobody there to stop it yet
                assert "instance 1 replaces 1 (node n2 down)" in engine.events.current("web").decode()

                up.add("n2")  # back: a new agent on that machine
                await n.start(n2_agent)
                engine.liveness_changed()
                await until(lambda: not svc.lost, 20)
                await until(lambda: not running(stale[0]), 10)
                assert len(store.list_instances("web")) == 2 and len(svc.endpoints()) == 2
            finally:
                with trio.CancelScope(shield=True), trio.fail_after(30):
                    await here.shutdown()
                n.cancel_scope.cancel()
    finally:
        await probes.aclose()
        store.close()
        for pid in [p for p in locals().get("stale", []) if p and running(p)]:
            os.kill(pid, 9)
