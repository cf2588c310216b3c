"""The engine's Store over a cluster's store (state/clusterstore.py), on the SQLite KV.

The KV is real (the same contract as etcd: tests/state/conformance.py); only an outage is
simulated, by a wrapper that answers Unavailable as the etcd client does.
"""

from __future__ import annotations

import pytest
import trio

from deployfs.state import clusterstore
from deployfs.state.cache import Cache
from deployfs.state.clusterstore import ClusterStore, Deposed, _split
from deployfs.state.etcd import Unavailable
from deployfs.state.kv import Compare, Delete, Put
from deployfs.state.records import InstanceRecord, ServiceRecord, decode, encode, instance_key, service_key
from deployfs.state.sqlitekv import open_sqlite


class Flaky:
    """The KV, answering Unavailable to transactions while ``down``."""

    def __init__(self, kv) -> None:
        self.kv, self.down = kv, False

    def __getattr__(self, name):
        return getattr(self.kv, name)

    async def txn(self, compares, ops):
        if self.down:
            await trio.sleep(0.1)
            raise Unavailable("no member answered")
        return await self.kv.txn(compares, ops)


@pytest.fixture
async def kv(tmp_path):
    async with open_sqlite(str(tmp_path / "kv.db")) as s:
        yield Flaky(s)


async def started(nursery, kv, **kw) -> ClusterStore:
    cache = Cache(kv, "")
    await nursery.start(cache.run)
    store = ClusterStore(kv, cache, **kw)
    nursery.start_soon(store.run)
    return store


async def test_writes_read_back_at_once_and_commit_in_order(kv):
    async with trio.open_nursery() as n:
        store = await started(n, kv)
        told: list[str] = []
        with store.transaction():
            store.put_service(ServiceRecord("web", replicas=2))
            store.after_commit(lambda: told.append("first"))
        store.put_service(ServiceRecord("web", replicas=3))
        store.after_commit(lambda: told.append("second"))
        assert store.get_service("web").replicas == 3  # its own writes, before etcd has them
        assert (await kv.get(service_key("web"))).kv is None or told == []
        await store.settled()
        assert told == ["first", "second"]
        assert decode(ServiceRecord, (await kv.get(service_key("web"))).kv.value).replicas == 3
        assert store.last_revision == (await kv.get(service_key("web"))).kv.mod_revision
        n.cancel_scope.cancel()


async def test_the_controllers_fields_merge_over_the_agents_written_meanwhile(kv):
    key = instance_key("web", 1)
    await kv.put(key, encode(InstanceRecord("web", 1, 0, "v1", desired="run", pid=None)))
    async with trio.open_nursery() as n:
        store = await started(n, kv)
        await store.main.wait_for((await kv.get(key)).revision)
        rec = store.get_instance("web", 1)
        rec.desired = "drain"
        store.put_instance_fields(rec, ("desired",))
        # The agent writes its own field before the controller's write is sent:
        await kv.kv.put(key, encode(InstanceRecord("web", 1, 0, "v1", desired="run", pid=42)))
        await store.settled()
        now = decode(InstanceRecord, (await kv.get(key)).kv.value)
        assert (now.desired, now.pid) == ("drain", 42)  # neither write lost
        n.cancel_scope.cancel()


async def test_a_deposed_controller_writes_nothing(kv):
    rev = await kv.put("leader", b"n1")
    async with trio.open_nursery() as n:
        cache = Cache(kv, "")
        await n.start(cache.run)
        store = ClusterStore(kv, cache, fence=lambda: [Compare("leader", rev)])
        await kv.put("leader", b"n2")  # another node leads now
        store.put_service(ServiceRecord("web", replicas=9))
        with pytest.raises(Deposed):
            await store.run()
        n.cancel_scope.cancel()
    assert (await kv.get(service_key("web"))).kv is None
    assert store.deposed.is_set()
    with pytest.raises(Unavailable):
        with store.transaction(refuse_when_full=True):
            pass


async def test_unreachable_refuses_what_is_asked_and_keeps_what_happened(kv, autojump_clock):
    async with trio.open_nursery() as n:
        keepalives: list[str | None] = [None]  # what the node's lease keepalives last found
        view = await started(n, kv, give_up=True, health=lambda: keepalives[-1])
        kv.down = True
        view.put_file("web", b"image a\n")  # asked for, then the store goes away
        with pytest.raises(Unavailable):
            await view.settled()  # given up after GIVE_UP: the writer was answered EIO
        assert view.get_file("web") is None
        keepalives.append("no member answered")
        with pytest.raises(Unavailable, match="cluster store unreachable"):
            view.put_file("web", b"image b\n")  # refused at once while known unreachable
        controller = await started(n, kv)
        controller.put_service(ServiceRecord("web", replicas=1))
        controller.put_service(ServiceRecord("api", replicas=1))
        await trio.sleep(10)
        assert controller.get_service("api") is not None  # kept in memory, in order, never dropped
        kv.down = False
        await controller.settled()
        assert (await kv.get(service_key("api"))).kv is not None and controller.unreachable is None
        assert (await kv.get("manifests/web")).kv is None  # the refused and the given-up: nothing
        n.cancel_scope.cancel()


@pytest.mark.parametrize("ops, txns", [
    ([Put("a", b"1"), Put("a", b"2")], [[Put("a", b"2")]]),  # etcd names a key once per transaction
    ([Put("a/1", b""), Delete("a/", prefix=True)], [[Delete("a/", prefix=True)]]),
    ([Delete("a/", prefix=True), Put("a/1", b"")], [[Delete("a/", prefix=True)], [Put("a/1", b"")]]),
    ([Put(f"k{i}", b"") for i in range(130)], [[Put(f"k{i}", b"") for i in range(128)],
                                               [Put("k128", b""), Put("k129", b"")]]),
])
def test_a_transaction_is_split_where_etcd_needs(ops, txns):
    assert _split(ops) == txns
