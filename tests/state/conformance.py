"""The store contract (deployfs.state.kv), as tests any implementation must pass.

Run it against an implementation by importing every test from here into a
test module that defines two fixtures::

    from tests.state.conformance import *  # noqa: F401,F403

    @pytest.fixture
    async def store():        # a KVStore with no keys in it (revisions need not start at 1)
        async with open_mine() as s:
            yield s

    @pytest.fixture
    def lease_ttl():          # a TTL the store grants as asked (default here: 2 s, etcd's minimum)
        return 0.3

Tests never assume absolute revisions, only their order, so one server may be
reused across tests once every key is deleted.  Lease tests take real time:
about three TTLs each.
"""

from __future__ import annotations

import pytest
import trio

from deployfs.state.kv import (Change, Compacted, Compare, Conflict, Delete, KVStore, LeaseNotFound, Put)

@pytest.fixture
def lease_ttl() -> float:
    return 2.0


async def next_revisions(revisions, n: int, timeout: float = 5.0) -> list[list[Change]]:
    """The next ``n`` items (revisions' changes) of a watch, or fail after ``timeout``."""
    got: list[list[Change]] = []
    with trio.fail_after(timeout):
        async for changes in revisions:
            assert changes and len({c.revision for c in changes}) == 1, f"not one revision's changes: {changes}"
            got.append(changes)
            if len(got) == n:
                break
    return got


async def next_changes(revisions, n: int, timeout: float = 5.0) -> list[Change]:
    """The next ``n`` changes of a watch (whole revisions: at least ``n``), or fail after ``timeout``."""
    got: list[Change] = []
    with trio.fail_after(timeout):
        async for changes in revisions:
            assert changes and len({c.revision for c in changes}) == 1, f"not one revision's changes: {changes}"
            got += changes
            if len(got) >= n:
                break
    return got


async def nothing_more(revisions, wait: float = 0.2) -> None:
    with trio.move_on_after(wait):
        c = await revisions.__anext__()
        raise AssertionError(f"an unexpected change: {c}")


def summary(changes: list[Change]) -> list[tuple[str, str, bytes]]:
    return [(c.kind, c.kv.key, c.kv.value) for c in changes]


# -- reads and writes ------------------------------------------------------------------


async def test_get_absent(store: KVStore):
    r = await store.get("nope")
    assert r.kv is None and r.kvs == [] and r.revision > 0


async def test_put_get_revisions(store: KVStore):
    r0 = (await store.get("a")).revision
    r1 = await store.put("a", b"one")
    assert r1 > r0
    a = (await store.get("a")).kv
    assert a is not None and (a.value, a.mod_revision, a.create_revision, a.lease) == (b"one", r1, r1, 0)
    r2 = await store.put("a", b"two")
    assert r2 > r1
    read = await store.get("a")
    assert read.revision == r2
    assert read.kv is not None and (read.kv.value, read.kv.mod_revision, read.kv.create_revision) == (b"two", r2, r1)
    # Another key's write moves the store's revision, not this key's.
    r3 = await store.put("b", b"")
    read = await store.get("a")
    assert read.revision == r3 and read.kv is not None and read.kv.mod_revision == r2


async def test_values_are_bytes(store: KVStore):
    blob = bytes(range(256)) * 4
    await store.put("blob", blob)
    assert (await store.get("blob")).kv.value == blob  # type: ignore[union-attr]
    await store.put("empty", b"")
    assert (await store.get("empty")).kv.value == b""  # type: ignore[union-attr]


async def test_range_is_a_prefix_sorted(store: KVStore):
    for k in ("svc/web", "svc/api", "svc/", "svcx", "sv", "inst/web/1", "svc/wéb"):
        await store.put(k, k.encode())
    r = await store.range("svc/")
    assert [kv.key for kv in r.kvs] == ["svc/", "svc/api", "svc/web", "svc/wéb"]
    assert r.revision == (await store.get("x")).revision
    everything = await store.range("")
    assert [kv.key for kv in everything.kvs] == sorted(["svc/web", "svc/api", "svc/", "svcx", "sv", "inst/web/1", "svc/wéb"],
                                                        key=str.encode)
    assert (await store.range("nothing/")).kvs == []


