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
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Iterator, Protocol


class StoreError(RuntimeError):
    pass


@dataclass
class ServiceRecord:
    name: str
    version: str | None = None  # the version in force (the rollout target)
    previous_version: str | None = None
    manifest: str = ""  # the manifest text in force
    previous_manifest: str = ""  # kept for rollback
    generation: int = 0  # bumped by `restart`: same version, fresh instances
    replicas: int = 0
    update_status: str = "none"  # none | rolling | paused | failed
    steps: int = 0  # batches `step` may still start while paused
    failure: str = ""
    stopped: bool = False
    rollout_from: str | None = None
    deleting: bool = False  # `delete`: stopping everything, then the records go
    # logs/<name> -> instance id: the output of instances gone that is worth
    # reading (`failed-3` of the last failed rollout, `stopped-0` after stop)
    kept_logs: dict[str, int] = field(default_factory=dict)


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

    def transaction(self) -> contextlib.AbstractContextManager[None]: ...

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


class SqliteStore:
    def __init__(self, state_dir: str, *, events_kept: int = EVENTS_KEPT) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "deployfs.db")
        self.events_kept = events_kept
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._depth = 0
        self._migrate()
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")

    def _migrate(self) -> None:
        have = self._db.execute("PRAGMA user_version").fetchone()[0]
        if have > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer deployfs (schema {have}; this one knows up to "
                f"{SCHEMA_VERSION}): upgrade deployfs, or point --state at another directory")
        for n in range(have, SCHEMA_VERSION):
            with self.transaction():
                for stmt in filter(str.strip, _MIGRATIONS[n].split(";")):
                    self._db.execute(stmt)
                self._db.execute(f"PRAGMA user_version = {n + 1}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes atomically; nests (inner blocks join the outer one)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
        finally:
            self._depth = 0

    def close(self) -> None:
        self._db.close()

    # -- manifest files (what users write under manifests/) ---------------------

    def get_file(self, name: str) -> ManifestFile | None:
        row = self._db.execute("SELECT data, mtime FROM manifest_files WHERE name = ?", (name,)).fetchone()
        return ManifestFile(name, bytes(row[0]), row[1]) if row else None

    def put_file(self, name: str, data: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO manifest_files VALUES (?, ?, ?)", (name, data, time.time()))

    def delete_file(self, name: str) -> None:
        self._db.execute("DELETE FROM manifest_files WHERE name = ?", (name,))

    def list_files(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM manifest_files ORDER BY name")]

    # -- versions (every manifest ever applied, by hash) -----------------------

    def put_version(self, service: str, version: str, text: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO versions VALUES (?, ?, ?, ?)", (service, version, text, time.time()))

    def get_version(self, service: str, version: str) -> str | None:
        row = self._db.execute("SELECT text FROM versions WHERE service = ? AND version = ?", (service, version)).fetchone()
        return row[0] if row else None

    # -- services and instances ----------------------------------------------------

    def get_service(self, name: str) -> ServiceRecord | None:
        row = self._db.execute("SELECT data FROM services WHERE name = ?", (name,)).fetchone()
        return _record(ServiceRecord, row[0]) if row else None

    def put_service(self, rec: ServiceRecord) -> None:
        self._db.execute("INSERT OR REPLACE INTO services VALUES (?, ?)", (rec.name, json.dumps(asdict(rec))))

    def list_services(self) -> list[ServiceRecord]:
        return [_record(ServiceRecord, r[0]) for r in self._db.execute("SELECT data FROM services ORDER BY name")]

    def delete_service(self, name: str) -> None:
        with self.transaction():
            for table, key in (("services", "name"), ("instances", "service"), ("versions", "service"),
                               ("events", "service")):
                self._db.execute(f"DELETE FROM {table} WHERE {key} = ?", (name,))

    def list_instances(self, service: str) -> list[InstanceRecord]:
        rows = self._db.execute("SELECT data FROM instances WHERE service = ? ORDER BY id", (service,))
        return [_record(InstanceRecord, r[0]) for r in rows]

    def put_instance(self, rec: InstanceRecord) -> None:
        self._db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?)", (rec.service, rec.id, json.dumps(asdict(rec))))

    def delete_instance(self, service: str, id: int) -> None:
        self._db.execute("DELETE FROM instances WHERE service = ? AND id = ?", (service, id))

    # -- events ------------------------------------------------------------------

    def append_event(self, service: str, segment: int, ts: float, text: str) -> Event:
        cur = self._db.execute("INSERT INTO events (service, segment, ts, text) VALUES (?, ?, ?, ?)",
                               (service, segment, ts, text))
        seq = int(cur.lastrowid or 0)
        if seq % 1000 == 0:
            self._db.execute(
                "DELETE FROM events WHERE service = ? AND seq <= (SELECT seq FROM events WHERE service = ? "
                "ORDER BY seq DESC LIMIT 1 OFFSET ?)", (service, service, self.events_kept))
        return Event(seq, segment, ts, text)

    def events(self, service: str, segment: int) -> list[Event]:
        rows = self._db.execute("SELECT seq, segment, ts, text FROM events WHERE service = ? AND segment = ? ORDER BY seq",
                                (service, segment))
        return [Event(*r) for r in rows]

    def last_event(self, service: str) -> Event | None:
        row = self._db.execute("SELECT seq, segment, ts, text FROM events WHERE service = ? ORDER BY seq DESC LIMIT 1",
                               (service,)).fetchone()
        return Event(*row) if row else None


def _record(cls, data: str):  # type: ignore[no-untyped-def]
    """A record from its JSON; keys this version does not know are ignored, so a
    field can be dropped (or added by a newer writer) without breaking a read."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in json.loads(data).items() if k in known})
