"""Every node's follower of the published routing table (docs/cluster.md, "Routing").

The controller writes each service's table as a record, ``routes/<svc>``
(traffic/published.py); every node runs a :class:`Follower` that feeds it to the node's
own router, so a client may send to any node's router.  The follower:

- applies each route record to the local router as it arrives (the cache's watch);
- leaves out at once the backends of a node it sees down (``alive``, given by the serve
  layer: in a cluster the node's ``alive/`` key, on one machine always alive), without
  waiting for the controller to write a new table -- the controller needs the node's lease
  to lapse and then a reconcile step, and every router must stop sending there before;
- drains a backend the table removed (waits for its connections to end here), and
- answers with ``routed/<svc>/<node>`` (:class:`~deployfs.state.records.RouteAck`): the
  table's revision once its router has it, the backends it still drains, and why its
  router refused the table (it could not listen).  The controller's ``drain`` waits for
  these answers from every live node before it stops an instance.

The decisions are the pure functions at the top; the class only moves data.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable, Protocol, Sequence

import trio

from ..state.cache import Cache
from ..state.kv import Change, KVStore, StoreError
from ..state.records import ROUTED, ROUTES, RouteAck, RouteRecord, decode, encode, route_key, routed_key
from .router import Backend

log = logging.getLogger(__name__)

# A removed backend's connections are waited for at most this long here (the controller stops
# the instance after its own drain_timeout, which ends them sooner).
DRAIN_MAX = 120.0
RETRY = 1.0  # seconds between tries to write an answer while the store is out of reach

Table = tuple[int | None, list[Backend], "list[int] | None", str]  # port, backends, weights, protocol


class LocalRouter(Protocol):
    """This node's router as the follower feeds it (traffic/router_client.py, haproxy.py): the
    engine's ``Routing`` shape, which both routers have."""

    def set_backends(self, service: str, port: int | None, backends: list[Backend],
                     weights: list[int] | None = None, *, protocol: str = "tcp") -> None: ...
    def routed(self) -> bool: ...
    async def wait_routed(self) -> None: ...
    async def drain(self, service: str, backend: Backend, timeout: float) -> int | None: ...
    def failure(self, service: str) -> str | None: ...


# -- the decisions (pure) ------------------------------------------------------------------------


def effective(rec: RouteRecord | None, alive: Callable[[str], bool]) -> Table:
    """What this node's router gets of ``rec``: the backends of nodes seen alive (a backend of an
    unknown node, ``""``, counts as alive), with their weights. No record: the port is closed.

    Liveness never empties a table: when every backend's node looks down, this node is more
    likely cut off from the store's view of the others (or every lease lapsed at once in an
    etcd outage) than all of them dead, so the router keeps trying them all."""
    if rec is None or rec.port is None:
        return None, [], None, "tcp"
    keep = [i for i, b in enumerate(rec.backends) if not b[2:3] or not b[2] or alive(str(b[2]))]
    if not keep:
        keep = list(range(len(rec.backends)))
    backends = [(str(rec.backends[i][0]), int(rec.backends[i][1])) for i in keep]
    weights = None
    if rec.weights is not None and len(rec.weights) == len(rec.backends):
        weights = [int(rec.weights[i]) for i in keep]
        if not any(weights):  # only zero-weight backends left: an even share beats refusing
            weights = None
    return rec.port, backends, weights, rec.protocol


def nodes_of(rec: RouteRecord | None) -> dict[Backend, str]:
    if rec is None:
        return {}
    return {(str(b[0]), int(b[1])): str(b[2]) if len(b) > 2 else "" for b in rec.backends}


def to_drain(before: Table | None, after: Table, down: Iterable[Backend] = ()) -> list[Backend]:
    """The backends the router must drain when ``before`` becomes ``after``: those the table
    removed while the port stays the same. Not those ``down`` (a dead node's: its connections
    end when TCP gives up, and nobody waits for them), nor any once the port changed or
    closed (its listener is gone, and its connections with it)."""
    if before is None or before[0] is None or before[0] != after[0]:
        return []
    gone = set(before[1]) - set(after[1]) - set(down)
    return [b for b in before[1] if b in gone]


def ack_value(node: str, revision: int, draining: Iterable[Backend], error: str | None) -> RouteAck:
    return RouteAck(node, revision, sorted([list(b) for b in draining]), error or "")


def decode_route(service: str, value: bytes) -> RouteRecord | None:
    """``routes/<svc>``'s record, or None for a value this version cannot read (logged)."""
    try:
        rec = decode(RouteRecord, value)
    except (ValueError, TypeError) as e:
        log.error("routes/%s: unreadable record (%s): left as it was", service, e)
        return None
    rec.service = service
    return rec


# -- the follower ---------------------------------------------------------------------------------


