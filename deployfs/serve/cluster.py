"""A node of a cluster: what ``deployfs serve --cluster`` runs on every machine.

Every node runs its node agent (the instances the records place here), a cache of the
records for the view, its router, and an outbox to the controller (control/mailbox.py).  The
node that holds the ``leader`` key (control/leader.py) also runs the controller, over a
:class:`~deployfs.state.clusterstore.ClusterStore` fenced by that key, with the mailbox that
carries out every node's commands and writes every node's events.  Nothing passes between
nodes except through etcd (docs/cluster.md).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio

from ..control.engine import Engine, Routing
from ..control.leader import Leadership
from ..control.mailbox import Mailbox, Outbox
from ..control.metrics import Metrics
from ..model.errors import Error
from ..model.manifest import Manifest
from ..node.agent import NodeAgent
from ..node.cgroups import Limits
from ..node.health import Prober
from ..node.identity import UserPolicy
from ..node.membership import ALIVE, Membership
from ..node.runtime import Runtime
from ..state.cache import Cache
from ..state.clusterstore import ClusterStore, Deposed
from ..state.events import SEGMENT_BYTES, EventFollower, EventLog
from ..state.kv import Change, Compare, KVStore
from ..state.logclient import RemoteLogs
from ..state.records import EVENTS, INSTANCES, NODES, VERSIONS
from ..traffic.follower import Follower
from ..traffic.published import PublishedRouting
from ..view.cached import CachedSource

log = logging.getLogger(__name__)

# How long a stopping node waits for its instances to move elsewhere before it stops them.
DRAIN_WAIT = 90.0


class ClusterNode:
    def __init__(self, kv: KVStore, member: Membership, runtime: Runtime, prober: Prober | None = None, *,
                 router: Routing, state_dir: str | None = None, users: UserPolicy | None = None,
                 segment_bytes: int = SEGMENT_BYTES, published: bool = False, **engine_kw: Any) -> None:
        """``published``: the controller publishes each service's routing table as a record and
        every node's router follows it (traffic/published.py); else only the leader's router is fed."""
        self.kv, self.member, self.runtime, self.router = kv, member, runtime, router
        self.node, self.address = member.name, member.address
        self.users, self.segment_bytes, self.engine_kw = users, segment_bytes, engine_kw
        self.cache = Cache(kv, "", skip=(EVENTS, VERSIONS))  # what the view reads
        self.outbox = Outbox(kv, self.cache, self.node, health=lambda: member.unreachable)
        self.events_cache = Cache(kv, EVENTS)
        self.events = EventFollower(ClusterStore(kv, self.events_cache), self.outbox.say, segment_bytes=segment_bytes)
        self.events_cache.subscribe(self.events.heard)
        # the view's writes (manifests), refused at once while this node's keepalives fail
        self.store = ClusterStore(kv, self.cache, give_up=True, health=lambda: member.unreachable)
        self.agent = NodeAgent(kv, runtime, self.node, prober=prober, users=users, events=self.events,
                               state_dir=state_dir, cache=Cache(kv, INSTANCES))
        self.leadership = Leadership(kv, self.cache, self.node, lambda: member.lease)
        # This node is alive to itself (its router serves while it runs); others while their alive/ key is.
        self.follower = Follower(self.cache, kv, router, self.node, alive=lambda n: n == self.node or self.alive(n),
                                 lease=lambda: member.lease or 0, refresh_on=(ALIVE,)) if published else None
        self.engine: Engine | None = None  # while this node leads
        self._controller: ClusterStore | None = None  # the engine's store, while this node leads

        def limit_problem(m: Manifest) -> tuple[str, str] | None:
            return runtime.limit_problem(Limits(m.memory, m.cpus, m.pids), m.nofile)
        self._limit_problem = limit_problem
        self._scope: trio.CancelScope | None = None

    # -- what the view asks of a cluster (view/cached.py ClusterFacts) ----------------------

    def alive(self, node: str) -> bool:
        return self.cache.get(ALIVE + node) is not None

    def leader(self) -> str:
        return self.leadership.holder() or ""

    def unreachable(self) -> bool:
        return (self.member.unreachable is not None or self.store.unreachable is not None
                or (self._controller is not None and self._controller.unreachable is not None))

    async def settled(self) -> None:
        await self.store.settled()

    def metrics(self) -> Metrics:
        """This node's router and process; the controller's families while it leads."""
        return Metrics(lambda: self.engine, probes=self.agent.probes_of, router=self.router)

    def source(self, metrics: Metrics, *, logs: Any, remote_logs: RemoteLogs | None = None) -> CachedSource:
        return CachedSource(self.cache, self.store, self.events, self.outbox,
                            revision=lambda: self.store.last_revision, logs=logs, metrics=metrics.render,
                            cost=metrics.cost, node=self.node, cluster=self, remote_logs=remote_logs)

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.cache.run)
                await nursery.start(self.events_cache.run)
                if self.follower is not None:
                    await nursery.start(self.follower.run)
                nursery.start_soon(self.store.run)
                nursery.start_soon(self.outbox.run)
                await nursery.start(self.agent.run)
                nursery.start_soon(self.leadership.run, self._lead)
                task_status.started()

    async def _lead(self, fence: Compare) -> None:
        """This node leads: the controller runs here, from the records, until the lead is lost."""
        main = Cache(self.kv, "")
        store = ClusterStore(self.kv, main, fence=lambda: [fence])
        router: Routing = self.router
        if self.follower is not None:  # a drain waits for every live node's router
            router = PublishedRouting(store, self.cache, self.follower, self.router,
                                      nodes=lambda: [kv.key[len(ALIVE):] for kv in self.cache.range(ALIVE)])
        engine = Engine(store, events=EventLog(store, segment_bytes=self.segment_bytes), router=router,
                        users=self.users, limit_problem=self._limit_problem, node=self.node, address=self.address,
                        **self.engine_kw)
        engine.nodes.cluster = True
        # A new controller gives every node one keepalive round to show its lease before it counts
        # the node down: after an etcd outage every lease may have lapsed at once, and the nodes
        # claim their names again at their next keepalive (ETCD-NOTES.md); the first to come back
        # must not replace everybody else's instances.
        # The controller before this one is known dead (its lapsed lease is why this node leads):
        # its instances are replaced at once.
        grace_until = trio.current_time() + self.member.ttl / 2
        dead = self.leadership.take_lapsed()

        def alive(name: str) -> bool:
            return main.get(ALIVE + name) is not None or (name != dead and trio.current_time() < grace_until)
        engine.nodes.alive = alive

        def nodes_changed() -> None:
            engine.nodes.reload()
            engine.liveness_changed()  # down nodes' instances replaced, returned ones rejoin; every service wakes

        def heard(changes: list[Change]) -> None:
            if any(c.kv.key.startswith((NODES, ALIVE)) for c in changes):
                nodes_changed()

        async def grace_over() -> None:
            await trio.sleep_until(grace_until)
            nodes_changed()
        async def commit(scope: trio.CancelScope) -> None:
            try:
                await store.run()
            except Deposed as e:  # another node leads: this controller stops before it acts again
                log.warning("node %s: %s", self.node, e)
                scope.cancel()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(main.run)
                nursery.start_soon(commit, nursery.cancel_scope)
                engine.prepare()
                await nursery.start(engine.run)
                main.subscribe(heard)
                nodes_changed()  # the records are loaded: the controller before this one is known dead
                nursery.start_soon(grace_over)
                await nursery.start(Mailbox(engine, store).run)
                self.engine, self._controller = engine, store
                await trio.sleep_forever()
        finally:
            self.engine = self._controller = None
            if isinstance(router, PublishedRouting):
                router.close()

    async def shutdown(self, *, keep_instances: bool = False) -> None:
        """Leave the cluster: (unless kept) its instances move to other nodes first, the way
        ``drain`` moves them (replacements ready before these stop: no request fails), then what
        is left stops; the lead passes on when the lease is revoked (cli/serve.py)."""
        if not keep_instances:
            await self._drain_self()
            with trio.move_on_after(30):
                await self.agent.stop_all()
        if self._scope is not None:
            self._scope.cancel()

    async def _drain_self(self) -> None:
        rec = self.cache.get(NODES + self.node)
        was_cordoned = rec is not None and json.loads(rec.value).get("cordoned", False)
        who = f"deployfs stopping on {self.node}"
        try:
            reply = await self.outbox.command(self.node, "drain", None, who)
        except Error as e:  # nowhere to move (the last node), no controller, no store: stop them here
            log.warning("node %s: its instances cannot move before it stops: %s", self.node, e.message)
            return
        log.info("node %s: %s; waiting for them to move", self.node, reply)
        with trio.move_on_after(DRAIN_WAIT) as waited:
            while any(json.loads(kv.value).get("node") == self.node for kv in self.cache.range(INSTANCES)):
                await trio.sleep(0.1)
        if waited.cancelled_caught:
            log.warning("node %s: instances still here after %g s; stopping them", self.node, DRAIN_WAIT)
        if not was_cordoned:  # a restart of this server takes instances again (the drain cordoned it)
            with trio.move_on_after(5):
                try:
                    await self.outbox.command(self.node, "uncordon", None, who)
                except Error as e:
                    log.warning("node %s: stays cordoned: %s", self.node, e.message)
