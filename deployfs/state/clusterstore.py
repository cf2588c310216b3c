"""The engine's synchronous :class:`~.store.Store` over a cluster's store (etcd).

The controller (control/engine.py) reads and writes its records without ``await``: a
reconcile step decides and records in one go.  On etcd a round trip is milliseconds and
can fail, so here, as on SQLite with a full disk, a write is *kept in memory, in order*
and committed by :meth:`ClusterStore.run` behind the caller's back:

- reads are the cache (fed by the store's watch) with the writes not yet committed on
  top, so the engine reads its own writes at once;
- each transaction becomes one etcd transaction, conditional on ``fence()`` (the leader
  key as the controller won it: a deposed controller's writes are refused whole, never
  half applied -- :class:`Deposed`) and, for the fields of an instance record the
  controller owns (``put_instance_fields``), on that record's revision, re-read and merged
  again on a conflict, so the node agent's fields written meanwhile are never lost;
- :meth:`after_commit` runs once etcd has the transaction (routing, wakeups, replies);
- while etcd cannot be reached the writes wait and are retried in order (what happened
  cannot be un-happened); writes people ask for (``transaction(refuse_when_full=True)``)
  are refused at once with ``cluster store unreachable`` (EIO), and one that was waiting
  when the store became unreachable is given up after :data:`GIVE_UP` and its waiter
  told (:meth:`settled`): the reply was EIO, so nothing must change later.

Writes are idempotent as queued (whole values, not increments), so one that timed out
and is sent again cannot apply twice.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import trio

from .cache import Cache
from .kv import Compare, Conflict, Delete, KVStore, Op, Put, StoreError, Unavailable
from .records import InstanceRecord, decode, decode_event, encode, events_prefix, instance_key
from .store import Event, RecordStore, with_pending

log = logging.getLogger(__name__)

# A cluster keeps fewer events per service than one machine: every node's cache holds them.
EVENTS_KEPT = 10_000
# How long a write people asked for may wait for an unreachable store before it is given up, past
# the first try that found it so (the client's 3 s): the writer is waiting on close(), answered EIO.
GIVE_UP = 0.0
RETRY = 0.2
# etcd refuses a transaction of more operations than this (--max-txn-ops).
MAX_OPS = 128


class Deposed(StoreError):
    """The fence no longer holds: another controller leads; nothing of this one's is written."""