class Follower:
    """Feeds ``routes/`` from ``cache`` (a cache of the whole store, or of at least ``routes/``
    and the prefixes in ``refresh_on``) to ``router``; answers under ``routed/`` through ``kv``
    (under ``lease()``, 0: none)."""

    def __init__(self, cache: Cache, kv: KVStore, router: LocalRouter, node: str, *,
                 alive: Callable[[str], bool] = lambda node: True, lease: Callable[[], int] = lambda: 0,
                 refresh_on: Sequence[str] = (), drain_max: float = DRAIN_MAX) -> None:
        self.cache, self.kv, self.router, self.node = cache, kv, router, node
        self.alive, self.lease, self.drain_max = alive, lease, drain_max
        self.refresh_on = tuple(refresh_on)  # a change under these may change who is alive
        self.tables: dict[str, Table] = {}  # per service: what the router was given
        self.nodes: dict[str, dict[Backend, str]] = {}  # per service: the node of each backend given
        self.applied: dict[str, int] = {}  # per service: the route record's revision the router has
        self.draining: dict[str, set[Backend]] = {}
        self.errors: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._acks_dirty: set[str] = set()
        self._acked: dict[str, RouteAck | None] = {}
        self._wake = trio.Event()
        self._ack_wake = trio.Event()
        self._listeners: list[Callable[[], None]] = []
        cache.subscribe(self._heard)

    def subscribe(self, fn: Callable[[], None]) -> None:
        """``fn()`` after each table the router has taken, and each drain that ended."""
        self._listeners.append(fn)

    def unsubscribe(self, fn: Callable[[], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def refresh(self) -> None:
        """Look at every service again (who is alive changed)."""
        self._dirty |= {kv.key[len(ROUTES):] for kv in self.cache.range(ROUTES)} | set(self.tables)
        self._wake.set()

    def routed(self, service: str, revision: int) -> bool:
        """This node's router has the table of ``revision`` (or a later one) of ``service``."""
        return self.applied.get(service, 0) >= revision and service not in self._dirty

    def _heard(self, changes: list[Change]) -> None:
        for c in changes:
            if c.kv.key.startswith(ROUTES):
                self._dirty.add(c.kv.key[len(ROUTES):])
                self._wake.set()
            elif c.kind == "delete" and c.kv.key.startswith(ROUTED) and c.kv.key.endswith("/" + self.node):
                # Our answer went with our lease (it lapsed: a freeze, an etcd outage): answer again
                # under the next one, or every drain would wait for us until its timeout.
                service = c.kv.key[len(ROUTED):-len(self.node) - 1]
                if service in self.tables:
                    self._acked.pop(service, None)
                    self._ack(service)
            elif self.refresh_on and c.kv.key.startswith(self.refresh_on):
                self.refresh()

    def _tell(self) -> None:
        for fn in list(self._listeners):
            fn()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._answer)
            self.refresh()  # what the cache already has (listed before this subscribed, or a restart)
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._dirty:
                    await self._apply(self._dirty.pop())
                self._tell()

    async def _apply(self, service: str) -> None:
        kv = self.cache.get(route_key(service))
        rec = decode_route(service, kv.value) if kv is not None else None
        if kv is not None and rec is None:
            return  # unreadable: the router keeps what it has
        table = effective(rec, self.alive)
        before = self.tables.get(service)
        if before == table and service not in self.errors and kv is not None:
            self.applied[service] = kv.mod_revision
            self._ack(service)
            return
        port, backends, weights, protocol = table
        self.router.set_backends(service, port, backends, weights, protocol=protocol)
        await self.router.wait_routed()
        if port is None:
            self.tables.pop(service, None)
            self.nodes.pop(service, None)
            self.applied.pop(service, None)
            self.draining.pop(service, None)
            self.errors.pop(service, None)
        else:
            self.tables[service] = table
            self.applied[service] = kv.mod_revision if kv is not None else 0
            if (why := self.router.failure(service)) is not None:
                self.errors[service] = why
            else:
                self.errors.pop(service, None)
            was = self.nodes.get(service, {})
            down = [b for b, node in was.items() if node and not self.alive(node)]
            self.nodes[service] = nodes_of(rec)
            for b in to_drain(before, table, down):
                if b not in self.draining.setdefault(service, set()):
                    self.draining[service].add(b)
                    self._nursery.start_soon(self._drain, service, b)
        self._ack(service)

    async def _drain(self, service: str, backend: Backend) -> None:
        try:
            left = await self.router.drain(service, backend, self.drain_max)
            if left:
                log.warning("%s: %s:%d still had %d connections after %g s", service, *backend, left, self.drain_max)
        finally:
            self.draining.get(service, set()).discard(backend)
            self._ack(service)
            self._tell()

    def _ack(self, service: str) -> None:
        self._acks_dirty.add(service)
        self._ack_wake.set()

    async def _answer(self) -> None:
        """Write each service's answer when it changed; a store out of reach is tried again."""
        while True:
            await self._ack_wake.wait()
            self._ack_wake = trio.Event()
            while self._acks_dirty:
                service = self._acks_dirty.pop()
                if service in self.tables:
                    ack: RouteAck | None = ack_value(self.node, self.applied.get(service, 0),
                                                     self.draining.get(service, ()), self.errors.get(service))
                else:
                    ack = None
                if service in self._acked and self._acked[service] == ack:
                    continue
                key = routed_key(service, self.node)
                try:
                    if ack is None:
                        await self.kv.delete(key)
                        self._acked.pop(service, None)
                    else:
                        await self.kv.put(key, encode(ack), lease=self.lease())
                        self._acked[service] = ack
                except StoreError as e:
                    log.warning("%s: cannot write %s: %s; trying again", service, key, e)
                    self._acks_dirty.add(service)
                    await trio.sleep(RETRY)


def read_ack(value: bytes) -> RouteAck | None:
    try:
        d: Any = json.loads(value)
        return decode(RouteAck, json.dumps(d)) if isinstance(d, dict) else None
    except (ValueError, TypeError):
        return None
