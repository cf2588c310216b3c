"""The etcd client (deployfs/state/etcd.py) against a real etcd member: the wire format
(base64 bytes, int64 strings), transactions, watches that resume, compaction, leases."""

from __future__ import annotations

import errno
import socket

import pytest
import trio

from deployfs.model.errors import Error, Kind
from deployfs.serve.fuse import ERRNO
from deployfs.state.etcd import Compare, Delete, EtcdClient, Get, Put, Unavailable, WatchEvent, prefix_end
from deployfs.state.kv import Compacted, LeaseNotFound
from tests.etcd import Cluster, etcd1  # noqa: F401  (fixture)

_n = 0


@pytest.fixture
async def client(etcd1: Cluster):  # noqa: F811
    async with EtcdClient(etcd1.urls) as c:
        yield c


@pytest.fixture
def ns() -> bytes:
    """A key prefix of this test's own: tests share one member."""
    global _n
    _n += 1
    return f"/client-test-{_n}/".encode()


async def take(w, n: int, timeout: float = 5.0) -> list[WatchEvent]:
    """The next n events (whole revisions: never stops inside one)."""
    got: list[WatchEvent] = []
    with trio.fail_after(timeout):
        async for events in w:
            assert len({e.revision for e in events}) == 1, events
            got.extend(events)
            if len(got) >= n:
                break
    return got


def test_prefix_end():
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"
    assert prefix_end(b"") == b"\0"


async def test_nobody_listening_is_unavailable_within_the_timeout():
    with socket.socket() as s:  # a port that is surely closed: bound, never listening
        s.bind(("127.0.0.1", 0))
        urls = [f"http://127.0.0.1:{s.getsockname()[1]}"] * 2
        async with EtcdClient(urls, timeout=0.5) as c:
            t0 = trio.current_time()
            with pytest.raises(Unavailable) as e:
                await c.put(b"k", b"v")
            assert trio.current_time() - t0 < 1.5
    # The front end's kind: EIO and "error: cluster store unreachable".
    assert isinstance(e.value, Error) and e.value.kind is Kind.UNAVAILABLE
    assert ERRNO[e.value.kind] == errno.EIO
    assert e.value.message == "cluster store unreachable"
    assert "ConnectError" in str(e.value)


async def test_bytes_and_revisions_round_trip(client: EtcdClient, ns: bytes):
    blob = bytes(range(256))
    r1 = await client.put(ns + b"\xff\x00key", blob)
    assert isinstance(r1, int) and r1 > 1
    got = await client.get(ns + b"\xff\x00key")
    assert got is not None and (got.value, got.mod_revision, got.create_revision, got.version) == (blob, r1, r1, 1)
    r2 = await client.put(ns + b"b", b"")
    listed = await client.range(ns, prefix=True)
    assert [kv.key for kv in listed.kvs] == [ns + b"b", ns + b"\xff\x00key"] and listed.revision == r2
    assert listed.kvs[0].value == b""
    assert await client.get(ns + b"absent") is None
    assert await client.delete(ns, prefix=True) == (2, r2 + 1)


async def test_txn_compares_and_reads(client: EtcdClient, ns: bytes):
    k = ns + b"lock"
    t = await client.txn([Compare(k, "MOD", "EQUAL", 0)], [Put(k, b"me"), Get(ns, prefix=True)], [Get(k)])
    assert t.succeeded and [kv.value for kv in t.reads[1]] == [b"me"]
    t2 = await client.txn([Compare(k, "MOD", "EQUAL", 0)], [Put(k, b"you")], [Get(k)])
    assert not t2.succeeded and t2.revision == t.revision  # nothing written, no revision taken
    assert t2.reads[0][0].value == b"me"
    t3 = await client.txn([Compare(k, "VALUE", "EQUAL", b"me")], [Delete(k)])
    assert t3.succeeded and await client.get(k) is None


async def test_watch_resumes_after_a_broken_stream_with_nothing_lost_or_repeated(client: EtcdClient, ns: bytes):
    start = await client.put(ns + b"0", b"0")
    async with client.watch(ns, prefix=True, start_revision=start) as w:
        assert [e.kv.key for e in await take(w, 1)] == [ns + b"0"]
        t = await client.txn([], [Put(ns + b"1", b"1"), Put(ns + b"2", b"2")])
        await w.aclose()  # the stream breaks (as when its member dies) ...
        await client.put(ns + b"3", b"3")  # ... and a write comes while there is none
        got = await take(w, 3)
        assert [(e.type, e.kv.key) for e in got] == [("PUT", ns + b"1"), ("PUT", ns + b"2"), ("PUT", ns + b"3")]
        assert [e.revision for e in got[:2]] == [t.revision] * 2
        assert w.reconnects == 0  # a close is not a failure; the next read simply opens anew
        await client.delete(ns + b"1")
        [gone] = await take(w, 1)
        assert (gone.type, gone.kv.key, gone.kv.value) == ("DELETE", ns + b"1", b"")
        # A read cancelled halfway ends its stream; the next read resumes where it was.
        with trio.move_on_after(0.05):
            await w.__anext__()
        await client.put(ns + b"4", b"4")
        assert [e.kv.key for e in await take(w, 1)] == [ns + b"4"]


async def test_watch_from_now_sees_the_next_write(client: EtcdClient, ns: bytes):
    await client.put(ns + b"k", b"old")
    async with client.watch(ns + b"k") as w:
        r = await client.put(ns + b"k", b"new")
        [e] = await take(w, 1)
        assert (e.kv.value, e.revision) == (b"new", r)


async def test_compacted_revision_read_and_watch(client: EtcdClient, ns: bytes):
    old = await client.put(ns + b"c", b"1")
    now = await client.put(ns + b"c", b"2")
    await client.compact(now)
    with pytest.raises(Compacted):
        await client.range(ns + b"c", revision=old)
    with pytest.raises(Compacted) as e:
        async with client.watch(ns + b"c", start_revision=old) as w:
            await take(w, 1)
    assert e.value.compact_revision == now


async def test_lease_kept_alive_past_its_ttl_then_revoked(client: EtcdClient, ns: bytes):
    lease, ttl = await client.lease_grant(0.5)
    assert ttl == 1  # whole seconds, at least etcd's minimum (1 s with the tests' short raft timings)
    await client.put(ns + b"node", b"alive", lease=lease)
    with trio.move_on_after(ttl * 1.5):
        await client.keep_alive(lease, ttl)  # one POST every ttl/3
    assert (await client.get(ns + b"node")) is not None and await client.lease_ttl(lease) >= 0
    await client.lease_revoke(lease)
    assert await client.get(ns + b"node") is None and await client.lease_ttl(lease) == -1
    with pytest.raises(LeaseNotFound):
        await client.lease_keepalive(lease)
    with pytest.raises(LeaseNotFound):
        await client.keep_alive(lease, ttl)
    with pytest.raises(LeaseNotFound):
        await client.put(ns + b"node", b"again", lease=lease)
    await client.lease_revoke(lease)  # gone already: no error