@dataclass
class _Txn:
    ops: list[Op]
    patches: dict[str, tuple[InstanceRecord, tuple[str, ...]]]  # key -> the controller's fields to merge
    refusable: bool
    after: list[Callable[[], None]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None
    revision: int = 0
    since: float | None = None  # when it first found the store out of reach


class ClusterStore(RecordStore):
    def __init__(self, kv: KVStore, cache: Cache, *, fence: Callable[[], Sequence[Compare]] = lambda: (),
                 give_up: bool = False, health: Callable[[], str | None] = lambda: None,
                 events_kept: int = EVENTS_KEPT) -> None:
        """``cache``: of the whole store, what reads read (the caller runs it).  ``give_up``: a
        write people asked for is dropped once the store was out of reach for :data:`GIVE_UP`
        (a node's view: its writer was answered EIO); the controller's never are (its memory
        has them: it goes on from them)."""
        self.give_up = give_up
        self.health = health  # why the store is out of reach as others see it (a node's keepalives), or None
        self.kv, self.main = kv, cache
        self.fence = fence
        self.events_kept = events_kept
        self.full: str | None = None  # never: etcd has no disk of ours to fill (unreachable is told apart)
        self.unreachable: str | None = None  # why the last commit failed, while it goes on failing
        self.last_revision = 0  # the store's revision after this facade's last commit
        self._queue: list[_Txn] = []
        self._pending: dict[str, Op] = {}  # the newest write of each key not yet committed (prefix delete: "\0" + key)
        self._open: _Txn | None = None
        self._wake = trio.Event()
        self._seqs: dict[str, int] = {}
        self._next_id: int | None = None
        self._handed = 0
        self.deposed = trio.Event()
        self._caches: list[Cache] = []

    # -- transactions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, refuse_when_full: bool = False) -> Iterator[None]:
        if self._open is not None:
            self._open.refusable |= refuse_when_full
            yield
            return
        if refuse_when_full:
            self._refuse_if_unreachable()
        txn = self._open = _Txn([], {}, refuse_when_full)
        try:
            yield
        finally:
            self._open = None
        if txn.ops or txn.patches:
            self._queue.append(txn)
            for op in txn.ops:
                self._remember(op)
            for cache in self._caches:
                cache.overlay(txn.ops)
            self._wake.set()
        else:
            for fn in txn.after:
                fn()

    def _refuse_if_unreachable(self) -> None:
        why = self.unreachable or self.health()
        if why is not None:
            raise Unavailable(f"{why}; nothing was changed")
        if self.deposed.is_set():
            raise Unavailable("this node no longer leads the cluster; nothing was changed")

    def after_commit(self, fn: Callable[[], None]) -> None:
        if self._open is not None:
            self._open.after.append(fn)
        elif self._queue:
            self._queue[-1].after.append(fn)  # after what was already written (in order)
        else:
            fn()

    def flush(self) -> bool:
        return not self._queue

    def _write(self, *ops: Op) -> None:
        if self._open is None:
            with self.transaction(refuse_when_full=True):
                self._write(*ops)
            return
        self._open.refusable = True
        self._record_write(*ops)

    def _record_write(self, *ops: Op) -> None:
        if self._open is None:
            with self.transaction():
                self._record_write(*ops)
            return
        for op in ops:
            self._open.ops.append(op)
            self._open.patches.pop(op.key, None)
            self._remember(op)  # read back inside the transaction too

    def put_instance_fields(self, rec: InstanceRecord, names: Iterable[str]) -> None:
        """Only these fields, merged over the record as etcd has it when the write is sent."""
        names = tuple(names)
        with self.transaction():
            super().put_instance_fields(rec, names)  # read back at once, as merged over what is known now
            assert self._open is not None
            self._open.patches[instance_key(rec.service, rec.id)] = (rec, names)

    def _remember(self, op: Op) -> None:
        key = "\0" + op.key if isinstance(op, Delete) and op.prefix else op.key
        if key.startswith("\0"):
            for k in [k for k in self._pending if k.lstrip("\0").startswith(op.key)]:
                del self._pending[k]
        self._pending.pop(key, None)
        self._pending[key] = op

    # -- reads: the cache, the writes not yet committed on top ---------------------------------------

    def _read(self, prefix: str, *, exact: bool = False) -> dict[str, bytes]:
        if exact:
            kv = self.main.get(prefix)
            out = {} if kv is None else {prefix: kv.value}
        else:
            out = {kv.key: kv.value for kv in self.main.range(prefix)}
        return with_pending(out, self._pending.values(), prefix, exact=exact)

    def _events_past_kept(self, service: str) -> list[str]:
        keys = [kv.key for kv in self.main.range(events_prefix(service))]
        return keys[:max(0, len(keys) - self.events_kept)]

    def _last_event_stored(self, service: str) -> Event | None:
        kvs = self.main.range(events_prefix(service))
        return decode_event(kvs[-1].key, kvs[-1].value) if kvs else None

    def put_raw(self, key: str, value: bytes) -> None:
        self._record_write(Put(key, value))

    def delete_raw(self, key: str) -> None:
        self._record_write(Delete(key))

    def cache(self, prefix: str = "") -> Cache:
        """A cache for a reader beside the controller, shown its writes before they commit."""
        cache = Cache(self.kv, prefix)
        self._caches.append(cache)
        return cache

    @property
    def records(self) -> KVStore:
        return self.kv

    def close(self) -> None:
        if self._queue:
            log.warning("%d writes to the cluster store were not committed", len(self._queue))

    # -- committing ------------------------------------------------------------------------------------

    async def settled(self) -> None:
        """Until everything written so far is committed (or raise why a write asked for was not)."""
        if not self._queue:
            return
        last = self._queue[-1]
        await last.done.wait()
        if last.error is not None:
            raise last.error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit what is queued, in order, for ever (the main cache must be running)."""
        task_status.started()
        while True:
            if not self._queue:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            txn = self._queue[0]
            try:
                await self._commit(txn)
            except Deposed as e:
                self.deposed.set()
                for t in self._queue:
                    t.error = Unavailable(str(e))
                    t.done.set()
                self._queue.clear()
                self._pending.clear()
                raise
            except Unavailable as e:
                await self._unavailable(e)
                continue
            except StoreError as e:  # refused for good (too large, a bug): say so, never retry for ever
                log.error("cluster store refused a write of %s: %s", sorted({op.key for op in txn.ops})[:5], e)
                self._queue.pop(0)
                self._rebuild_pending()
                txn.error = e
                txn.done.set()
                continue
            if self.unreachable is not None:
                log.warning("cluster store reachable again")
                self.unreachable = None
            self._queue.pop(0)
            self.last_revision = max(self.last_revision, txn.revision)
            await self.main.wait_for(txn.revision)
            self._rebuild_pending()
            txn.done.set()
            for fn in txn.after:
                try:
                    fn()
                except Exception:
                    log.exception("after commit")

    async def _unavailable(self, e: Unavailable) -> None:
        """Wait to try again; a write people asked for is given up after GIVE_UP (``give_up``)."""
        if self.unreachable is None:
            log.warning("cluster store unreachable: %s; %d writes wait", e.detail, len(self._queue))
        self.unreachable = e.detail or "no member answered"
        now = trio.current_time()
        for t in [t for t in self._queue if t.refusable and self.give_up]:  # answered EIO: nothing may change
            if t.since is None:
                t.since = now
            if now - t.since >= GIVE_UP:
                t.error = Unavailable(f"{e.detail or 'no answer'}: the write may or may not have been kept "
                                      "(etcd may apply it once it can); read it back before writing again")
                t.done.set()
                self._queue.remove(t)
        self._rebuild_pending()
        if not self._queue:  # nothing left to find out with: the store's health says from now on
            self.unreachable = None
        await trio.sleep(RETRY)

    def _rebuild_pending(self) -> None:
        self._pending.clear()
        for t in self._queue:
            for op in t.ops:
                self._remember(op)

    async def _commit(self, txn: _Txn) -> None:
        for ops in _split(txn.ops):
            while True:
                compares = list(self.fence())
                ops = list(ops)
                for i, op in enumerate(ops):
                    if isinstance(op, Put) and op.key in txn.patches:
                        rec, names = txn.patches[op.key]
                        read = (await self.kv.get(op.key)).kv
                        if read is None:
                            compares.append(Compare(op.key, 0))
                            continue
                        now = decode(InstanceRecord, read.value)
                        for name in names:
                            setattr(now, name, getattr(rec, name))
                        ops[i] = Put(op.key, encode(now), op.lease)
                        compares.append(Compare(op.key, read.mod_revision))
                try:
                    txn.revision = await self.kv.txn(compares, ops)
                    break
                except Conflict:
                    for c in self.fence():
                        held = (await self.kv.get(c.key)).kv
                        if (held.mod_revision if held else 0) != c.mod_revision:
                            raise Deposed(f"{c.key} changed: another node leads now") from None


def _split(ops: list[Op]) -> list[list[Op]]:
    """etcd names each key once per transaction and takes at most MAX_OPS: keep the last write
    of a key (in its place), and start a new transaction where a put falls under a prefix this
    one deletes, or at the size limit."""
    out: list[list[Op]] = [[]]
    deleted: list[str] = []
    for op in ops:
        cur = out[-1]
        if any(op.key.startswith(p) for p in deleted) or len(cur) >= MAX_OPS:
            out.append([])
            deleted = []
            cur = out[-1]
        covered = op.key if isinstance(op, Delete) and op.prefix else None
        cur[:] = [o for o in cur if o.key != op.key and not (covered is not None and o.key.startswith(covered))]
        cur.append(op)
        if isinstance(op, Delete) and op.prefix:
            deleted.append(op.key)
    return [o for o in out if o]

