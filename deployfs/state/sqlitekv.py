"""The store (:mod:`deployfs.state.kv`) on SQLite, for one machine.

One process owns the database.  Calls run SQLite inline (a write is well
under a millisecond in WAL mode with ``synchronous=NORMAL``) after a trio
checkpoint, so the store behaves like any async store to its callers without
a thread per call.  What makes it a store for a cluster's interface:

* ``kv`` holds the current values with their revisions; ``kv_history`` every
  change (puts with their values), which is what a watch from a past revision
  replays.  History older than ``history`` revisions is compacted as writes
  go (auto-compaction, as etcd is usually run).
* A watch is told of changes in-process, *after* the transaction commits, and
  buffers them; a watcher that falls more than ``WATCH_BUFFER`` changes behind
  drops its buffer and reads the history instead, so a slow reader costs
  memory only up to that bound.
* Leases live in ``kv_leases`` (id, TTL); their deadlines are kept on the trio
  clock by a reaper task that deletes an expired lease's keys as one write.
  A reopened store gives every lease its full TTL again (as etcd does after a
  restart): a lease is a minimum, never a maximum.

The tables sit beside the older record tables of :mod:`.store` in the same
database file, under names of their own.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections import deque
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import trio

from . import statedir
from .kv import (Change, Compacted, Compare, Conflict, Delete, KeyValue, Lease, LeaseNotFound, Op, Put, Read,
                 StoreError, StoreFull, prefix_end)

# Revisions of history kept for watches (compaction runs once twice this many pile up).
HISTORY = 10_000
# Changes a watcher may have waiting in memory before it falls back to reading history.
WATCH_BUFFER = 10_000
# Revisions a watcher catching up reads from history per query.
CATCH_UP_REVISIONS = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, mod_revision INTEGER NOT NULL,
                               create_revision INTEGER NOT NULL, lease INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS kv_history (revision INTEGER NOT NULL, n INTEGER NOT NULL, key TEXT NOT NULL,
                                       deleted INTEGER NOT NULL, value BLOB NOT NULL,
                                       create_revision INTEGER NOT NULL, lease INTEGER NOT NULL,
                                       PRIMARY KEY (revision, n));
CREATE TABLE IF NOT EXISTS kv_leases (id INTEGER PRIMARY KEY, ttl REAL NOT NULL);
CREATE TABLE IF NOT EXISTS kv_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO kv_meta VALUES ('revision', 1), ('compacted', 0), ('lease_seq', 0);
"""
# SQLite's codes for "no room": a full database or WAL, and a WAL index that cannot grow.
_FULL_CODES = {13, 4874}  # SQLITE_FULL, SQLITE_IOERR_SHMSIZE


@dataclass(eq=False)
class _Watcher:
    prefix: str
    end: str | None
    last: int  # the last revision handed over
    # Revisions' changes told after commit, not yet handed over; None while reading history instead.
    buffer: deque[list[Change]] | None = None
    buffered: int = 0  # changes in the buffer
    wake: trio.Event = field(default_factory=trio.Event)

    def wants(self, key: str) -> bool:
        return key >= self.prefix and (self.end is None or key < self.end)


