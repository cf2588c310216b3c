"""Durable state: manifests, services, instances, events.

The interface (:class:`Store`) is deliberately key-value shaped: records go in
and out whole, as JSON, keyed by name or (service, id).  A second
implementation on a distributed key-value store (etcd, Consul, FoundationDB)
can replace :class:`SqliteStore` without touching the engine.  Events are the
one append-only stream; they carry a per-service ``segment`` number so the
filesystem can rotate ``events`` into ``events.1`` like logrotate does.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed transaction
survives the death of the process that wrote it (kill -9), which is the crash
deployfs promises to survive; power loss may lose the last few commits.
Schema changes are numbered migrations tracked in ``PRAGMA user_version``; a
database from a newer deployfs is refused, never "upgraded down".

A full state disk must not stop supervision (issue 18.5).  Writes are of two
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
import itertools
import json
import logging
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Protocol

from . import statedir
from .kv import StoreError, StoreFull

log = logging.getLogger(__name__)


@dataclass
class ServiceRecord:
    name: str
    version: str | None = None  # the version in force (the rollout target)
    previous_version: str | None = None  # the rollback target (see Service.set_previous)
    manifest: str = ""  # the manifest text in force
    previous_manifest: str = ""  # kept for rollback
    # The last version that completed a rollout, and the one that completed before it:
    # only these may become a rollback target, never a release that failed or was abandoned.
    good_version: str | None = None
    good_manifest: str = ""
    good_generation: int = 0
    before_good_version: str | None = None
    before_good_manifest: str = ""
    generation: int = 0  # bumped by `restart`: same version, fresh instances
    replicas: int = 0
    update_status: str = "none"  # none | rolling | paused | canary | failed
    steps: int = 0  # batches `step` may still start while paused
    failure: str = ""
    stopped: bool = False
    rollout_from: str | None = None
    deleting: bool = False  # `delete`: stopping everything, then the records go
    # logs/<name> -> instance id: the output of instances gone that is worth
    # reading (`failed-3` of the last failed rollout, `stopped-0` after stop)
    kept_logs: dict[str, int] = field(default_factory=dict)
    rollout_started: float | None = None  # wall clock: a rollout's duration survives a restart of deployfs
    canary_phase: bool = False  # an `update canary` rollout not yet promoted (or rolled back)
    rolled_back: str = ""  # auto_rollback: why the last rollout failed, once it rolled back by itself


@dataclass
class InstanceRecord:
    service: str
    id: int
    slot: int
    version: str
    generation: int = 0
    pid: int | None = None
    start_time: int | None = None  # /proc/<pid>/stat field 22: tells a reused pid apart
    port: int | None = None
    state: str = "starting"  # starting | running | draining | stopped | exited | failed
    health: str = "starting"  # starting | healthy | unhealthy | stopped | failed
    restarts: int = 0
    started: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Event:
    seq: int
    segment: int
    ts: float
    text: str


@dataclass(frozen=True)
class ManifestFile:
    name: str
    data: bytes
    mtime: float


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
    def put_instance(self, rec: InstanceRecord) -> None: ...
    def delete_instance(self, service: str, id: int) -> None: ...

    def append_event(self, service: str, segment: int, ts: float, text: str) -> Event: ...
    def events(self, service: str, segment: int) -> list[Event]: ...
    def last_event(self, service: str) -> Event | None: ...
    def close(self) -> None: ...


SCHEMA_VERSION = 1
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
]
# Events kept per service in the database (the files show the last two segments).
EVENTS_KEPT = 100_000


# While full: how often a write retries the disk, and the room it wants first
# (so a disk with a few pages free does not flap between full and not).
RETRY_EVERY = 1.0
ROOM_NEEDED = 512 * 1024
# SQLite's codes for "no room": a full database or WAL, and a WAL index
# (the -shm file) that cannot grow.
_FULL_CODES = {13, 4874}  # SQLITE_FULL, SQLITE_IOERR_SHMSIZE

_Op = tuple[Callable[..., Any], tuple[Any, ...]]


class SqliteStore:
    def __init__(self, state_dir: str, *, events_kept: int = EVENTS_KEPT) -> None:
        statedir.makedirs(state_dir)
        self.path = os.path.join(state_dir, statedir.DB_NAME)
        self.state_dir = state_dir
        self.events_kept = events_kept
        self.full: str | None = None
        self._pending: dict[tuple[Any, ...], _Op] = {}  # waiting for room, in order
        self._event_keys = itertools.count()
        self._last_try = 0.0
        self._ops: list[tuple[tuple[Any, ...], _Op]] | None = None  # the open transaction's, or None
        self._deferring = False  # the open transaction is kept in memory, not in SQLite
        self._refusing = False
        self._after: list[Callable[[], None]] = []
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
            with self.transaction(refuse_when_full=True):
                for stmt in filter(str.strip, _MIGRATIONS[n].split(";")):
                    self._exec(stmt)
                self._exec(f"PRAGMA user_version = {n + 1}")

    # -- transactions and a full disk ---------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, refuse_when_full: bool = False) -> Iterator[None]:
        """Group writes atomically; nests (inner blocks join the outer one).

        With ``refuse_when_full`` a full disk raises :class:`StoreFull` and
        nothing is written; without, the engine's records wait in memory.
        """
        if self._ops is not None:
            yield
            return
        deferring = not self._ready(force=refuse_when_full)
        if deferring and refuse_when_full:
            raise StoreFull(self._refusal())
        self._ops, self._deferring, self._refusing, self._after = [], deferring, refuse_when_full, []
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
                for key, op in self._ops:
                    self._defer(key, op)
            after = self._after
        finally:
            self._ops, self._deferring, self._refusing, self._after = None, False, False, []
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

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        """A write people asked for (a manifest file, a command): refused on a full disk."""
        if self._ops is None and not self._ready(force=True):
            raise StoreFull(self._refusal())
        if self._ops is not None:
            self._refusing = True  # a transaction holding one is refused whole, never half kept
            if self._deferring:
                raise StoreFull(self._refusal())
        self._exec(sql, args)

    def _record_write(self, key: tuple[Any, ...], fn: Callable[..., Any], *args: Any) -> Any:
        """A record of what happened (service, instance, event): kept in memory on a full disk."""
        op = (fn, args)
        if self._ops is not None:
            self._ops.append((key, op))
            if self._deferring:
                return None
            try:
                return fn(*args)
            except StoreFull:
                if self._refusing:
                    raise
                self._deferring = True
                return None
        if self._ready(force=False):
            try:
                return fn(*args)
            except StoreFull:
                pass
        self._defer(key, op)
        return None

    def _defer(self, key: tuple[Any, ...], op: _Op) -> None:
        self._pending.pop(key, None)  # the newest write of a record wins; it goes last
        self._pending[key] = op

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
                for fn, args in list(self._pending.values()):
                    fn(*args)
        except StoreFull:
            return False
        self._pending.clear()
        log.warning("%s: the state disk has room again; %d writes kept in memory meanwhile are saved",
                    self.path, saved)
        self.full = None
        return True

    @contextlib.contextmanager
    def _raw_transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
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

    def close(self) -> None:
        if self._pending and not self.flush():
            log.error("%s: the state disk is still full: %d writes kept in memory are lost "
                      "(the services' records and events since it filled)", self.path, len(self._pending))
        self._db.close()

    # -- manifest files (what users write under manifests/) ---------------------

    def get_file(self, name: str) -> ManifestFile | None:
        row = self._db.execute("SELECT data, mtime FROM manifest_files WHERE name = ?", (name,)).fetchone()
        return ManifestFile(name, bytes(row[0]), row[1]) if row else None

    def put_file(self, name: str, data: bytes) -> None:
        self._write("INSERT OR REPLACE INTO manifest_files VALUES (?, ?, ?)", (name, data, time.time()))

    def delete_file(self, name: str) -> None:
        self._write("DELETE FROM manifest_files WHERE name = ?", (name,))

    def list_files(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM manifest_files ORDER BY name")]

    # -- versions (every manifest ever applied, by hash) -----------------------

    def put_version(self, service: str, version: str, text: str) -> None:
        self._write("INSERT OR IGNORE INTO versions VALUES (?, ?, ?, ?)", (service, version, text, time.time()))

    def get_version(self, service: str, version: str) -> str | None:
        row = self._db.execute("SELECT text FROM versions WHERE service = ? AND version = ?", (service, version)).fetchone()
        return row[0] if row else None

    # -- services and instances ----------------------------------------------------
    # Reads look at what waits for room first: it is newer than SQLite.

    def get_service(self, name: str) -> ServiceRecord | None:
        waiting = self._pending.get(("service", name))
        if waiting is not None:
            data = waiting[1][1]
            return None if data is None else _record(ServiceRecord, data)
        row = self._db.execute("SELECT data FROM services WHERE name = ?", (name,)).fetchone()
        return _record(ServiceRecord, row[0]) if row else None

    def put_service(self, rec: ServiceRecord) -> None:
        self._record_write(("service", rec.name), self._put_service, rec.name, json.dumps(asdict(rec)))

    def list_services(self) -> list[ServiceRecord]:
        data: dict[str, str | None] = {r[0]: r[1] for r in self._db.execute("SELECT name, data FROM services")}
        data.update({k[1]: op[1][1] for k, op in self._pending.items() if k[0] == "service"})
        return [_record(ServiceRecord, d) for _, d in sorted(data.items()) if d is not None]

    def delete_service(self, name: str) -> None:
        # The instances are gone already: a record of that, kept like any other on a full disk.
        for key in [k for k, op in self._pending.items() if k[1] == name or (k[0] == "event" and op[1][0] == name)]:
            del self._pending[key]
        self._record_write(("service", name), self._put_service, name, None)

    def _put_service(self, name: str, data: str | None) -> None:
        if data is not None:
            self._exec("INSERT OR REPLACE INTO services VALUES (?, ?)", (name, data))
            return
        for table, key in (("services", "name"), ("instances", "service"), ("versions", "service"),
                           ("events", "service")):
            self._exec(f"DELETE FROM {table} WHERE {key} = ?", (name,))

    def list_instances(self, service: str) -> list[InstanceRecord]:
        rows = self._db.execute("SELECT id, data FROM instances WHERE service = ?", (service,))
        data: dict[int, str | None] = dict(rows.fetchall())
        data.update({k[2]: op[1][2] for k, op in self._pending.items() if k[:2] == ("instance", service)})
        return [_record(InstanceRecord, d) for _, d in sorted(data.items()) if d is not None]

    def put_instance(self, rec: InstanceRecord) -> None:
        self._record_write(("instance", rec.service, rec.id), self._put_instance,
                           rec.service, rec.id, json.dumps(asdict(rec)))

    def delete_instance(self, service: str, id: int) -> None:
        self._record_write(("instance", service, id), self._put_instance, service, id, None)

    def _put_instance(self, service: str, id: int, data: str | None) -> None:
        if data is None:
            self._exec("DELETE FROM instances WHERE service = ? AND id = ?", (service, id))
        else:
            self._exec("INSERT OR REPLACE INTO instances VALUES (?, ?, ?)", (service, id, data))

    # -- events ------------------------------------------------------------------

    def append_event(self, service: str, segment: int, ts: float, text: str) -> Event:
        key = ("event", next(self._event_keys))
        seq = self._record_write(key, self._append_event, service, segment, ts, text)
        return Event(seq or 0, segment, ts, text)  # seq 0: waiting for room

    def _append_event(self, service: str, segment: int, ts: float, text: str) -> int:
        cur = self._exec("INSERT INTO events (service, segment, ts, text) VALUES (?, ?, ?, ?)",
                         (service, segment, ts, text))
        seq = int(cur.lastrowid or 0)
        if seq % 1000 == 0:
            self._exec(
                "DELETE FROM events WHERE service = ? AND seq <= (SELECT seq FROM events WHERE service = ? "
                "ORDER BY seq DESC LIMIT 1 OFFSET ?)", (service, service, self.events_kept))
        return seq

    def _waiting_events(self, service: str) -> list[Event]:
        return [Event(0, *op[1][1:]) for k, op in self._pending.items() if k[0] == "event" and op[1][0] == service]

    def events(self, service: str, segment: int) -> list[Event]:
        rows = self._db.execute("SELECT seq, segment, ts, text FROM events WHERE service = ? AND segment = ? ORDER BY seq",
                                (service, segment))
        return [Event(*r) for r in rows] + [e for e in self._waiting_events(service) if e.segment == segment]

    def last_event(self, service: str) -> Event | None:
        waiting = self._waiting_events(service)
        if waiting:
            return waiting[-1]
        row = self._db.execute("SELECT seq, segment, ts, text FROM events WHERE service = ? ORDER BY seq DESC LIMIT 1",
                               (service,)).fetchone()
        return Event(*row) if row else None


def _is_full(e: sqlite3.OperationalError) -> bool:
    return getattr(e, "sqlite_errorcode", None) in _FULL_CODES


def _record(cls, data: str):  # type: ignore[no-untyped-def]
    """A record from its JSON; keys this version does not know are ignored, so a
    field can be dropped (or added by a newer writer) without breaking a read."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in json.loads(data).items() if k in known})
