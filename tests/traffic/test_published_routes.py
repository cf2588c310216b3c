"""The routing table as records, followed by every node's router (traffic/published.py, follower.py).

Two nodes on one store, as a cluster has them on etcd: the engine publishes ``routes/web``;
each node's follower feeds it to that node's own built-in router (n1's on 127.0.2.1, n2's on
127.0.2.2, the same service port on both) and answers under ``routed/``.  Liveness is each
node's ``alive/<name>`` key under a lease of its own, as membership writes it in a cluster.
Real instances (examples/web.py, answering with their address), real routers, real wrk.
"""

import sys
import time
import urllib.request
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

from deployfs.control.engine import Engine
from deployfs.node.agent import NodeAgent
from deployfs.node.health import Probes
from deployfs.node.membership import ALIVE
from deployfs.node.runtime import LocalRuntime
from deployfs.serve.local import LocalNode
from deployfs.state.records import INSTANCES, RouteAck, decode, routed_key
from deployfs.state.store import NodeRecord, SqliteStore
from deployfs.traffic.follower import Follower
from deployfs.traffic.published import PublishedRouting
from deployfs.traffic.router_client import RouterClient
from tests.load import Load, probe
from tests.mount import SERVICE

PORT = 21000
ADDRESSES = {"n1": "127.0.2.1", "n2": "127.0.2.2"}
URLS = [f"http://{a}:{PORT}/" for a in ADDRESSES.values()]


def manifest(version: str, port: int = PORT) -> str:
    return (f"image {sys.executable}\nargs {SERVICE} --port $PORT --bind $ADDRESS --version {version}-$ADDRESS\n"
            f"replicas 2\nport {port}\nhealth http://$ADDRESS:$PORT/healthz\nhealth_interval 0.2\n"
            "health_timeout 0.5\nhealth_retries 2\nupdate_deadline 10\ndrain_timeout 1\nstop_timeout 5\n")


