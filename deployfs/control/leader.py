"""Which node runs the controller: the holder of the ``leader`` key, under its node's lease.

One controller decides for the whole cluster (as kube-controller-manager does: one elected
instance runs every controller); it leads every service, and ``active/<svc>/leader`` names
it.  Winning is one conditional write (the key absent, put under this node's lease); losing
is the key gone (the lease ran out: the node froze, died, or lost the store past its TTL)
or held by another.  A node that loses it cancels its controller at once, and every write
the controller queued is conditional on the key as it was won (state/clusterstore.py: the
fence), so a deposed controller that has not noticed yet cannot write twice.  The others
watch the key and try as soon as it is gone: a new controller within the lease's TTL plus a
watch's latency, and it starts from the records (the same recovery as a restart).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Awaitable, Callable

import trio

from ..state.cache import Cache
from ..state.kv import Change, Compare, Conflict, Delete, KeyValue, KVStore, Put, StoreError
from ..state.records import LEADER

log = logging.getLogger(__name__)

Lead = Callable[[Compare], Awaitable[None]]


class Leadership:
    def __init__(self, kv: KVStore, cache: Cache, node: str, lease: Callable[[], int]) -> None:
        """``cache``: of the whole store (it holds ``leader``); ``lease``: this node's now (0: none)."""
        self.kv, self.cache, self.node, self.lease = kv, cache, node, lease
        self._moved = trio.Event()
        self.terms = 0  # how often this node won
        self._holder: str | None = self.holder()  # who holds the key, as last seen
        self.lapsed: str | None = None  # who held it when it went without a resign (its lease lapsed)
        self._won_after: str | None = None  # ``lapsed`` when this node last won
        cache.subscribe(self._heard)

    def _heard(self, changes: list[Change]) -> None:
        for c in changes:
            if c.kv.key != LEADER:
                continue
            if c.kind == "put":
                self._holder, self.lapsed = self.holder(), None
            else:
                self.lapsed, self._holder = self._holder, None
            self._moved.set()
            self._moved = trio.Event()

    def holder(self) -> str | None:
        kv = self.cache.get(LEADER)
        if kv is None:
            return None
        try:
            return str(json.loads(kv.value)["node"])
        except (ValueError, KeyError, TypeError):
            return None

    async def run(self, lead: Lead) -> None:
        """For ever: win the key when it is free, run ``lead(fence)`` while it is ours."""
        while True:
            fence = await self._win()
            self.terms += 1
            log.info("node %s leads the cluster (controller term %d)", self.node, self.terms)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_lost, fence, nursery.cancel_scope)
                await lead(fence)
                nursery.cancel_scope.cancel()
            log.warning("node %s no longer leads the cluster", self.node)

    async def _win(self) -> Compare:
        while True:
            moved = self._moved
            lease = self.lease()
            held = self.cache.get(LEADER)
            if lease and (held is None or self._left_by_my_last_run(held, lease)):
                value = json.dumps({"node": self.node, "host": socket.gethostname(), "pid": os.getpid(),
                                    "since": round(time.time(), 3)}).encode()
                was = 0 if held is None else held.mod_revision
                lapsed = self.lapsed  # (our own win, heard below, forgets it)
                try:
                    rev = await self.kv.txn([Compare(LEADER, was)], [Put(LEADER, value, lease)])
                    self._won_after = lapsed
                    await self.cache.wait_for(rev)
                    return Compare(LEADER, rev)
                except Conflict:
                    pass
                except StoreError as e:
                    log.debug("cannot campaign yet: %s", e)
                    await trio.sleep(0.5)
                    continue
            with trio.move_on_after(1.0):  # (a lease renewed after a loss does not move the key)
                await moved.wait()

    def _left_by_my_last_run(self, held: KeyValue, lease: int) -> bool:
        """The key is held under this node's lease by a server that ran here before: it crashed
        and this one, restarted within the TTL, took its lease back (node/membership.py).  That
        lease never lapses while this server keeps it alive, so the key would never go and no node
        would ever lead again; the server before is gone (one server per state dir), so the key
        is this server's to take over, fenced like any win (it compares the key's revision)."""
        if held.lease != lease:
            return False
        try:
            return int(json.loads(held.value)["pid"]) != os.getpid()
        except (ValueError, KeyError, TypeError):
            return True  # not a holder this code wrote; still under our lease: nobody else's

    async def _until_lost(self, fence: Compare, scope: trio.CancelScope) -> None:
        while True:
            moved = self._moved
            kv = self.cache.get(LEADER)
            if kv is None or kv.mod_revision != fence.mod_revision:
                scope.cancel()
                return
            await moved.wait()

    def take_lapsed(self) -> str | None:
        """The node whose lapsed lease freed the key this node just won (None: a resign, or ours)."""
        lapsed, self._won_after = self._won_after, None
        return lapsed if lapsed != self.node else None

    async def resign(self, fence: Compare) -> None:
        """Hand the key on now (a node stopping): another node leads at once."""
        try:
            await self.kv.txn([fence], [Delete(LEADER)])
        except StoreError as e:
            log.warning("could not resign the lead (it passes on when the lease runs out): %s", e)
