"""A local copy of (a prefix of) the store, kept current by its watch.

Readers -- the view above all -- read records here without a round trip to
the store: on SQLite no query, on etcd no network.  The copy is listed once,
then follows the watch from the list's revision + 1; a watch that falls off
the store's history (:class:`~deployfs.state.kv.Compacted`) lists again, and
listeners are told what changed as if they had seen every change.

A writer that wants to read its own write waits for the revision its write
returned: ``await cache.wait_for(rev)``.  The copy is always a state the
store was in at :attr:`Cache.revision` (changes are applied a revision at a
time), never a mix of two.
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable, Sequence

import trio

from .kv import Change, Compacted, Delete, KeyValue, KVStore, Put, StoreError, prefix_end

log = logging.getLogger(__name__)

Listener = Callable[[list[Change]], None]
RETRY = 1.0  # seconds between tries while the store cannot be reached


class Cache:
    def __init__(self, store: KVStore, prefix: str = "", *, skip: tuple[str, ...] = ()) -> None:
        """``skip``: prefixes under ``prefix`` not kept (listeners still hear of them, and the
        revision still moves with them, so ``wait_for`` any revision of the store works)."""
        self.store = store
        self.prefix = prefix
        self.skip = skip
        self.revision = 0  # the store's revision this copy shows (0: not listed yet)
        self.relists = 0  # how often the watch fell behind the store's history
        self._kvs: dict[str, KeyValue] = {}
        self._keys: list[str] = []  # sorted, for prefix reads
        self._listeners: list[Listener] = []
        self._moved = trio.Event()

    # -- reads ------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        return self._kvs.get(key)

    def range(self, prefix: str) -> list[KeyValue]:
        """Every key that starts with ``prefix``, sorted."""
        lo = bisect.bisect_left(self._keys, prefix)
        end = prefix_end(prefix)
        hi = len(self._keys) if end is None else bisect.bisect_left(self._keys, end, lo)
        return [self._kvs[k] for k in self._keys[lo:hi]]

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with the changes of each revision, once applied (a re-list: what it changed)."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        """Stop calling ``listener`` (one that outlives its use would be called for ever)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def wait_for(self, revision: int) -> None:
        """Until the copy shows ``revision`` (one that wrote under this cache's prefix) or later."""
        while self.revision < revision:
            await self._moved.wait()

    # -- keeping up -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """List, then follow the watch for ever; ``started`` once the first list is in."""
        await self._list()
        task_status.started()
        while True:
            try:
                async with self.store.watch(self.prefix, self.revision + 1) as revisions:
                    async for changes in revisions:
                        self._apply(changes)
            except Compacted as e:
                self.relists += 1
                log.warning("cache of %r: %s; listing again", self.prefix, e)
                await self._relist()
            except StoreError as e:  # out of reach (a cluster's etcd): readers keep the last known state
                log.warning("cache of %r: %s; trying again", self.prefix, e)
                await trio.sleep(RETRY)

    async def _relist(self) -> None:
        while True:
            try:
                await self._list()
                return
            except StoreError as e:
                log.warning("cache of %r: cannot list: %s; trying again", self.prefix, e)
                await trio.sleep(RETRY)

    async def _list(self) -> None:
        read = await self.store.range(self.prefix)
        fresh = {kv.key: kv for kv in read.kvs if not kv.key.startswith(self.skip)}
        changes = [Change("delete", KeyValue(k, b"", read.revision, 0)) for k in self._kvs if k not in fresh]
        changes += [Change("put", kv) for k, kv in fresh.items() if self._kvs.get(k) != kv]
        self._kvs = fresh
        self._keys = sorted(fresh)
        self._advance(read.revision, changes)

    def _apply(self, changes: list[Change]) -> None:
        for c in changes:
            self._change(c)
        self._advance(changes[-1].revision, changes)

    def _change(self, c: Change) -> None:
        key = c.kv.key
        if key.startswith(self.skip):
            return
        if c.kind == "put":
            if key not in self._kvs:
                bisect.insort(self._keys, key)
            self._kvs[key] = c.kv
        elif self._kvs.pop(key, None) is not None:
            del self._keys[bisect.bisect_left(self._keys, key)]

    def overlay(self, ops: Sequence[Put | Delete]) -> None:
        """Show writes the store keeps in memory, not yet committed (SQLite on a full disk:
        state/store.py), at once and without a revision; their commit comes through the watch
        later with the same values.  Only a store in this process has such writes."""
        changes: list[Change] = []
        for op in ops:  # one at a time: a prefix delete removes what a put before it in ops wrote
            if isinstance(op, Put):
                now = [Change("put", KeyValue(op.key, op.value, self.revision, self.revision, op.lease))]
            else:
                keys = [kv.key for kv in self.range(op.key)] if op.prefix else [op.key]
                now = [Change("delete", KeyValue(k, b"", self.revision, 0)) for k in keys if k in self._kvs]
            for c in now:
                if c.kv.key.startswith(self.prefix):
                    self._change(c)
                    changes.append(c)
        if changes:
            self._advance(self.revision, changes)

    def _advance(self, revision: int, changes: list[Change]) -> None:
        self.revision = max(self.revision, revision)
        self._moved.set()
        self._moved = trio.Event()
        if changes:
            for listener in list(self._listeners):
                try:
                    listener(changes)
                except Exception:  # one listener's bug must not stop the copy
                    log.exception("cache listener %r failed", listener)