async def test_delete(store: KVStore):
    await store.put("a/1", b"")
    await store.put("a/2", b"")
    await store.put("b", b"")
    before = (await store.get("x")).revision
    assert await store.delete("absent") == before  # deleting nothing writes nothing
    r = await store.delete("a/", prefix=True)
    assert r > before
    assert [kv.key for kv in (await store.range("")).kvs] == ["b"]
    r2 = await store.delete("b")
    assert r2 > r and (await store.get("b")).kv is None
    # Created again: a new life, a new create_revision.
    r3 = await store.put("b", b"again")
    assert (await store.get("b")).kv.create_revision == r3  # type: ignore[union-attr]


# -- transactions -------------------------------------------------------------------------


async def test_txn_is_one_revision(store: KVStore):
    await store.put("gone", b"x")
    rev = await store.txn([], [Put("t/1", b"1"), Put("t/2", b"2"), Delete("gone")])
    r = await store.range("")
    assert [(kv.key, kv.mod_revision) for kv in r.kvs] == [("t/1", rev), ("t/2", rev)]
    assert r.revision == rev


async def test_txn_compare_and_conflict(store: KVStore):
    # Create only if absent.
    r1 = await store.txn([Compare("lock", 0)], [Put("lock", b"me")])
    with pytest.raises(Conflict):
        await store.txn([Compare("lock", 0)], [Put("lock", b"you"), Put("other", b"x")])
    assert (await store.get("lock")).kv.value == b"me"  # type: ignore[union-attr]
    assert (await store.get("other")).kv is None  # a failed transaction writes nothing
    assert (await store.get("x")).revision == r1  # and takes no revision
    # Update only if unchanged since read.
    r2 = await store.txn([Compare("lock", r1)], [Put("lock", b"me again")])
    with pytest.raises(Conflict):
        await store.txn([Compare("lock", r1)], [Delete("lock")])
    await store.txn([Compare("lock", r2), Compare("free", 0)], [Delete("lock")])
    assert (await store.get("lock")).kv is None
    with pytest.raises(Conflict):  # a key that is gone no longer has its old revision
        await store.txn([Compare("lock", r2)], [Put("lock", b"ghost")])


async def test_read_modify_write_with_retries(store: KVStore):
    """Optimistic concurrency: many writers, each retrying on Conflict, lose no increment."""
    await store.put("counter", b"0")

    async def bump() -> None:
        while True:
            kv = (await store.get("counter")).kv
            assert kv is not None
            await trio.sleep(0)  # let another writer in between the read and the write
            try:
                await store.txn([Compare("counter", kv.mod_revision)], [Put("counter", str(int(kv.value) + 1).encode())])
                return
            except Conflict:
                continue

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(bump)
    assert (await store.get("counter")).kv.value == b"10"  # type: ignore[union-attr]


# -- watches ----------------------------------------------------------------------------------


async def test_list_then_watch_misses_nothing(store: KVStore):
    await store.put("svc/a", b"1")
    listed = await store.range("svc/")
    r1 = await store.put("svc/b", b"2")
    await store.put("other", b"not mine")
    r2 = await store.txn([], [Put("svc/a", b"3"), Delete("svc/b")])
    async with store.watch("svc/", listed.revision + 1) as changes:
        first, second = await next_revisions(changes, 2)  # the write to "other" is not under svc/
        assert summary(first) == [("put", "svc/b", b"2")] and first[0].revision == r1
        assert summary(second) == [("put", "svc/a", b"3"), ("delete", "svc/b", b"")]
        assert [c.revision for c in second] == [r2, r2]
        assert first[0].kv.create_revision == r1
        # Then live, in order, only after commit.
        r3 = await store.put("svc/c", b"4")
        with pytest.raises(Conflict):
            await store.txn([Compare("svc/c", 0)], [Put("svc/d", b"never")])
        r4 = await store.delete("svc/", prefix=True)
        put, deletes = await next_revisions(changes, 2)
        assert summary(put) == [("put", "svc/c", b"4")] and put[0].revision == r3
        assert summary(deletes) == [("delete", "svc/a", b""), ("delete", "svc/c", b"")]
        assert deletes[0].revision == r4
        await nothing_more(changes)


async def test_watch_from_now(store: KVStore):
    await store.put("k", b"old")
    async with store.watch("k", 0) as changes:
        r = await store.put("k", b"new")
        [c] = await next_changes(changes, 1)
        assert (c.kind, c.kv.value, c.revision) == ("put", b"new", r)


