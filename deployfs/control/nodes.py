"""The controller's side of nodes: this node's record, placement over the records, and
the node verbs of the top ctl (``cordon``, ``uncordon``, ``drain``; docs/cluster.md).

The records are ``nodes/<name>`` (state/records.py :class:`NodeRecord`), the same keys
node/membership.py writes in a cluster.  Whether a node is alive is not in them: in a
cluster it is its ``alive/<name>`` key under its lease; on one machine the store knows
this node only, and it is alive while this server runs (:attr:`Nodes.alive`).

A drain moves instances the way a rollout does: the planner is told that an instance
on a draining node is of another version (``Service.views``), so the rolling rules
start a replacement on another node, wait for it to be ready, then retire the old one.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Callable

from ..model import placement, rollout
from ..model.errors import CommandError, Kind
from ..model.cluster import READY, ClusterStatus, cluster_status, node_state
from ..state.events import CLUSTER
from ..state.store import NodeRecord

if TYPE_CHECKING:
    from .engine import Engine, Service


class Nodes:
    def __init__(self, engine: "Engine", name: str, address: str) -> None:
        self.engine, self.name, self.address = engine, name, address
        # By name: every write goes through here. This node is known before join() records it.
        self.records: dict[str, NodeRecord] = {name: NodeRecord(name, address)}
        self.draining: frozenset[str] = frozenset()  # read on every plan: kept, not worked out
        # One machine: this server is the only node, alive while it runs. A cluster's come from alive/<name>.
        self.alive: Callable[[str], bool] = lambda name: name == self.name
        self.cluster = False  # True: the records are a cluster's, written by each node as it joins
        # Liveness is acted on only when the serve layer says it changed (liveness_changed), never
        # before: a controller that started before the cluster view was loaded would find every node down.
        self.down: frozenset[str] = frozenset()  # declared down: their instances are lost, replaced elsewhere
        self.all_down = False  # every node looked down at once: the store's outage, not the nodes'

    def join(self) -> None:
        """Record this node (its address, when it started), keeping its cordon.

        On one machine the store knows this node only: a record of another name is this
        host under its previous name (a renamed host, another --node), and goes; the
        instances it ran are this host's processes, so they become this node's (its agent
        adopts them; left under the old name, nobody would supervise or stop them)."""
        store = self.engine.store
        recs = {r.name: r for r in store.list_nodes()}
        if self.cluster:  # each node records itself when it joins (node/membership.py)
            self.records = recs
            self.records.setdefault(self.name, NodeRecord(self.name, self.address))
            self._changed()
            return
        with store.transaction():
            renamed = {n for n in recs if n != self.name and not self.alive(n)}
            for other in renamed:
                store.delete_node(other)
                del recs[other]
            if renamed:
                for svc in store.list_services():
                    for irec in store.list_instances(svc.name):
                        if irec.node in renamed:
                            irec.node = self.name
                            store.put_instance_fields(irec, ("node",))
            mine = recs.setdefault(self.name, NodeRecord(self.name))
            mine.address, mine.joined = self.address, round(time.time(), 3)
            store.put_node(mine)
        self.records = recs
        self._changed()

    def reload(self) -> None:
        """A cluster's node records changed (a node joined, another wrote one): read them again."""
        self.records = {r.name: r for r in self.engine.store.list_nodes()}
        self._changed()

    def put(self, rec: NodeRecord) -> None:
        self.engine.store.put_node(rec)
        self.records[rec.name] = rec
        self._changed()

    def _changed(self) -> None:
        self.draining = frozenset(n for n, r in self.records.items() if r.draining)

    # -- placement -------------------------------------------------------------------------

    def address_of(self, node: str) -> str:
        rec = self.records.get(node)
        return rec.address if rec is not None else self.address

    def _counts(self, service: str | None = None, *, leaving: bool = False) -> tuple[Counter[str], Counter[str]]:
        """Instances per node: of every service, and of ``service`` in the version it is going to (the
        instances a rollout replaces would otherwise make the new ones pile up on the first node by name)."""
        total: Counter[str] = Counter()
        mine: Counter[str] = Counter()
        for svc in self.engine.services.values():
            target = (svc.rec.version, svc.rec.generation)
            for i in svc.instances.values():
                if leaving or not i.leaving:
                    node = i.rec.node or self.name  # a record from before nodes were recorded: this machine's
                    total[node] += 1
                    if svc.name == service and (i.rec.version, i.rec.generation) == target:
                        mine[node] += 1
        return total, mine

    def state(self, rec: NodeRecord, instances: int) -> str:
        return node_state(alive=self.alive(rec.name), cordoned=rec.cordoned, draining=rec.draining,
                          instances=instances)

    def loads(self, service: str) -> list[placement.Load]:
        total, mine = self._counts(service)
        return [placement.Load(r.name, self.state(r, total[r.name]), mine[r.name], total[r.name])
                for r in self.records.values()]

    def place(self, svc: "Service") -> placement.Choice:
        allowed = svc.manifest.nodes
        fit = [r for r in self.records.values()
               if self.state(r, 0) == READY and (not allowed or r.name in allowed)]
        if len(fit) == 1:  # one machine: no counting (a scale to 1,000 places 1,000 times)
            return placement.Choice(fit[0].name)
        return placement.place(self.loads(svc.name), allowed)

    # -- liveness: nodes going down and coming back ----------------------------------------------

    def liveness_changed(self) -> None:
        """Some node's liveness changed (serve wires this to the ``alive/`` keys): a node gone
        silent past its TTL is declared down and its instances are replaced at once; one that
        is back gets its replaced instances stopped (their records say ``desired stop``) and
        takes new ones again.  Every service's reconcile wakes."""
        emit = self.engine.events.emit
        alive = {n for n in self.records if self.alive(n)}
        if self.records and not alive:
            # Every lease lapsing together is an outage of the store (ETCD-NOTES.md), or of this
            # controller's view of it: replacing everything everywhere would only double it.
            if not self.all_down:
                self.all_down = True
                emit(CLUSTER, f"every node looks down at once ({', '.join(sorted(self.records))}): more likely the "
                              "cluster store than the machines; nothing is replaced until a node is seen alive")
            return
        if self.all_down:
            self.all_down = False
            emit(CLUSTER, "a node is seen alive again: nodes that stay silent are declared down as usual")
        down = frozenset(self.records) - alive
        gone, back = down - self.down, (self.down - down) & set(self.records)
        self.down = down
        for name in sorted(back):
            emit(CLUSTER, f"node {name} is back: it stops the instances replaced while it was down, and takes new ones")
        for name in sorted(down):  # (every down node: a controller that just started finds their instances)
            lost = {svc.name: svc.lose(name) for svc in self.engine.services.values()}
            lost = {svc: slots for svc, slots in lost.items() if slots}
            what = "; ".join(f"{svc} {', '.join(map(str, slots))}" for svc, slots in sorted(lost.items()))
            if name in gone or lost:
                emit(CLUSTER, f"node {name} down: " + (f"its instances are lost and replaced on other nodes ({what})"
                                                       if lost else "no instances there"))
        for svc in self.engine.services.values():
            svc.forget_lost(set(self.records))
            svc.poke()

    # -- what the view shows -----------------------------------------------------------------

    def status(self) -> ClusterStatus:
        """As the engine holds it (the view reads the records: view/cached.py)."""
        total, _ = self._counts(leaving=True)
        return cluster_status(self.records.values(), total, list(self.engine.services), alive=self.alive,
                              leader=self.name, now=time.time())

    # -- the verbs -----------------------------------------------------------------------------

    def command(self, name: str, verb: str, who: str) -> str:
        rec = self.records.get(name)
        if rec is None:
            known = ", ".join(sorted(self.records)) or "none"
            raise CommandError(Kind.NOT_FOUND, f"no node {name!r} (known: {known})")
        emit = self.engine.events.emit
        if verb == "cordon":
            if rec.cordoned:
                return "ok already cordoned"
            rec.cordoned = True
            self.put(rec)
            emit(CLUSTER, f"node {name} cordoned by {who}: no new instances there")
            return "ok cordoned"
        if verb == "uncordon":
            if not rec.cordoned and not rec.draining:
                return "ok not cordoned"
            stopped = rec.draining
            rec.cordoned = rec.draining = False
            self.put(rec)
            emit(CLUSTER, f"node {name} uncordoned by {who}" +
                 (": the drain stops; instances not moved yet stay there" if stopped else ""))
            for svc in self.engine.services.values():
                svc.poke()  # a start that waited for a node may go now
            return "ok uncordoned"
        if verb == "drain":
            return self._drain(rec, who)
        raise CommandError(Kind.INVALID, f"unknown node verb {verb!r}")

    def _drain(self, rec: NodeRecord, who: str) -> str:
        name = rec.name
        if rec.draining:
            return "ok already draining"
        there = {svc: sorted(i.rec.slot for i in svc.instances.values() if i.rec.node == name and not i.leaving)
                 for svc in self.engine.services.values()}
        there = {svc: slots for svc, slots in there.items() if slots}
        # Nowhere to go: refused whole. Cordoning alone would leave them where they are and stop
        # every later start of theirs (the only node), which is not what `drain` promises.
        stuck = []
        for svc in sorted(there, key=lambda s: s.name):
            loads = [l if l.name != name else placement.Load(l.name, "cordoned", l.of_service, l.total)
                     for l in self.loads(svc.name)]
            where = placement.place(loads, svc.manifest.nodes)
            if where.node is None:
                stuck.append(f"{svc.name}: {where.reason}")
        if stuck:
            raise CommandError(Kind.BUSY, f"drain {name}: its instances have nowhere to move ({'; '.join(stuck)}); "
                                          f"nothing changed (cordon {name} keeps new instances off it)")
        busy = [s.name for s in there if s.rec.update_status == "failed"]
        if busy:
            raise CommandError(Kind.BUSY, f"drain {name}: the last rollout of {', '.join(sorted(busy))} failed; "
                                          "apply a fixed manifest or rollback first; nothing changed")
        rec.cordoned, rec.draining = True, bool(there)  # nothing to move: simply cordoned
        self.put(rec)
        if not there:
            self.engine.events.emit(CLUSTER, f"node {name} drained by {who}: no instances there; it stays cordoned")
            return "ok drained (no instances there)"
        count = sum(len(slots) for slots in there.values())
        self.engine.events.emit(CLUSTER, f"node {name} draining by {who}: {count} instance{'s' if count != 1 else ''} "
                                         f"of {', '.join(sorted(s.name for s in there))} {'move' if count != 1 else 'moves'} to other nodes")
        for svc, slots in there.items():
            if svc.rec.update_status == "none":  # a move is a rollout to the same version: `wait` follows it
                svc.rec.update_status, svc.rec.rollout_started = "rolling", time.time()
                svc.state = rollout.State("rolling", 0, float("-inf"))
                svc.save()
            svc.event(f"node {name} draining (by {who}): instance{'s' if len(slots) != 1 else ''} "
                      f"{', '.join(map(str, slots))} {'move' if len(slots) != 1 else 'moves'} to other nodes")
            svc.poke()
        return f"ok draining {count} instance{'s' if count != 1 else ''}"

    def drained(self) -> None:
        """A service finished moving off a draining node: once nothing runs there, the drain is over."""
        if not self.draining:
            return
        total, _ = self._counts(leaving=True)
        for name in sorted(self.draining):
            if not total[name]:
                rec = self.records[name]
                rec.draining = False
                self.put(rec)
                self.engine.events.emit(CLUSTER, f"node {name} drained: no instances left there; it stays cordoned")
