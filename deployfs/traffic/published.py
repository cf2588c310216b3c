"""The engine's ``Routing`` for a cluster: the table as records every node's router follows.

:meth:`PublishedRouting.set_backends` writes ``routes/<svc>`` through the engine's
``Store`` (so it is fenced, ordered and committed with the controller's other writes);
each node's :class:`~deployfs.traffic.follower.Follower` feeds it to that node's router
and answers under ``routed/<svc>/<node>``.  What the engine asks of its router comes
from those answers:

- ``drain(service, backend, timeout)`` waits, at most ``timeout``, until the table without
  ``backend`` is in the records and every live node has answered that its router has it
  (or a later one) and no longer drains ``backend``: only then is no router in the
  cluster sending to the instance, and it may stop;
- ``routed``/``wait_routed``: the newest table written is in the records and *this* node's
  router has it (the controller's node: a rollout's ``done`` and a freed port mean what
  they say at least there; every other node follows within its watch's delay);
- ``failure``: this node's router, then any live node's answer (a node whose router could
  not listen says why in its answer); ``port_problem``: this node's router.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import trio

from ..model.errors import Kind
from ..state.cache import Cache
from ..state.kv import Change
from ..state.records import RouteAck, RouteRecord, encode, route_key, routed_key
from ..state.store import Store
from .follower import Follower, LocalRouter, decode_route, read_ack
from .router import Backend

log = logging.getLogger(__name__)


class PublishedRouting:
    """``store``: the engine's.  ``cache``: this node's, the one ``follower`` follows.
    ``nodes()``: the nodes whose routers must answer before a drain ends (those alive)."""

    def __init__(self, store: Store, cache: Cache, follower: Follower, router: LocalRouter, *,
                 nodes: Callable[[], Iterable[str]]) -> None:
        self.store, self.cache, self.follower, self.router = store, cache, follower, router
        self.nodes = nodes
        self._written: dict[str, bytes | None] = {}  # per service: the newest value written, not yet routed here
        self._last: dict[str, bytes | None] = {}  # per service: the newest value written
        self._moved = trio.Event()
        cache.subscribe(self._heard)
        follower.subscribe(self._kick)

    def close(self) -> None:
        """This controller is done (it lost the lead): stop listening to the node's cache and follower."""
        self.cache.unsubscribe(self._heard)
        self.follower.unsubscribe(self._kick)

    @property
    def last_stats(self) -> dict | None:  # the metrics read this node's router's counters
        return getattr(self.router, "last_stats", None)

    def _heard(self, changes: list[Change]) -> None:
        self._kick()

    def _kick(self) -> None:
        self._moved.set()
        self._moved = trio.Event()

    # -- what the engine calls ----------------------------------------------------------------

    def set_backends(self, service: str, port: int | None, backends: list[tuple[str, int]],
                     weights: list[int] | None = None, *, protocol: str = "tcp") -> None:
        if port is None:
            value = None
        else:
            # The node of each backend, so a follower can drop a dead node's at once.
            nodes = {(i.address, i.port): i.node for i in self.store.list_instances(service)}
            rec = RouteRecord(service, port, protocol, [[a, p, nodes.get((a, p), "")] for a, p in backends],
                              None if weights is None else list(weights))
            value = encode(rec)
        # Unchanged: nothing to write, unless a router refused it (written again: the port may be free now).
        if service in self._last and self._last[service] == value and self.failure(service) is None:
            return
        self._last[service] = self._written[service] = value
        if value is None:
            self._last.pop(service, None)
            self.store.delete_route(service)
        else:
            self.store.put_route(rec)
        self._kick()

    def routed(self) -> bool:
        for service, value in list(self._written.items()):
            kv = self.cache.get(route_key(service))
            if value is None:
                if kv is not None or service in self.follower.tables:
                    return False
            elif kv is None or kv.value != value or not self.follower.routed(service, kv.mod_revision):
                return False
            del self._written[service]  # routed here: later calls need not look again
        return self.router.routed()

    async def wait_routed(self) -> None:
        while not self.routed():
            await self._moved.wait()

    async def drain(self, service: str, backend: Backend, timeout: float) -> int | None:
        """Until no live node's router sends to ``backend`` any more (None), or ``timeout``:
        then the number of nodes still draining it (each holds connections to it)."""
        late: list[str] = []
        with trio.move_on_after(timeout):
            while True:
                late = self._still_sending(service, backend)
                if not late:
                    return None
                await self._moved.wait()
        log.warning("%s: %s:%d still routed or draining on %s after %g s", service, *backend, ", ".join(late),
                    timeout)
        return len(late)

    def _still_sending(self, service: str, backend: Backend) -> list[str]:
        """The live nodes whose routers may still send to ``backend`` (all, while the table
        without it is not in the records yet)."""
        kv = self.cache.get(route_key(service))
        nodes = sorted(self.nodes())
        if kv is not None:
            rec = decode_route(service, kv.value)
            if rec is None or any((b[0], b[1]) == backend for b in rec.backends):
                return nodes or ["(the records)"]
        revision = kv.mod_revision if kv is not None else 0
        late = []
        for node in nodes:
            ack = self._ack(service, node)
            if kv is None:
                if ack is not None:  # the port closed: a node answers by removing its answer
                    late.append(node)
            elif ack is None or ack.revision < revision or list(backend) in ack.draining:
                late.append(node)
        return late

    def _ack(self, service: str, node: str) -> RouteAck | None:
        kv = self.cache.get(routed_key(service, node))
        return read_ack(kv.value) if kv is not None else None

    def failure(self, service: str) -> str | None:
        if (why := self.router.failure(service)) is not None:
            return why
        for node in sorted(self.nodes()):
            ack = self._ack(service, node)
            if ack is not None and ack.error:
                return f"on node {node}: {ack.error}"
        return None

    def port_problem(self, port: int) -> tuple[Kind, str] | None:
        """This node's: another node's router that cannot listen says so in its answer, which
        fails the rollout (:meth:`failure`); a port no node has tried yet cannot be known there."""
        check: Callable[[int], tuple[Kind, str] | None] | None = getattr(self.router, "port_problem", None)
        return check(port) if check is not None else None