class SqliteKV:
    """Open with :func:`open_sqlite` (it runs the lease reaper)."""

    def __init__(self, path: str, *, history: int = HISTORY, watch_buffer: int = WATCH_BUFFER,
                 db: sqlite3.Connection | None = None) -> None:
        """``db``: a connection that already has the tables (:data:`SCHEMA`), shared with its owner."""
        self.path = path
        self.history = history
        self.watch_buffer = watch_buffer
        self._closed = False
        if db is not None:
            self._db = db
        else:
            self._db = self._open(path)
        self._revision = self._meta("revision")
        self._compacted = self._meta("compacted")
        self._watchers: set[_Watcher] = set()
        self._deadlines: dict[int, float] = {}  # lease id -> trio time it expires
        self._ttls: dict[int, float] = dict(self._db.execute("SELECT id, ttl FROM kv_leases").fetchall())
        self._reaper_wake = trio.Event()

    def _open(self, path: str) -> sqlite3.Connection:
        if not os.path.exists(path):
            statedir.open_file(path, "ab").close()  # owner-only; SQLite gives -wal/-shm its mode
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA busy_timeout = 5000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            with self._transaction():
                for stmt in filter(str.strip, SCHEMA.split(";")):
                    self._exec(stmt)
        except BaseException:
            self._db.close()
            raise
        return self._db

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: str) -> Read:
        await trio.lowlevel.checkpoint()
        self._check_open()
        rows = self._db.execute("SELECT key, value, mod_revision, create_revision, lease FROM kv WHERE key = ?", (key,))
        return Read(self._revision, [_kv(r) for r in rows])

    async def range(self, prefix: str) -> Read:
        await trio.lowlevel.checkpoint()
        self._check_open()
        where, args = _key_range(prefix)
        rows = self._db.execute(f"SELECT key, value, mod_revision, create_revision, lease FROM kv WHERE {where} "
                                "ORDER BY key", args)
        return Read(self._revision, [_kv(r) for r in rows])

    # -- writes ---------------------------------------------------------------------------

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        await trio.lowlevel.checkpoint()
        self._check_open()
        for op in ops:
            if isinstance(op, Put) and op.lease:
                self._live_lease(op.lease)
        with self._transaction():
            for c in compares:
                row = self._exec("SELECT mod_revision FROM kv WHERE key = ?", (c.key,)).fetchone()
                have = row[0] if row else 0
                if have != c.mod_revision:
                    raise Conflict(f"{c.key} is at revision {have}, not {c.mod_revision}: read it again and retry")
            changes = self._apply(ops)
        self._committed(changes)
        return self._revision

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self.txn([], [Put(key, value, lease)])

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        return await self.txn([], [Delete(key, prefix)])

    def _apply(self, ops: Sequence[Op], first: int = 0) -> list[Change]:
        """Inside a transaction: write ``ops`` at the next revision; the changes they made.

        Several calls in one transaction share its revision; ``first`` is how many changes
        the earlier ones made.  The caller commits, then passes every change to :meth:`_committed`."""
        rev = self._revision + 1
        changes: list[Change] = []
        for op in ops:
            if isinstance(op, Put):
                row = self._exec("SELECT create_revision FROM kv WHERE key = ?", (op.key,)).fetchone()
                kv = KeyValue(op.key, bytes(op.value), rev, row[0] if row else rev, op.lease)
                self._exec("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?)",
                           (kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.lease))
                changes.append(Change("put", kv))
            else:
                if op.prefix:
                    where, args = _key_range(op.key)
                else:
                    where, args = "key = ?", (op.key,)
                gone = [r[0] for r in self._exec(f"SELECT key FROM kv WHERE {where} ORDER BY key", args)]
                self._exec(f"DELETE FROM kv WHERE {where}", args)
                changes += [Change("delete", KeyValue(k, b"", rev, 0)) for k in gone]
        if changes:
            self._exec_many("INSERT INTO kv_history VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [(rev, n, c.kv.key, c.kind == "delete", c.kv.value, c.kv.create_revision, c.kv.lease)
                             for n, c in enumerate(changes, first)])
            self._exec("UPDATE kv_meta SET value = ? WHERE name = 'revision'", (rev,))
            if rev - self._compacted > 2 * self.history:
                self._compact(rev - self.history)
        return changes

    def _committed(self, changes: list[Change]) -> None:
        """After commit (never before): the revision moves and watchers hear of it."""
        if not changes:
            return
        self._revision = changes[0].revision
        for w in self._watchers:
            if w.buffer is None:
                w.wake.set()  # reading history: it will find these there
                continue
            mine = [c for c in changes if w.wants(c.kv.key)]
            if not mine or self._revision <= w.last:
                continue
            if w.buffered + len(mine) > self.watch_buffer:
                w.buffer, w.buffered = None, 0  # too far behind: read history after w.last instead
            else:
                w.buffer.append(mine)
                w.buffered += len(mine)
            w.wake.set()

    # -- history and watches --------------------------------------------------------------

    async def compact(self, revision: int) -> None:
        await trio.lowlevel.checkpoint()
        self._check_open()
        if revision > self._revision:
            raise ValueError(f"cannot compact to {revision}: the store is at revision {self._revision}")
        if revision > self._compacted:
            with self._transaction():
                self._compact(revision)

    def _compact(self, revision: int) -> None:
        self._exec("DELETE FROM kv_history WHERE revision < ?", (revision,))
        self._exec("UPDATE kv_meta SET value = ? WHERE name = 'compacted'", (revision,))
        self._compacted = revision

    def watch(self, prefix: str, start_revision: int) -> AbstractAsyncContextManager[AsyncIterator[list[Change]]]:
        return self._watch(prefix, start_revision)

    @asynccontextmanager
    async def _watch(self, prefix: str, start_revision: int) -> AsyncIterator[AsyncIterator[list[Change]]]:
        self._check_open()
        start = start_revision or self._revision + 1
        if start < self._compacted:
            raise Compacted(self._compacted)
        w = _Watcher(prefix, prefix_end(prefix), start - 1)
        if start > self._revision:
            w.buffer = deque()  # nothing to replay: straight onto live changes
        self._watchers.add(w)
        try:
            yield self._changes(w)
        finally:
            self._watchers.discard(w)

    async def _changes(self, w: _Watcher) -> AsyncIterator[list[Change]]:
        while True:
            if w.buffer is None:
                batch, upto = self._catch_up(w)
                for changes in batch:
                    w.last = changes[0].revision
                    yield changes
                w.last = max(w.last, upto)
                continue
            if not w.buffer:
                self._check_open()
                await w.wake.wait()
                w.wake = trio.Event()
                continue
            changes = w.buffer.popleft()
            w.buffered -= len(changes)
            w.last = changes[0].revision
            yield changes

    def _catch_up(self, w: _Watcher) -> tuple[list[list[Change]], int]:
        """The history after ``w.last``, a revision at a time, up to a revision (returned too);
        once that reaches the present, ``w`` switches to live changes.

        No await between the read and the switch, so no change falls between the two."""
        self._check_open()
        if w.last + 1 < self._compacted:
            raise Compacted(self._compacted)
        upto = min(self._revision, w.last + CATCH_UP_REVISIONS)
        where, args = _key_range(w.prefix)
        rows = self._db.execute(
            "SELECT revision, n, key, deleted, value, create_revision, lease FROM kv_history "
            f"WHERE revision > ? AND revision <= ? AND {where} ORDER BY revision, n",
            (w.last, upto, *args)).fetchall()
        if upto == self._revision:
            w.buffer = deque()
        batch: list[list[Change]] = []
        for row in rows:
            if not batch or batch[-1][0].revision != row[0]:
                batch.append([])
            batch[-1].append(_change(row))
        return batch, upto

    # -- leases ---------------------------------------------------------------------------

    async def grant(self, ttl: float) -> Lease:
        await trio.lowlevel.checkpoint()
        self._check_open()
        if not ttl > 0:
            raise ValueError(f"a lease needs a TTL above 0 seconds, not {ttl}")
        with self._transaction():
            self._exec("UPDATE kv_meta SET value = value + 1 WHERE name = 'lease_seq'")
            id = self._meta("lease_seq")
            self._exec("INSERT INTO kv_leases VALUES (?, ?)", (id, ttl))
        self._ttls[id] = ttl
        self._deadlines[id] = trio.current_time() + ttl
        self._reaper_wake.set()
        return Lease(id, ttl)

    async def keepalive(self, lease: int) -> float:
        await trio.lowlevel.checkpoint()
        self._check_open()
        self._live_lease(lease)
        self._deadlines[lease] = trio.current_time() + self._ttls[lease]
        return self._ttls[lease]

    async def revoke(self, lease: int) -> None:
        await trio.lowlevel.checkpoint()
        self._check_open()
        self._end_lease(lease)

    def _live_lease(self, lease: int) -> None:
        deadline = self._deadlines.get(lease)
        if deadline is None:
            raise LeaseNotFound(f"lease {lease} expired or was revoked")
        if deadline <= trio.current_time():  # the reaper has not run yet: it is gone all the same
            self._end_lease(lease)
            raise LeaseNotFound(f"lease {lease} expired")

    def _end_lease(self, lease: int) -> None:
        """Delete the lease and its keys, as one write that watchers see."""
        if lease not in self._ttls:
            return
        with self._transaction():
            keys = [r[0] for r in self._exec("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))]
            changes = self._apply([Delete(k) for k in keys])
            self._exec("DELETE FROM kv_leases WHERE id = ?", (lease,))
        self._ttls.pop(lease, None)
        self._deadlines.pop(lease, None)
        self._committed(changes)

    async def run_leases(self) -> None:
        """Expire leases on time (for ever): :func:`open_sqlite` runs it."""
        now = trio.current_time()
        for id, ttl in self._ttls.items():
            self._deadlines.setdefault(id, now + ttl)  # leases from before a restart: a full TTL again
        while True:
            now = trio.current_time()
            for id in [i for i, d in self._deadlines.items() if d <= now]:
                self._end_lease(id)
            self._reaper_wake = trio.Event()
            with trio.move_on_at(min(self._deadlines.values(), default=math.inf)):
                await self._reaper_wake.wait()

    # -- plumbing -------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._watchers:
            w.wake.set()
        self._db.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")

    def _meta(self, name: str) -> int:
        return int(self._db.execute("SELECT value FROM kv_meta WHERE name = ?", (name,)).fetchone()[0])

    def _transaction(self) -> _Transaction:
        return _Transaction(self)

    def _exec(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.OperationalError as e:
            raise _full(e, self.path) from None

    def _exec_many(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        try:
            self._db.executemany(sql, rows)
        except sqlite3.OperationalError as e:
            raise _full(e, self.path) from None


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (a full disk included)."""

    def __init__(self, store: SqliteKV) -> None:
        self.store = store

    def __enter__(self) -> None:
        self.store._exec("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        db = self.store._db
        if kind is None:
            try:
                self.store._exec("COMMIT")
                return
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if db.in_transaction:
            db.execute("ROLLBACK")


@asynccontextmanager
async def open_sqlite(path: str, *, history: int = HISTORY, watch_buffer: int = WATCH_BUFFER) -> AsyncIterator[SqliteKV]:
    """Open the store at ``path`` (created owner-only) with its lease reaper running."""
    store = SqliteKV(path, history=history, watch_buffer=watch_buffer)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run_leases)
            try:
                yield store
            finally:
                nursery.cancel_scope.cancel()
    finally:
        store.close()


def _key_range(prefix: str) -> tuple[str, tuple[str, ...]]:
    end = prefix_end(prefix)
    if end is None:
        return ("key >= ?", (prefix,))
    return ("key >= ? AND key < ?", (prefix, end))


def _kv(row: tuple[str, bytes, int, int, int]) -> KeyValue:
    return KeyValue(row[0], bytes(row[1]), row[2], row[3], row[4])


def _change(row: tuple[int, int, str, int, bytes, int, int]) -> Change:
    rev, _, key, deleted, value, create, lease = row
    if deleted:
        return Change("delete", KeyValue(key, b"", rev, 0))
    return Change("put", KeyValue(key, bytes(value), rev, create, lease))


def _full(e: sqlite3.OperationalError, path: str) -> Exception:
    if getattr(e, "sqlite_errorcode", None) in _FULL_CODES:
        return StoreFull(f"the state disk is full ({path}: {e}): nothing was changed; free some space and try again")
    return e
