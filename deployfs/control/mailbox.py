"""How every node of a cluster reaches the one controller: records, not calls.

Any node accepts a ctl write; one node runs the controller (control/leader.py).  The node
that got the write puts it under ``commands/<node>/<id>`` and waits for
``replies/<node>/<id>``; the controller carries it out and, in one transaction, records
its effects, the reply and the command's removal, so a command is done exactly once even
if the controller dies halfway (its transaction commits whole or not at all, and a new
controller finds the command still there).  Events said on any node (a node agent's "instance 3
exited ...", a refused command) go under ``say/<node>/<id>`` and the controller writes them
into the service's event log, in the order it hears them: one writer per log keeps the
segments and sequence numbers of every node's copy the same.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import trio

from ..model.errors import CommandError, Kind
from ..state.cache import Cache
from ..state.events import CLUSTER
from ..state.kv import Change, Compare, KVStore, Put, StoreError, Unavailable
from ..state.records import COMMANDS, REPLIES, SAY, service_key

if TYPE_CHECKING:
    from ..state.clusterstore import ClusterStore
    from .engine import Engine

log = logging.getLogger(__name__)

# How long a ctl write waits for the controller's reply (a new controller takes over within
# the node TTL + 1 s; this covers that and the command itself).
REPLY_WAIT = 30.0


class Outbox:
    """A node's side: commands sent and their replies awaited; events handed on."""

    def __init__(self, kv: KVStore, cache: Cache, node: str, *, reply_wait: float = REPLY_WAIT,
                 health: Callable[[], str | None] = lambda: None) -> None:
        """``cache``: of the whole store (it must hold ``replies/``); ``health``: why the store is known
        to be out of reach now (the node's keepalives), or None."""
        self.kv, self.cache, self.node, self.health = kv, cache, node, health
        self.reply_wait = reply_wait
        self._ids = itertools.count()
        self._said: deque[tuple[str, bytes]] = deque()
        self._wake = trio.Event()
        self._replied = trio.Event()
        cache.subscribe(self._heard)

    def _id(self) -> str:
        return f"{self.node}/{time.time_ns():020d}-{next(self._ids)}"

    def _heard(self, changes: list[Change]) -> None:
        if any(c.kv.key.startswith(REPLIES) for c in changes):
            self._replied.set()
            self._replied = trio.Event()

    def say(self, service: str, ts: float, text: str) -> None:
        self._said.append((SAY + self._id(), json.dumps({"service": service, "ts": ts, "text": text}).encode()))
        self._wake.set()

    def refused(self, service: str | None, who: str, reason: str) -> None:
        known = service is not None and self.cache.get(service_key(service)) is not None
        self.say(service if known and service is not None else CLUSTER, time.time(),
                 f"command refused ({who}): {reason}")

    async def command(self, service: str, verb: str, arg: str | None, who: str) -> str:
        if (why := self.health()) is not None:
            raise CommandError(Kind.UNAVAILABLE, f"cluster store unreachable ({why}); nothing was changed")
        id = self._id()
        reply = REPLIES + id
        try:
            # A transaction, never sent twice by the client (a plain put is, after a timeout): a first
            # try that etcd applied late, and the controller carried out and removed, is not made again.
            await self.kv.txn([Compare(COMMANDS + id, 0), Compare(reply, 0)],
                              [Put(COMMANDS + id, json.dumps({"service": service, "verb": verb, "arg": arg,
                                                              "who": who}).encode())])
        except Unavailable:
            raise CommandError(Kind.UNAVAILABLE, "cluster store unreachable: no answer in time, so the command may "
                               "or may not be carried out; look before sending it again") from None
        with trio.move_on_after(self.reply_wait):
            while (kv := self.cache.get(reply)) is None:
                await self._replied.wait()
            self._said.append((reply, b""))  # (deleted by the sender: b"" stands for a delete)
            self._wake.set()
            d = json.loads(kv.value)
            if not d["ok"]:
                raise CommandError(Kind(d["kind"]), d["text"])
            return str(d["text"])
        raise CommandError(Kind.UNAVAILABLE, f"no controller answered within {self.reply_wait:g} s (the cluster "
                           "may be electing one); the command is carried out when one does")

    async def run(self) -> None:
        """Send what was said, in order, trying again while the store is out of reach."""
        while True:
            while not self._said:
                await self._wake.wait()
                self._wake = trio.Event()
            key, value = self._said[0]
            try:
                if value:
                    await self.kv.put(key, value)
                else:
                    await self.kv.delete(key)
            except StoreError as e:
                log.debug("cannot hand on %s yet: %s", key, e)
                await trio.sleep(0.5)
                continue
            self._said.popleft()


class Mailbox:
    """The controller's side: commands carried out and answered, events written, in order."""

    def __init__(self, engine: "Engine", store: "ClusterStore") -> None:
        self.engine, self.store = engine, store
        self._seen: set[str] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cache = self.store.main
        cache.subscribe(self._heard)
        for kv in [*cache.range(SAY), *cache.range(COMMANDS)]:  # what waited for a controller
            self._one(kv.key, kv.value)
        task_status.started()
        await trio.sleep_forever()

    def _heard(self, changes: list[Change]) -> None:
        for c in changes:
            if c.kind == "put":
                self._one(c.kv.key, c.kv.value)
            else:
                self._seen.discard(c.kv.key)

    def _one(self, key: str, value: bytes) -> None:
        if key in self._seen or not key.startswith((SAY, COMMANDS)):
            return
        self._seen.add(key)
        try:
            d: dict[str, Any] = json.loads(value)
        except ValueError:
            log.warning("%s: not JSON; dropped", key)
            self.store.delete_raw(key)
            return
        store = self.store
        # One transaction: the effects, then the command's removal and its reply last, so that if etcd
        # needs it cut in pieces (state/clusterstore.py _split) the command stays until all is written.
        with store.transaction():
            if key.startswith(SAY):
                # Written in the order heard, so never dated before the event above it: a line said on
                # a node while no controller listened (a takeover) gets the time it could be written.
                service = str(d["service"])
                self.engine.events.emit(service, str(d["text"]), max(float(d["ts"]), self.engine.events.mtime(service)))
                store.delete_raw(key)
                return
            try:
                out: dict[str, Any] = {"ok": True, "text": self.engine.command(d["service"], d["verb"], d["arg"],
                                                                               d["who"])}
            except CommandError as e:
                out = {"ok": False, "kind": e.kind.value, "text": e.message}
            store.delete_raw(key)
            store.put_raw(REPLIES + key[len(COMMANDS):], json.dumps(out).encode())