async def until(pred, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


def answers(url: str, n: int) -> list[str]:
    """``n`` requests, each on a fresh connection (the router picks a backend per connection)."""
    out = []
    for _ in range(n):
        with urllib.request.urlopen(url, timeout=2) as r:
            out.append(r.read().decode().split()[0])
    return out


class Two:
    def __init__(self, engine: Engine, store: SqliteStore, followers: dict[str, Follower],
                 leases: dict[str, int]) -> None:
        self.engine, self.store, self.followers, self.leases = engine, store, followers, leases
        # When each drain ended: the controller's (all routers), and each node router's own.
        self.drained: dict[tuple, float] = {}
        self.drained_here: dict[tuple, list[float]] = {}
        published = engine.router
        drain = published.drain

        async def timed(service, backend, timeout):
            left = await drain(service, backend, timeout)
            self.drained[backend] = time.monotonic()
            return left
        published.drain = timed
        for f in followers.values():
            self._time_local(f)

    def _time_local(self, f: Follower) -> None:
        drain = f.router.drain

        async def timed(service, backend, timeout):
            left = await drain(service, backend, timeout)
            self.drained_here.setdefault(backend, []).append(time.monotonic())
            return left
        f.router.drain = timed

    def done(self) -> bool:
        o = self.engine.services["web"].outcome()
        return o is not None and o.startswith("done")

    def placed(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in self.engine.services["web"].instances.values():
            if not i.leaving:
                out[i.rec.node] = out.get(i.rec.node, 0) + 1
        return out


@asynccontextmanager
async def two_nodes(tmp_path) -> AsyncIterator[Two]:
    state = str(tmp_path / "state")
    store, probes = SqliteStore(state), Probes()
    for n in ADDRESSES:  # each node's router its own directory (its socket, pid file, log)
        (tmp_path / f"router-{n}").mkdir(mode=0o700)
    routers = {n: RouterClient(str(tmp_path / f"router-{n}"), bind=a) for n, a in ADDRESSES.items()}
    caches = {n: store.cache() for n in ADDRESSES}  # each node its own copy of the records

    def liveness(node: str):
        return lambda name: caches[node].get(ALIVE + name) is not None
    followers = {n: Follower(caches[n], store.records, routers[n], n, alive=liveness(n), refresh_on=(ALIVE,))
                 for n in ADDRESSES}
    published = PublishedRouting(store, caches["n1"], followers["n1"], routers["n1"],
                                 nodes=lambda: [n for n in ADDRESSES if caches["n1"].get(ALIVE + n) is not None])
    here = LocalNode(store, LocalRuntime(state, ports=(21010, 21049)), probes, router=published, state_dir=state,
                     node="n1", address=ADDRESSES["n1"])
    engine = here.engine
    for r in routers.values():
        await r.start()
    try:
        async with trio.open_nursery() as n:
            for r in routers.values():
                await n.start(r.run)
            for c in caches.values():
                await n.start(c.run)
            leases = {}
            for name in ADDRESSES:
                lease = await store.records.grant(60)
                await store.records.put(ALIVE + name, b"", lease=lease.id)
                leases[name] = lease.id
            for f in followers.values():
                await n.start(f.run)
            await n.start(here.run)
            n2 = NodeAgent(store.records, LocalRuntime(state, ports=(21050, 21089)), "n2", prober=probes,
                           events=engine.events, cache=store.cache(INSTANCES))
            await n.start(n2.run)
            engine.nodes.put(NodeRecord("n2", ADDRESSES["n2"]))
            engine.nodes.alive = lambda name: name in ADDRESSES  # the controller is not told: routers act alone
            try:
                yield Two(engine, store, followers, leases)
            finally:  # every instance and router go, whatever failed
                with trio.CancelScope(shield=True), trio.fail_after(60):
                    await here.shutdown()
                    for r in routers.values():
                        await r.quit()
                n.cancel_scope.cancel()
    finally:
        await probes.aclose()
        store.close()


async def apply(two: Two, version: str, port: int = PORT) -> None:
    two.store.put_file("web", manifest(version, port).encode())
    two.engine.command("web", "apply", None, "uid=0")
    await until(lambda: two.engine.services["web"].outcome() is not None, 30)


async def test_rolling_update_across_nodes_fails_no_request_through_either_router(tmp_path):
    async with two_nodes(tmp_path) as two:
        await apply(two, "v1")
        assert two.done() and two.placed() == {"n1": 1, "n2": 1}
        await until(lambda: all(probe(u) for u in URLS), 10)
        # Both routers send to both nodes' instances.
        for url in URLS:
            assert set(await trio.to_thread.run_sync(answers, url, 8)) == {"v1-127.0.2.1", "v1-127.0.2.2"}
        writes = {"routes/": 0, "routed/": 0}  # what routing adds to the store's writes per rollout

        def count(changes):
            for c in changes:
                for prefix in writes:
                    writes[prefix] += c.kv.key.startswith(prefix)
        two.followers["n1"].cache.subscribe(count)
        loads = [Load(u, connections=4, threads=1) for u in URLS]
        try:
            await trio.sleep(0.3)
            await apply(two, "v2")
            assert two.done()
            svc = two.engine.services["web"]
            await until(lambda: all(i.rec.version == svc.rec.version for i in svc.instances.values()), 30)
            await trio.sleep(0.3)
        finally:
            results = [await trio.to_thread.run_sync(load.stop) for load in loads]
        print(f"\nrouting writes in a 2-instance rollout over 2 nodes: {writes}")
        for url, result in zip(URLS, results):
            print(f"\nrolling update through {url}: {result}")
            assert result.requests > 100 and result.failed == 0, result.output
        # Every old instance stopped only once both nodes' routers had drained it.
        assert len(two.drained) == 2
        for backend, at in two.drained.items():
            assert len(two.drained_here[backend]) == 2 and max(two.drained_here[backend]) <= at
        # Both routers send to the new instances, wherever placement put them, and only to them.
        now = {f"v2-{i.rec.address}" for i in two.engine.services["web"].instances.values()}
        print(f"placed after the update: {two.placed()}")
        for url in URLS:
            assert set(await trio.to_thread.run_sync(answers, url, 8)) == now
        # Each node answered for the table its router has, and drains nothing any more.
        rev = (await two.store.records.get("routes/web")).kvs[0].mod_revision
        for node in ADDRESSES:
            kv = await two.store.records.get(routed_key("web", node))
            ack = decode(RouteAck, kv.kvs[0].value)
            assert (ack.node, ack.revision, ack.draining, ack.error) == (node, rev, [], "")


async def test_a_node_down_leaves_every_router_at_once(tmp_path):
    async with two_nodes(tmp_path) as two:
        await apply(two, "v1")
        assert two.done() and two.placed() == {"n1": 1, "n2": 1}
        await until(lambda: all(probe(u) for u in URLS), 10)
        n2_backend = next(i.backend for i in two.engine.services["web"].instances.values() if i.rec.node == "n2")
        assert all(n2_backend in f.tables["web"][1] for f in two.followers.values())
        t0 = time.monotonic()
        await two.store.records.revoke(two.leases["n2"])  # its lease lapses: alive/n2 goes
        await until(lambda: all(n2_backend not in f.tables["web"][1] and f.routed("web", 0)
                                for f in two.followers.values()), 2)
        took = time.monotonic() - t0
        print(f"\nnode down -> out of both routers in {took * 1000:.0f} ms")
        # The controller did not act (it still counts n2 alive): the routers did, each on its own.
        assert two.placed() == {"n1": 1, "n2": 1}
        for url in URLS:
            assert set(await trio.to_thread.run_sync(answers, url, 10)) == {"v1-127.0.2.1"}


async def test_a_router_on_another_node_that_cannot_listen_fails_the_rollout(tmp_path):
    import socket
    held = socket.socket()
    held.bind((ADDRESSES["n2"], PORT + 1))  # another program has the port on n2 (only there)
    held.listen(1)
    try:
        async with two_nodes(tmp_path) as two:
            await apply(two, "v1", PORT + 1)
            outcome = two.engine.services["web"].outcome()
            assert outcome.startswith("failed") and "router: on node n2: cannot listen on 127.0.2.2" in outcome
            ack = decode(RouteAck, (await two.store.records.get(routed_key("web", "n2"))).kvs[0].value)
            assert "Address already in use" in ack.error
            assert (await two.store.records.get(routed_key("web", "n1"))).kvs[0].value and \
                probe(f"http://{ADDRESSES['n1']}:{PORT + 1}/")  # n1's router serves all the same
    finally:
        held.close()
