"""`drain NODE` under wrk load through the built-in router, with real instances: no request fails.

One machine has one live node, so the second node here is a record the test marks alive (in a
cluster, liveness comes from the node's lease in etcd) with a node agent of its own on the same
store; its instances are real processes that listen on its own address (127.0.1.2: all of 127/8
is loopback), reached there by the router.
Everything else is what `deployfs serve` runs: the engine, the runtime, the probes, the router.
"""

import sys

import trio

from deployfs.control.engine import Engine
from deployfs.serve.local import LocalNode
from deployfs.node.agent import NodeAgent
from deployfs.node.health import Probes
from deployfs.node.runtime import LocalRuntime
from deployfs.state.records import INSTANCES
from deployfs.state.store import NodeRecord, SqliteStore
from deployfs.traffic.router_client import RouterClient
from tests.load import Load, probe
from tests.mount import SERVICE

PORT = 20910
URL = f"http://127.0.0.1:{PORT}/"
MANIFEST = (f"image {sys.executable}\nargs {SERVICE} --port $PORT --bind $ADDRESS\nreplicas 4\nport {PORT}\n"
            "health http://$ADDRESS:$PORT/healthz\nhealth_interval 0.2\nhealth_timeout 0.5\nhealth_retries 2\n"
            "update_deadline 10\ndrain_timeout 1\nstop_timeout 5\n")


def placed(engine: Engine) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in engine.services["web"].instances.values():
        if not i.leaving:
            out[i.rec.node] = out.get(i.rec.node, 0) + 1
    return out


async def until(pred, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


async def drain_under_load(engine: Engine, store: SqliteStore) -> None:
    engine.nodes.put(NodeRecord("n2", "127.0.1.2"))
    engine.nodes.alive = lambda name: name in ("n1", "n2")
    store.put_file("web", MANIFEST.encode())
    engine.command("web", "apply", None, "uid=0")
    svc = engine.services["web"]
    await until(lambda: svc.outcome() is not None and svc.outcome().startswith("done"), 30)
    assert placed(engine) == {"n1": 2, "n2": 2}  # spread first
    await until(lambda: probe(URL), 10)

    load = Load(URL)
    try:
        await trio.sleep(0.5)
        assert engine.command("n2", "drain", None, "uid=0") == "ok draining 2 instances"
        assert svc.outcome() is None  # `wait` follows the move
        await until(lambda: svc.outcome() is not None and "n2" not in placed(engine)
                    and engine.nodes.status().node("n2").state == "cordoned", 60)
        await trio.sleep(0.5)
    finally:
        result = await trio.to_thread.run_sync(load.stop)
    print(f"\ndrain under load: {result}")
    assert result.requests > 200 and result.failed == 0, result.output
    assert placed(engine) == {"n1": 4} and svc.outcome().startswith("done")
    assert {i.rec.address for i in svc.instances.values()} == {"127.0.1.1"}
    assert "node n2 drained: no instances left there; it stays cordoned" in engine.events.current("").decode()


async def test_drain_moves_every_instance_and_no_request_fails(tmp_path):
    state = str(tmp_path / "state")
    store, probes = SqliteStore(state), Probes()
    router = RouterClient(state)
    here = LocalNode(store, LocalRuntime(state), probes, router=router, state_dir=state, node="n1",
                     address="127.0.1.1")
    engine = here.engine
    await router.start()
    try:
        async with trio.open_nursery() as n:
            await n.start(router.run)
            await n.start(here.run)
            # n2's agent: it runs what the engine places on n2 (n1's agent runs n1's). Its own
            # port range: each node's agent gives its instances ports (docs/architecture.md "Ports").
            n2 = NodeAgent(store.records, LocalRuntime(state, ports=(20750, 20799)), "n2", prober=probes, events=engine.events,
                           cache=store.cache(INSTANCES))
            await n.start(n2.run)
            try:
                await drain_under_load(engine, store)
            finally:  # every instance and the router go, whatever failed
                with trio.CancelScope(shield=True), trio.fail_after(60):
                    await here.shutdown()
                    await router.quit()
                n.cancel_scope.cancel()
    finally:
        await probes.aclose()
        store.close()
