"""The cache fed by the watch, over the real SQLite store."""

from contextlib import asynccontextmanager

import pytest
import trio

from deployfs.state.cache import Cache
from deployfs.state.kv import Delete, Put
from deployfs.state.sqlitekv import open_sqlite


@pytest.fixture
async def store(tmp_path):
    async with open_sqlite(str(tmp_path / "kv.db"), history=10, watch_buffer=4) as s:
        yield s


@asynccontextmanager
async def running(cache: Cache):
    async with trio.open_nursery() as n:
        await n.start(cache.run)
        yield cache
        n.cancel_scope.cancel()


def keys(kvs):
    return [kv.key for kv in kvs]


async def test_lists_then_follows(store):
    await store.put("svc/web", b"1")
    await store.put("other", b"x")
    async with running(Cache(store, "svc/")) as cache:
        assert keys(cache.range("")) == ["svc/web"] and cache.get("other") is None
        rev = await store.txn([], [Put("svc/api", b"2"), Put("svc/web", b"3")])
        await cache.wait_for(rev)
        assert cache.revision == rev
        assert [(kv.key, kv.value, kv.mod_revision) for kv in cache.range("svc/")] == [
            ("svc/api", b"2", rev), ("svc/web", b"3", rev)]
        rev = await store.delete("svc/api")
        await cache.wait_for(rev)
        assert keys(cache.range("svc/")) == ["svc/web"] and cache.get("svc/api") is None


async def test_range_by_prefix(store):
    for k in ("i/web/1", "i/web/2", "i/web2/1", "i/api/1", "s/web"):
        await store.put(k, b"")
    async with running(Cache(store)) as cache:
        assert keys(cache.range("i/web/")) == ["i/web/1", "i/web/2"]
        assert keys(cache.range("i/")) == ["i/api/1", "i/web/1", "i/web/2", "i/web2/1"]
        assert cache.range("x/") == []


async def test_a_transaction_is_seen_whole(store):
    async with running(Cache(store)) as cache:
        seen = []

        def listener(changes):  # at each call the copy shows the whole revision
            seen.append(([c.kv.key for c in changes], cache.get("a") is not None, cache.get("b") is not None))

        cache.subscribe(listener)
        rev = await store.txn([], [Put("a", b""), Put("b", b"")])
        await cache.wait_for(rev)
        rev = await store.txn([], [Delete("a"), Delete("b")])
        await cache.wait_for(rev)
        assert seen == [(["a", "b"], True, True), (["a", "b"], False, False)]


async def test_a_broken_listener_does_not_stop_the_copy(store):
    async with running(Cache(store)) as cache:
        cache.subscribe(lambda changes: 1 / 0)
        rev = await store.put("a", b"")
        await cache.wait_for(rev)
        rev = await store.put("b", b"")
        await cache.wait_for(rev)
        assert keys(cache.range("")) == ["a", "b"]


class Gated:
    """The real store, but its watch hands nothing over while the gate is shut (a slow reader)."""

    def __init__(self, store):
        self.store = store
        self.open = trio.Event()

    def __getattr__(self, name):
        return getattr(self.store, name)

    @asynccontextmanager
    async def watch(self, prefix, start):
        async with self.store.watch(prefix, start) as revisions:
            async def gated():
                async for changes in revisions:
                    await self.open.wait()
                    yield changes
            yield gated()


async def test_relists_when_the_watch_falls_off_history(store):
    gated = Gated(store)
    await store.put("k/gone", b"")
    async with running(Cache(gated, "k/")) as cache:
        told = []
        cache.subscribe(lambda changes: told.append(sorted((c.kind, c.kv.key) for c in changes)))
        for i in range(40):  # far past the store's history (10) while the cache is stuck
            await store.put(f"k/{i % 3}", str(i).encode())
            if i == 20:
                await store.delete("k/gone")
        gated.open.set()
        with trio.fail_after(5):
            while cache.relists == 0 or cache.revision < store.revision:
                await trio.sleep(0.01)
        assert [(kv.key, kv.value) for kv in cache.range("k/")] == [("k/0", b"39"), ("k/1", b"37"), ("k/2", b"38")]
        # Listeners hear what the re-list changed, as if they had seen every change.
        assert [("delete", "k/gone"), ("put", "k/0"), ("put", "k/1"), ("put", "k/2")] in told
        rev = await store.put("k/after", b"")
        await cache.wait_for(rev)
        assert cache.get("k/after") is not None


async def test_skipped_prefixes_are_not_kept_but_move_the_revision(store):
    await store.put("events/web/1", b"e")
    async with running(Cache(store, skip=("events/",))) as cache:
        heard = []
        cache.subscribe(heard.append)
        assert cache.get("events/web/1") is None
        rev = await store.put("events/web/2", b"e")  # a revision that wrote only what is skipped
        with trio.fail_after(1):
            await cache.wait_for(rev)  # still reached: a writer waits for any revision of the store
        assert cache.range("") == [] and [c.kv.key for c in heard[-1]] == ["events/web/2"]


async def test_an_overlay_shows_writes_kept_in_memory_until_the_watch_brings_them(store):
    await store.put("m/a", b"1")
    async with running(Cache(store)) as cache:
        heard = []
        cache.subscribe(heard.append)
        before = cache.revision
        cache.overlay([Put("m/b", b"2"), Delete("m/", prefix=True), Put("m/c", b"3")])
        assert keys(cache.range("")) == ["m/c"] and cache.revision == before  # no revision of the store's
        assert [(c.kind, c.kv.key) for c in heard[-1]] == [("put", "m/b"), ("delete", "m/a"), ("delete", "m/b"),
                                                            ("put", "m/c")]
        rev = await store.txn([], [Delete("m/a"), Put("m/c", b"3")])  # the same writes, committed later
        await cache.wait_for(rev)
        assert [(kv.key, kv.value) for kv in cache.range("")] == [("m/c", b"3")]


async def test_an_unsubscribed_listener_hears_nothing_more(store):
    heard: list[str] = []

    def listener(changes):
        heard.extend(c.kv.key for c in changes)
    async with running(Cache(store)) as cache:
        cache.subscribe(listener)
        await cache.wait_for(await store.put("a", b""))
        cache.unsubscribe(listener)
        cache.unsubscribe(listener)  # twice: harmless
        await cache.wait_for(await store.put("b", b""))
        assert heard == ["a"]
