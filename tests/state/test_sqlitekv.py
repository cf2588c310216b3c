"""What the SQLite store promises beyond the shared contract (tests/state/conformance.py)."""

import os
import stat

import pytest
import trio

from deployfs.state.kv import Compacted, Put, StoreFull
from deployfs.state.sqlitekv import open_sqlite
from tests.disk import fill, free, small_disk
from tests.state.conformance import next_changes, summary


async def test_reopened_store_carries_on(tmp_path):
    path = str(tmp_path / "kv.db")
    async with open_sqlite(path) as s:
        await s.put("a", b"1")
        lease = await s.grant(0.5)
        last = await s.put("node/n1", b"", lease=lease.id)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with open_sqlite(path) as s:
        read = await s.range("")
        assert read.revision == last and [kv.key for kv in read.kvs] == ["a", "node/n1"]
        assert await s.put("b", b"") > last  # revisions are never reused
        # History survives too: a watch from before the restart replays it.
        async with s.watch("a", 1) as changes:
            assert summary(await next_changes(changes, 1)) == [("put", "a", b"1")]
        # A lease from before gets its full TTL again, then expires as usual.
        assert await s.keepalive(lease.id) == 0.5
        with trio.fail_after(3):
            while (await s.get("node/n1")).kv is not None:
                await trio.sleep(0.05)


async def test_history_is_compacted_as_writes_go(tmp_path):
    async with open_sqlite(str(tmp_path / "kv.db"), history=10) as s:
        first = await s.put("k", b"0")
        for i in range(30):
            await s.put("k", str(i).encode())
        with pytest.raises(Compacted):
            async with s.watch("k", first) as changes:
                await next_changes(changes, 1)
        rows = s._db.execute("SELECT count(*) FROM kv_history").fetchone()[0]
        assert rows <= 20


async def test_a_slow_watcher_reads_history_instead_of_buffering(tmp_path):
    async with open_sqlite(str(tmp_path / "kv.db"), watch_buffer=5) as s:
        start = (await s.get("x")).revision + 1
        async with s.watch("w/", start) as changes:
            for i in range(50):  # nobody reads meanwhile: far past the buffer
                await s.txn([], [Put(f"w/{i}", b"a"), Put(f"w/{i}", b"b"), Put("other", b"")])
            got = await next_changes(changes, 100)
            assert all(len({c.revision for c in r}) == 1 for r in [got[i:i + 2] for i in range(0, 100, 2)])
        assert [(c.kv.key, c.kv.value) for c in got] == [(f"w/{i}", v) for i in range(50) for v in (b"a", b"b")]
        assert [c.revision for c in got] == sorted(c.revision for c in got)


async def test_full_disk_refuses_and_changes_nothing(tmp_path):
    with small_disk(str(tmp_path / "disk")) as disk:
        async with open_sqlite(os.path.join(disk, "kv.db")) as s:
            before = await s.put("a", b"kept")
            fill(disk)
            with pytest.raises(StoreFull, match="full"):
                for i in range(1000):  # the WAL may have room for a few pages
                    last = s.revision
                    await s.put(f"big/{i}", b"x" * 65536)
            assert s.revision == last and (await s.get("a")).revision == last
            assert (await s.get(f"big/{i}")).kv is None
            free(disk)
            assert await s.put("a", b"after") > before
            assert (await s.get("a")).kv.value == b"after"


async def test_a_watch_from_long_ago_replays_all_of_it(tmp_path):
    """Catching up reads the history in pieces (CATCH_UP_REVISIONS at a time) and misses none."""
    async with open_sqlite(str(tmp_path / "kv.db")) as s:
        start = (await s.get("x")).revision + 1
        for i in range(1200):
            await s.put("k" if i % 2 else "other", str(i).encode())
        async with s.watch("k", start) as changes:
            await s.put("k", b"live")
            got = await next_changes(changes, 601)
        assert [c.kv.value for c in got] == [str(i).encode() for i in range(1, 1200, 2)] + [b"live"]
