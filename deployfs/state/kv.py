"""The store interface: a revisioned key-value store with conditional writes, watches and leases.

This is what every part of deployfs that keeps state talks to, shaped so that
etcd v3 implements it as directly as SQLite does (docs/cluster.md).  The contract,
which ``tests/state/conformance.py`` checks against every implementation:

Revisions
    The store has one revision counter.  Every write (a :meth:`KVStore.txn`
    that changes something, or the expiry/revocation of a lease with keys)
    takes the next revision, greater than every revision before it, and all
    of its changes carry that one revision.  A read returns the store's
    revision at the time of the read, and each value its ``mod_revision``
    (the revision that last wrote it) and ``create_revision`` (the one that
    created it; recreated after a delete means a new one).  A write that
    changes nothing takes no revision.  Revisions are never reused, also not
    across a restart.

Conditional writes
    A transaction first compares key revisions (``Compare(key, n)``: the key's
    ``mod_revision`` is ``n``; ``n == 0``: the key does not exist), then, if
    every comparison holds, applies its puts and deletes atomically.  If any
    comparison fails nothing is written and :class:`Conflict` is raised: the
    caller reads again and retries (optimistic concurrency).

Watches
    ``watch(prefix, start_revision)`` yields every change to a key under the
    prefix with revision >= ``start_revision``, exactly once, only after the
    write is committed, a revision at a time: each item is the list of that
    revision's changes under the prefix (in the order the transaction made
    them), so a reader that applies items whole never shows half a
    transaction.  Items come in revision order.  Listing a prefix at revision ``r`` and
    then watching from ``r + 1`` misses nothing and sees nothing twice.  A
    watch from a revision the store no longer keeps history for raises
    :class:`Compacted` (at the start or while iterating): list again and watch
    from the new list's revision + 1.

Leases
    ``grant(ttl)`` returns a lease that lives at least ``ttl`` seconds (a store
    may round up: etcd grants at least 2 s; ``Lease.ttl`` says what was
    granted) after its grant or last ``keepalive``.  A key put with a lease is
    deleted, as an ordinary write that watchers see, when the lease expires or
    is revoked.  ``keepalive`` and a put with a lease that is gone raise
    :class:`LeaseNotFound`.  A lease is a promise of a minimum, not a
    maximum: expiry may come late (a busy or restarted store; etcd restores
    leases with their full TTL), never early.

Values are bytes (records are JSON); keys are strings compared as their UTF-8
bytes, and a prefix range is every key that starts with the prefix.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import AsyncIterator, Literal, Protocol, Sequence

from ..model.errors import Error, Kind

# -- errors -------------------------------------------------------------------------


class StoreError(RuntimeError):
    pass


class StoreFull(StoreError):
    """The state disk has no room: the write was refused and changed nothing (the view calls it no_space)."""


class Unavailable(StoreError, Error):
    """No etcd member answered in time: the cluster store is unreachable (the front end's EIO)."""

    def __init__(self, detail: str = "") -> None:
        Error.__init__(self, Kind.UNAVAILABLE, "cluster store unreachable")
        self.detail = detail

    def __str__(self) -> str:
        return self.message + (f" ({self.detail})" if self.detail else "")


class Conflict(StoreError):
    """A compared key changed since the caller read it: nothing was written; read again and retry."""


class Compacted(StoreError):
    """A watch asked for history the store no longer keeps: list again, watch from that revision + 1."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revisions before {compact_revision} are compacted: list again and watch from there")
        self.compact_revision = compact_revision


class LeaseNotFound(StoreError):
    """The lease expired or was revoked (or never existed)."""


# -- values -----------------------------------------------------------------------


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int  # the revision that last wrote it (for a delete: the deleting revision)
    create_revision: int  # 0 for a delete
    lease: int = 0  # 0: none


@dataclass(frozen=True)
class Read:
    """What a read saw: the values (sorted by key) and the store's revision when it looked."""

    revision: int
    kvs: list[KeyValue]

    @property
    def kv(self) -> KeyValue | None:
        """The one value of a single-key read, or None if it does not exist."""
        return self.kvs[0] if self.kvs else None


@dataclass(frozen=True)
class Change:
    """One change seen by a watch."""

    kind: Literal["put", "delete"]
    kv: KeyValue  # a delete carries the key, b"" and the deleting revision

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True)
class Lease:
    id: int  # never 0
    ttl: float  # what was granted, in seconds (>= what was asked)


# -- transactions -------------------------------------------------------------------


@dataclass(frozen=True)
class Compare:
    """Holds when ``key``'s mod_revision is ``mod_revision``; 0 means the key must not exist."""

    key: str
    mod_revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False  # every key that starts with ``key``


Op = Put | Delete


class KVStore(Protocol):
    """The store for a cluster (see the module docstring for the contract)."""

    async def get(self, key: str) -> Read: ...

    async def range(self, prefix: str) -> Read:
        """Every key that starts with ``prefix`` ("" for all), sorted."""
        ...

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        """Apply ``ops`` atomically if every compare holds, else raise :class:`Conflict`.

        Returns the store's revision after it (the write's own, if it changed anything).
        """
        ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int: ...
    async def delete(self, key: str, *, prefix: bool = False) -> int: ...

    def watch(self, prefix: str, start_revision: int) -> AbstractAsyncContextManager[AsyncIterator[list[Change]]]:
        """Changes under ``prefix`` from ``start_revision`` on (0: from the next write), one
        revision's at a time.

        ``async with store.watch(p, rev) as revisions: async for changes in revisions: ...``
        """
        ...

    async def compact(self, revision: int) -> None:
        """Forget history before ``revision``: a watch from earlier raises :class:`Compacted`."""
        ...

    async def grant(self, ttl: float) -> Lease: ...

    async def keepalive(self, lease: int) -> float:
        """Renew the lease for its full TTL (returned); :class:`LeaseNotFound` if it is gone."""
        ...

    async def revoke(self, lease: int) -> None:
        """End the lease now and delete its keys; a lease already gone is not an error."""
        ...


def prefix_end(prefix: str) -> str | None:
    """The smallest key greater than every key that starts with ``prefix`` (None: no bound)."""
    stripped = prefix
    while stripped:
        last = ord(stripped[-1])
        if last < 0x10FFFF:
            following = last + 1 if last + 1 != 0xD800 else 0xE000  # surrogates are not UTF-8
            return stripped[:-1] + chr(following)
        stripped = stripped[:-1]
    return None