async def test_watch_sees_a_write_made_while_it_waits(store: KVStore):
    start = (await store.get("x")).revision + 1
    got: list[Change] = []

    async def watch(task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with store.watch("w/", start) as changes:
            task_status.started()
            got.extend(await next_changes(changes, 2))

    async with trio.open_nursery() as n:
        await n.start(watch)
        await store.put("w/1", b"a")
        await trio.sleep(0.05)
        await store.put("w/2", b"b")
    assert summary(got) == [("put", "w/1", b"a"), ("put", "w/2", b"b")]


async def test_two_watchers_see_the_same_order(store: KVStore):
    start = (await store.get("x")).revision + 1
    seen: list[list[tuple[str, int]]] = [[], []]

    async def watch(i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with store.watch("", start) as changes:
            task_status.started()
            for c in await next_changes(changes, 20):
                seen[i].append((c.kv.key, c.revision))

    async def write(tag: str) -> None:
        for i in range(10):
            await store.put(f"{tag}{i % 3}", str(i).encode())

    async with trio.open_nursery() as n:
        await n.start(watch, 0)
        await n.start(watch, 1)
        n.start_soon(write, "x")
        n.start_soon(write, "y")
    assert seen[0] == seen[1]
    assert [r for _, r in seen[0]] == sorted(r for _, r in seen[0])


async def test_watch_from_a_compacted_revision_raises(store: KVStore):
    old = await store.put("c", b"1")
    await store.put("c", b"2")
    now = await store.put("c", b"3")
    await store.compact(now)
    with pytest.raises(Compacted) as e:
        async with store.watch("c", old) as changes:
            await next_changes(changes, 1)
    assert e.value.compact_revision >= now
    # The way out: list again, watch from there.
    r = await store.range("c")
    async with store.watch("c", r.revision + 1) as changes:
        await store.put("c", b"4")
        assert summary(await next_changes(changes, 1)) == [("put", "c", b"4")]


# -- leases -------------------------------------------------------------------------------------


async def test_lease_keys_vanish_on_expiry(store: KVStore, lease_ttl: float):
    lease = await store.grant(lease_ttl)
    assert lease.id != 0 and lease.ttl >= lease_ttl
    r = await store.txn([], [Put("node/n1", b"alive", lease.id), Put("node/keep", b"no lease")])
    kv = (await store.get("node/n1")).kv
    assert kv is not None and kv.lease == lease.id
    granted = trio.current_time()
    async with store.watch("node/", r + 1) as changes:
        [c] = await next_changes(changes, 1, timeout=lease.ttl * 2 + 3)
    gone_after = trio.current_time() - granted
    assert (c.kind, c.kv.key) == ("delete", "node/n1")
    assert gone_after >= lease_ttl * 0.9  # never early (a little slack for clocks)
    assert (await store.get("node/n1")).kv is None and (await store.get("node/keep")).kv is not None
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease.id)
    with pytest.raises(LeaseNotFound):
        await store.put("node/n1", b"again", lease=lease.id)


async def test_keepalive_keeps_a_lease(store: KVStore, lease_ttl: float):
    lease = await store.grant(lease_ttl)
    await store.put("node/n1", b"alive", lease=lease.id)
    deadline = trio.current_time() + lease.ttl * 2.5
    while trio.current_time() < deadline:
        assert await store.keepalive(lease.id) >= lease_ttl
        await trio.sleep(lease.ttl / 4)
        assert (await store.get("node/n1")).kv is not None


async def test_revoke_deletes_at_once(store: KVStore, lease_ttl: float):
    lease = await store.grant(lease_ttl * 100)
    r = await store.txn([], [Put("l/1", b"", lease.id), Put("l/2", b"", lease.id)])
    async with store.watch("l/", r + 1) as changes:
        await store.revoke(lease.id)
        [got] = await next_revisions(changes, 1, timeout=lease_ttl + 1)
    assert sorted(summary(got)) == [("delete", "l/1", b""), ("delete", "l/2", b"")]  # one revision (etcd: any order)
    assert got[0].revision == got[1].revision
    assert (await store.range("l/")).kvs == []
    await store.revoke(lease.id)  # already gone: not an error
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease.id)


async def test_put_with_unknown_lease_writes_nothing(store: KVStore):
    with pytest.raises(LeaseNotFound):
        await store.txn([], [Put("a", b"1"), Put("b", b"2", lease=987654321)])
    assert (await store.range("")).kvs == []


__all__ = ["lease_ttl", *(name for name in dir() if name.startswith("test_"))]
