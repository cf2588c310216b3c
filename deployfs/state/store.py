"""Durable state: manifests, services, instances, events -- the engine's synchronous view
of the store.

The records are JSON values under keys (:mod:`.records` has the layout) in the
revisioned store of :mod:`.sqlitekv`, which shares this connection: every
transaction here is one revision there, and its watchers (the cache the view
reads) hear of it after commit.  Events are the one append-only stream; they
carry a per-service ``segment`` number so the filesystem can rotate
``events`` into ``events.1`` like logrotate does.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed transaction
survives the death of the process that wrote it (kill -9), which is the crash
deployfs promises to survive; power loss may lose the last few commits.
Schema changes are numbered migrations tracked in ``PRAGMA user_version``; a
database from a newer deployfs is refused, never "upgraded down".  Schema 2
moved the records of schema 1 (a table per kind) into the key-value tables,
once, at open.

A full state disk must not stop supervision.  Writes are of two
kinds.  What people ask for (manifest files, commands: a transaction opened
with ``refuse_when_full``) is refused with :class:`StoreFull`, and nothing
changes.  What the engine records about what already happened (services,
instances, events) cannot be refused -- the instance did exit -- so it waits
in memory, in order, while the disk is full (:attr:`SqliteStore.full` says
why) and is written as soon as there is room again; reads see it meanwhile.
Only a server that dies while the disk is still full loses those writes;
nothing committed is ever lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from contextlib import AbstractAsyncContextManager
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Protocol, Sequence

import trio

from . import statedir
from .cache import Cache
from .kv import (Change, Compare, Conflict, Delete, KeyValue, KVStore, Lease, Op, Put, Read, StoreError, StoreFull,
                 prefix_end)
from .records import (EVENTS, NEXT_INSTANCE_ID, NODES, ROUTES, VERSIONS, Event, InstanceRecord, ManifestFile,
                      NodeRecord, RouteRecord, ServiceRecord, decode, decode_event, decode_file, decode_node, encode, encode_event, encode_file,
                      event_key, events_prefix, instance_key, instances_prefix, manifest_key, node_key, route_key,
                      service_key, version_key)
from .sqlitekv import SCHEMA as KV_SCHEMA
from .sqlitekv import SqliteKV

__all__ = ["Event", "InstanceRecord", "ManifestFile", "NodeRecord", "ServiceRecord", "SqliteStore", "Store", "StoreError",
           "StoreFull", "SCHEMA_VERSION"]

log = logging.getLogger(__name__)


class Store(Protocol):
    """What the engine and the filesystem need from durable state."""

    full: str | None  # why writes wait in memory (the state disk is full), or None

    def transaction(self, *, refuse_when_full: bool = False) -> contextlib.AbstractContextManager[None]: ...
    def after_commit(self, fn: Callable[[], None]) -> None: ...
    def flush(self) -> bool: ...

    def get_file(self, name: str) -> ManifestFile | None: ...
    def put_file(self, name: str, data: bytes) -> None: ...
    def delete_file(self, name: str) -> None: ...
    def list_files(self) -> list[str]: ...

    def put_version(self, service: str, version: str, text: str) -> None: ...
    def get_version(self, service: str, version: str) -> str | None: ...

    def get_service(self, name: str) -> ServiceRecord | None: ...
    def put_service(self, rec: ServiceRecord) -> None: ...
    def list_services(self) -> list[ServiceRecord]: ...
    def delete_service(self, name: str) -> None:
        """Forget a service: its record, instances, versions and events (not its manifest file)."""
        ...

    def list_instances(self, service: str) -> list[InstanceRecord]: ...
    def get_instance(self, service: str, id: int) -> InstanceRecord | None: ...
    def put_instance(self, rec: InstanceRecord) -> None: ...
    def put_instance_fields(self, rec: InstanceRecord, names: Iterable[str]) -> None: ...
    def delete_instance(self, service: str, id: int) -> None: ...
    def next_instance_id(self) -> int:
        """A new instance id, never one used before, kept in the records."""
        ...

    def list_nodes(self) -> list[NodeRecord]: ...
    def put_node(self, rec: NodeRecord) -> None: ...
    def delete_node(self, name: str) -> None: ...

    def list_routes(self) -> list[RouteRecord]: ...
    def put_route(self, rec: RouteRecord) -> None: ...
    def delete_route(self, service: str) -> None: ...

    def append_event(self, service: str, segment: int, ts: float, text: str) -> Event: ...
    def events(self, service: str, segment: int) -> list[Event]: ...
    def last_event(self, service: str) -> Event | None: ...
    def close(self) -> None: ...

    @property
    def kv(self) -> KVStore:
        """The same records, revisioned: what a cache (state/cache.py) watches."""
        ...

    def cache(self, prefix: str = "") -> Cache:
        """A cache of the records under ``prefix`` in this process, shown what waits in memory too."""
        ...

    @property
    def records(self) -> KVStore:
        """The same records for a writer in this process beside the engine (the node agent):
        its reads see what waits in memory on a full disk, and its writes wait there too."""
        ...


SCHEMA_VERSION = 2
_MIGRATIONS: list[str] = [
    # 0 -> 1
    """
    CREATE TABLE manifest_files (name TEXT PRIMARY KEY, data BLOB NOT NULL, mtime REAL NOT NULL);
    CREATE TABLE versions (service TEXT NOT NULL, version TEXT NOT NULL, text TEXT NOT NULL,
                           created REAL NOT NULL, PRIMARY KEY (service, version));
    CREATE TABLE services (name TEXT PRIMARY KEY, data TEXT NOT NULL);
    CREATE TABLE instances (service TEXT NOT NULL, id INTEGER NOT NULL, data TEXT NOT NULL,
                            PRIMARY KEY (service, id));
    CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL,
                         segment INTEGER NOT NULL, ts REAL NOT NULL, text TEXT NOT NULL);
    CREATE INDEX events_by_segment ON events (service, segment, seq);
    """,
    # 1 -> 2: the key-value tables; _move_records_to_kv moves the rows, then the old tables go
    KV_SCHEMA,
]
# Events kept per service in the database (the files show the last two segments).
EVENTS_KEPT = 100_000
# Revisions of change history the records keep for watches (each holds whole records).
KV_HISTORY = 1000
# Every this many events of a service, the ones past EVENTS_KEPT are deleted.
EVENTS_TRIM_EVERY = 1000


# While full: how often a write retries the disk, and the room it wants first
# (so a disk with a few pages free does not flap between full and not).
RETRY_EVERY = 1.0
ROOM_NEEDED = 512 * 1024
# SQLite's codes for "no room": a full database or WAL, and a WAL index
# (the -shm file) that cannot grow.
_FULL_CODES = {13, 4874}  # SQLITE_FULL, SQLITE_IOERR_SHMSIZE


def with_pending(out: dict[str, bytes], pending: Iterable[Op], prefix: str, *, exact: bool) -> dict[str, bytes]:
    """What a read of ``prefix`` (or of that one key) found, with the writes not yet kept on top, sorted."""
    if not pending:
        return out
    for op in pending:
        if isinstance(op, Put):
            if op.key == prefix if exact else op.key.startswith(prefix):
                out[op.key] = op.value
        elif op.prefix:
            for k in [k for k in out if k.startswith(op.key)]:
                del out[k]
        else:
            out.pop(op.key, None)
    return dict(sorted(out.items()))


class RecordStore:
    """The records as the engine reads and writes them, on a few primitives a store provides:
    ``_read``/``_get`` (what the store has, with writes not yet kept on top), ``_write`` (a write
    people asked for: refused when it cannot be kept now), ``_record_write`` (a record of what
    happened: never refused, kept in order), ``transaction``, and the two event queries."""

    _next_id: int | None
    _handed: int
    _seqs: dict[str, int]
    _pending: dict[str, Op]
    events_kept: int

    def _read(self, prefix: str, *, exact: bool = False) -> dict[str, bytes]:
        raise NotImplementedError

    def _get(self, key: str) -> bytes | None:
        return self._read(key, exact=True).get(key)

    def _write(self, *ops: Op) -> None:
        raise NotImplementedError

    def _record_write(self, *ops: Op) -> None:
        raise NotImplementedError

    def transaction(self, *, refuse_when_full: bool = False) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def _events_past_kept(self, service: str) -> list[str]:
        raise NotImplementedError

    def _last_event_stored(self, service: str) -> Event | None:
        raise NotImplementedError

    # -- manifest files (what users write under manifests/) ---------------------

    def get_file(self, name: str) -> ManifestFile | None:
        value = self._get(manifest_key(name))
        return None if value is None else decode_file(name, value)

    def put_file(self, name: str, data: bytes) -> None:
        self._write(Put(manifest_key(name), encode_file(data, time.time())))

    def delete_file(self, name: str) -> None:
        if self._get(manifest_key(name)) is not None:
            self._write(Delete(manifest_key(name)))

    def list_files(self) -> list[str]:
        return [k.split("/", 1)[1] for k in self._read(manifest_key(""))]

    # -- versions (every manifest ever applied, by hash) -----------------------

    def put_version(self, service: str, version: str, text: str) -> None:
        if self._get(version_key(service, version)) is None:  # a version's text never changes
            self._write(Put(version_key(service, version), text.encode()))

    def get_version(self, service: str, version: str) -> str | None:
        value = self._get(version_key(service, version))
        return None if value is None else value.decode()

    # -- services and instances ----------------------------------------------------

    def get_service(self, name: str) -> ServiceRecord | None:
        value = self._get(service_key(name))
        return None if value is None else decode(ServiceRecord, value)

    def put_service(self, rec: ServiceRecord) -> None:
        self._record_write(Put(service_key(rec.name), encode(rec)))

    def list_services(self) -> list[ServiceRecord]:
        return [decode(ServiceRecord, v) for v in self._read(service_key("")).values()]

    def delete_service(self, name: str) -> None:
        # The instances are gone already: a record of that, kept like any other on a full disk.
        self._record_write(Delete(service_key(name)), Delete(instances_prefix(name), prefix=True),
                           Delete(version_key(name, ""), prefix=True), Delete(events_prefix(name), prefix=True))
        self._seqs.pop(name, None)

    def list_instances(self, service: str) -> list[InstanceRecord]:
        return [decode(InstanceRecord, v) for v in self._read(instances_prefix(service)).values()]

    def put_instance(self, rec: InstanceRecord) -> None:
        ops: list[Op] = [Put(instance_key(rec.service, rec.id), encode(rec))]
        if rec.id >= self._id_counter():  # the first record of a new id moves the counter past it, in one write
            self._next_id = rec.id + 1
            ops.append(Put(NEXT_INSTANCE_ID, str(self._next_id).encode()))
        self._record_write(*ops)

    def put_instance_fields(self, rec: InstanceRecord, names: Iterable[str]) -> None:
        """Write only these fields of ``rec`` over the record as it is (its other fields are
        another writer's: the node agent's observations). Read and write with no await
        between them, in one transaction: on SQLite in one process that is the conditional
        write etcd would need a Compare for."""
        with self.transaction():
            value = self._get(instance_key(rec.service, rec.id))
            if value is None:
                self.put_instance(rec)
                return
            now = decode(InstanceRecord, value)
            for name in names:
                setattr(now, name, getattr(rec, name))
            self.put_instance(now)

    def get_instance(self, service: str, id: int) -> InstanceRecord | None:
        value = self._get(instance_key(service, id))
        return None if value is None else decode(InstanceRecord, value)

    def delete_instance(self, service: str, id: int) -> None:
        self._record_write(Delete(instance_key(service, id)))

    def next_instance_id(self) -> int:
        """A new instance id, never one a record used before.

        An id is used once an instance record has it, and that record's write moves the
        counter in the records past it (:meth:`put_instance`): no write of its own, and an
        id handed out but never recorded (a crash in between) may be handed out again."""
        id = max(self._id_counter(), self._handed)
        self._handed = id + 1
        return id

    def _id_counter(self) -> int:
        if self._next_id is None:
            value = self._get(NEXT_INSTANCE_ID)
            self._next_id = int(value) if value else 1
        return self._next_id

    # -- nodes (the same records as node/membership.py's in a cluster) ---------------

    def list_nodes(self) -> list[NodeRecord]:
        return [decode_node(k, v) for k, v in self._read(NODES).items()]

    def put_node(self, rec: NodeRecord) -> None:
        self._record_write(Put(node_key(rec.name), encode(rec)))

    def delete_node(self, name: str) -> None:
        self._record_write(Delete(node_key(name)))

    # -- routes: the table every node's router follows (traffic/published.py) ----------------

    def list_routes(self) -> list[RouteRecord]:
        return [decode(RouteRecord, v) for v in self._read(ROUTES).values()]

    def put_route(self, rec: RouteRecord) -> None:
        self._record_write(Put(route_key(rec.service), encode(rec)))

    def delete_route(self, service: str) -> None:
        self._record_write(Delete(route_key(service)))

    # -- events ------------------------------------------------------------------

    def append_event(self, service: str, segment: int, ts: float, text: str) -> Event:
        seq = self._last_seq(service) + 1
        self._seqs[service] = seq
        ops: list[Op] = [Put(event_key(service, segment, seq), encode_event(ts, text))]
        if seq % EVENTS_TRIM_EVERY == 0:
            ops += [Delete(k) for k in self._events_past_kept(service)]
        self._record_write(*ops)
        return Event(seq, segment, ts, text)

    def _last_seq(self, service: str) -> int:
        if service not in self._seqs:
            last = self.last_event(service)
            self._seqs[service] = last.seq if last else 0
        return self._seqs[service]

    def events(self, service: str, segment: int) -> list[Event]:
        return [decode_event(k, v) for k, v in self._read(events_prefix(service, segment)).items()]

    def last_event(self, service: str) -> Event | None:
        prefix = events_prefix(service)
        waiting = [k for k, op in self._pending.items() if isinstance(op, Put) and k.startswith(prefix)]
        if waiting:
            key = max(waiting)
            value = self._pending[key]
            assert isinstance(value, Put)
            return decode_event(key, value.value)
        return self._last_event_stored(service)


class SqliteStore(RecordStore):
    def __init__(self, state_dir: str, *, events_kept: int = EVENTS_KEPT) -> None:
        statedir.makedirs(state_dir)
        self.path = os.path.join(state_dir, statedir.DB_NAME)
        self.state_dir = state_dir
        self.events_kept = events_kept
        self.full: str | None = None
        # Writes waiting for room, in order: by key (a prefix delete by "\0" + its prefix),
        # the newest write of a key replacing an older one.
        self._pending: dict[str, Op] = {}
        self._pending_rev: dict[str, int] = {}  # key -> the revision a reader of ``records`` sees its waiting write at
        self._pending_seq = 0
        self._last_try = 0.0
        self._ops: list[Op] | None = None  # the open transaction's, or None
        self._changes: list[Any] = []  # what the open transaction changed in SQLite
        self._deferring = False  # the open transaction is kept in memory, not in SQLite
        self._refusing = False
        self._after: list[Callable[[], None]] = []
        self._seqs: dict[str, int] = {}  # service -> its last event's seq
        self._next_id: int | None = None  # meta/next-instance-id as the records have it
        self._handed = 0  # the next id after the last one next_instance_id handed out
        # Told of writes kept in memory on a full disk (a cache shows them: reads see them meanwhile).
        self.on_deferred: list[Callable[[list[Op]], None]] = []
        statedir.open_file(self.path, "ab").close()  # created owner-only; SQLite gives -wal/-shm its mode
        try:
            self._db = self._connect()
        except sqlite3.OperationalError as e:
            if not _is_full(e):
                raise
            # The WAL index could not be created: keep it in memory instead
            # (exclusive locking), so a full disk still lets deployfs start.
            try:
                self._db = self._connect(exclusive=True)
            except sqlite3.OperationalError as again:
                if not _is_full(again):
                    raise
                raise StoreFull(f"the state disk is full ({state_dir}: {again}): the database cannot be "
                                "opened; free some space") from None
            self._note_full(str(e))
            log.warning("%s: started in exclusive locking mode: other programs (sqlite3 .backup) "
                        "cannot open the database until deployfs restarts with room on the disk", self.path)
        # The revisioned store on the same connection: what a cache of the records watches.
        # A cache in this process hears of changes in memory; history is only for one that fell
        # behind (it re-lists past it), so a little is enough and the database stays small.
        self.kv = SqliteKV(self.path, db=self._db, history=KV_HISTORY)
        if self.full is None and not self._room():  # found out now, not at the first write
            self._note_full(f"less than {ROOM_NEEDED // 1024} KiB free")

    def _connect(self, *, exclusive: bool = False) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            if exclusive:
                db.execute("PRAGMA locking_mode = EXCLUSIVE")
            self._db = db
            self._migrate()
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self) -> None:
        have = self._db.execute("PRAGMA user_version").fetchone()[0]
        if have > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer deployfs (schema {have}; this one knows up to "
                f"{SCHEMA_VERSION}): upgrade deployfs, or point --state at another directory")
        for n in range(have, SCHEMA_VERSION):
            with self._raw_transaction():
                for stmt in filter(str.strip, _MIGRATIONS[n].split(";")):
                    self._exec(stmt)
                if n == 1:
                    moved = self._move_records_to_kv()
                    if moved:  # a fresh database has none: nothing to tell
                        log.info("%s: %d records of the previous version moved into the key-value store",
                                 self.path, moved)
                self._exec(f"PRAGMA user_version = {n + 1}")

    def _move_records_to_kv(self) -> int:
        """Schema 1 -> 2: every row of the old tables becomes a record under its key, then the tables go."""
        kv = SqliteKV(self.path, db=self._db)
        ops: list[Op] = []
        for name, data, mtime in self._exec("SELECT name, data, mtime FROM manifest_files"):
            ops.append(Put(manifest_key(name), encode_file(bytes(data), mtime)))
        for service, version, text in self._exec("SELECT service, version, text FROM versions"):
            ops.append(Put(version_key(service, version), text.encode()))
        for name, data in self._exec("SELECT name, data FROM services"):
            ops.append(Put(service_key(name), data.encode()))
        top = 0
        for service, id, data in self._exec("SELECT service, id, data FROM instances"):
            ops.append(Put(instance_key(service, id), data.encode()))
            top = max(top, id)
        for seq, service, segment, ts, text in self._exec("SELECT seq, service, segment, ts, text FROM events"):
            ops.append(Put(event_key(service, segment, seq), encode_event(ts, text)))
        ops.append(Put(NEXT_INSTANCE_ID, str(top + 1).encode()))
        kv._apply(ops)
        for table in ("manifest_files", "versions", "services", "instances", "events"):
            self._exec(f"DROP TABLE {table}")
        return len(ops) - 1

    # -- transactions and a full disk ---------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, refuse_when_full: bool = False) -> Iterator[None]:
        """Group writes atomically (one revision of the store); nests (inner blocks join the outer one).

        With ``refuse_when_full`` a full disk raises :class:`StoreFull` and
        nothing is written; without, the engine's records wait in memory.
        """
        if self._ops is not None:
            yield
            return
        deferring = not self._ready(force=refuse_when_full)
        if deferring and refuse_when_full:
            raise StoreFull(self._refusal())
        self._ops, self._changes, self._deferring, self._refusing, self._after = [], [], deferring, refuse_when_full, []
        try:
            if not deferring:
                self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._rollback()
                raise
            if not self._deferring:
                try:
                    self._exec("COMMIT")
                except StoreFull:
                    self._rollback()
                    if self._refusing:
                        raise
                    self._deferring = True
            if self._deferring:  # SQLite has none of it: it all waits for room, in order
                self._rollback()
                for op in self._ops:
                    self._defer(op)
                for tell in self.on_deferred:
                    tell(self._ops)
            else:
                self.kv._committed(self._changes)  # watchers hear of it once it is committed
            after = self._after
        finally:
            self._ops, self._changes, self._deferring, self._refusing, self._after = None, [], False, False, []
        for fn in after:
            fn()

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the writes so far are kept: at once outside a transaction,
        else when it commits (or is kept in memory on a full disk); never if it is rolled back."""
        if self._ops is None:
            fn()
        else:
            self._after.append(fn)

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.OperationalError as e:
            if not _is_full(e):
                raise
            self._note_full(str(e))
            raise StoreFull(self._refusal()) from None

    def _write(self, *ops: Op) -> None:
        """A write people asked for (a manifest file, a command): refused on a full disk."""
        if self._ops is None:
            with self.transaction(refuse_when_full=True):
                self._write(*ops)
            return
        self._refusing = True  # a transaction holding one is refused whole, never half kept
        if self._deferring:
            raise StoreFull(self._refusal())
        self._ops.extend(ops)
        self._apply(ops)

    def _record_write(self, *ops: Op) -> None:
        """A record of what happened (service, instance, event): kept in memory on a full disk."""
        if self._ops is None:
            with self.transaction():
                self._record_write(*ops)
            return
        self._ops.extend(ops)
        if self._deferring:
            return
        try:
            self._apply(ops)
        except StoreFull:
            if self._refusing:
                raise
            self._deferring = True

    def _apply(self, ops: tuple[Op, ...]) -> None:
        try:
            self._changes += self.kv._apply(ops, len(self._changes))
        except sqlite3.OperationalError as e:
            if not _is_full(e):
                raise
            self._note_full(str(e))
            raise StoreFull(self._refusal()) from None
        except StoreFull as e:
            self._note_full(str(e))
            raise StoreFull(self._refusal()) from None

    def _defer(self, op: Op) -> None:
        key = "\0" + op.key if isinstance(op, Delete) and op.prefix else op.key
        if key.startswith("\0"):  # what waited under the prefix is gone with it
            for k in [k for k in self._pending if k.lstrip("\0").startswith(op.key)]:
                del self._pending[k]
        self._pending.pop(key, None)  # the newest write of a record wins; it goes last
        self._pending[key] = op
        # A revision of its own for a reader of ``records`` to compare on (below 0: never one SQLite gives).
        self._pending_seq -= 1
        if isinstance(op, Put):
            self._pending_rev[op.key] = self._pending_seq
        elif op.prefix:
            for k in [k for k in self._pending_rev if k.startswith(op.key)]:
                del self._pending_rev[k]
        else:
            self._pending_rev.pop(op.key, None)

    def _ready(self, *, force: bool) -> bool:
        """True when SQLite may be written now: not full, or all that waited is written."""
        if self.full is None:  # (nothing waits unless full)
            return True
        if not force and time.monotonic() - self._last_try < RETRY_EVERY:
            return False
        return self._try_room()

    def _try_room(self) -> bool:
        self._last_try = time.monotonic()
        if not self._room():
            return False
        saved = len(self._pending)
        try:
            with self._raw_transaction():
                changes = self.kv._apply(list(self._pending.values()))
        except StoreFull:
            return False
        self.kv._committed(changes)
        self._pending.clear()
        self._pending_rev.clear()
        log.warning("%s: the state disk has room again; %d writes kept in memory meanwhile are saved",
                    self.path, saved)
        self.full = None
        return True

    @contextlib.contextmanager
    def _raw_transaction(self) -> Iterator[None]:
        self._exec("BEGIN IMMEDIATE")
        try:
            yield
            self._exec("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _room(self) -> bool:
        try:
            st = os.statvfs(self.state_dir)
        except OSError:
            return True
        free = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
        return free * st.f_frsize >= ROOM_NEEDED

    def flush(self) -> bool:
        """Write what waited for room, if there is room now; True when nothing waits."""
        return self._ready(force=True) if self.full is not None else True

    def _note_full(self, detail: str) -> None:
        if self.full is None:
            log.warning("%s: the state disk is full (%s): commands and manifest changes are refused "
                        "with ENOSPC; supervision goes on, its records kept in memory until there is room",
                        self.path, detail)
        self.full = f"the state disk is full ({self.state_dir}: {detail})"

    def _refusal(self) -> str:
        return f"{self.full or 'the state disk is full'}: nothing was changed; free some space and try again"

    def cache(self, prefix: str = "") -> Cache:
        """A cache of the records for readers in this process (the view; the engine and its node
        agent, of ``instances/``): fed by the watch, and shown the writes kept in memory on a full
        disk, as this facade's own reads see them. Events and versions are not kept (the event log
        has its own copy; nobody reads versions)."""
        cache = Cache(self.kv, prefix, skip=(EVENTS, VERSIONS))
        self.on_deferred.append(cache.overlay)
        return cache

    @property
    def records(self) -> "RecordsKV":
        return RecordsKV(self)

    def _revision_of(self, key: str) -> int:
        """``key``'s mod_revision as a reader of :attr:`records` sees it (0: absent)."""
        if key in self._pending_rev:
            return self._pending_rev[key]
        if self._get(key) is None:
            return 0
        row = self._db.execute("SELECT mod_revision FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def close(self) -> None:
        if self._pending and not self.flush():
            log.error("%s: the state disk is still full: %d writes kept in memory are lost "
                      "(the services' records and events since it filled)", self.path, len(self._pending))
        self.kv.close()

    # -- reads: SQLite, then what waits for room on top (it is newer) -------------------------

    def _read(self, prefix: str, *, exact: bool = False) -> dict[str, bytes]:
        """The values under ``prefix`` (or of that one key), sorted by key."""
        if exact:
            rows = self._db.execute("SELECT key, value FROM kv WHERE key = ?", (prefix,))
        else:
            end = prefix_end(prefix)
            rows = self._db.execute("SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                                    (prefix, end)) if end else self._db.execute(
                "SELECT key, value FROM kv WHERE key >= ? ORDER BY key", (prefix,))
        return with_pending({k: bytes(v) for k, v in rows}, self._pending.values(), prefix, exact=exact)

    def _events_past_kept(self, service: str) -> list[str]:
        prefix = events_prefix(service)
        row = self._db.execute("SELECT key FROM kv WHERE key >= ? AND key < ? ORDER BY key DESC LIMIT 1 OFFSET ?",
                               (prefix, prefix_end(prefix), self.events_kept)).fetchone()
        if row is None:
            return []
        return [k for (k,) in self._db.execute("SELECT key FROM kv WHERE key >= ? AND key <= ?", (prefix, row[0]))]

    def _last_event_stored(self, service: str) -> Event | None:
        prefix = events_prefix(service)
        row = self._db.execute("SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key DESC LIMIT 1",
                               (prefix, prefix_end(prefix))).fetchone()
        return decode_event(row[0], bytes(row[1])) if row else None


def _is_full(e: sqlite3.OperationalError) -> bool:
    return getattr(e, "sqlite_errorcode", None) in _FULL_CODES


class RecordsKV:
    """:class:`~.kv.KVStore` over a :class:`SqliteStore`, with its full-disk behaviour: what
    waits in memory is read (at a revision of its own, below 0, to compare on) and a write
    that cannot reach the disk waits there too, shown at once to the caches the store made
    (:meth:`SqliteStore.cache`). Writes are of the kind that cannot be refused: what a node
    agent saw happen."""

    def __init__(self, store: SqliteStore) -> None:
        self._s = store

    def _kv(self, key: str, value: bytes) -> KeyValue:
        rev = self._s._revision_of(key)
        return KeyValue(key, value, rev, rev)

    async def get(self, key: str) -> Read:
        await trio.lowlevel.checkpoint()
        value = self._s._get(key)
        return Read(self._s.kv._revision, [] if value is None else [self._kv(key, value)])

    async def range(self, prefix: str) -> Read:
        await trio.lowlevel.checkpoint()
        return Read(self._s.kv._revision, [self._kv(k, v) for k, v in self._s._read(prefix).items()])

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        await trio.lowlevel.checkpoint()
        s = self._s
        with s.transaction():  # no await from the compare to the write: atomic in this process
            for c in compares:
                have = s._revision_of(c.key)
                if have != c.mod_revision:
                    raise Conflict(f"{c.key} is at revision {have}, not {c.mod_revision}: read it again and retry")
            s._record_write(*ops)
        return s.kv._revision

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self.txn([], [Put(key, value, lease)])

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        return await self.txn([], [Delete(key, prefix)])

    def watch(self, prefix: str, start_revision: int) -> AbstractAsyncContextManager[AsyncIterator[list[Change]]]:
        return self._s.kv.watch(prefix, start_revision)

    async def compact(self, revision: int) -> None:
        await self._s.kv.compact(revision)

    async def grant(self, ttl: float) -> Lease:
        return await self._s.kv.grant(ttl)

    async def keepalive(self, lease: int) -> float:
        return await self._s.kv.keepalive(lease)

    async def revoke(self, lease: int) -> None:
        await self._s.kv.revoke(lease)
