"""The engine: one supervisor per service, reconciling instances toward a target.

Each service runs a loop: look at the instances as they are, ask
:func:`rollout.plan` what to do, do it, sleep until something changes.  The engine
is the controller (docs/architecture.md, "Controller and node agent"): it never touches a process.  It writes its intent
into each instance record (``desired`` run | drain | stop, ``restarts`` bumped for
a fresh process) and the node agent (node/agent.py), which ``deployfs serve`` runs
beside it on the same store (serve/local.py LocalNode; neither calls the other),
runs, probes, stops and adopts the processes and writes back what it sees; the engine hears of that through the store's watch and turns it
into the :class:`Phase` plan() reads.  Draining stays here: the engine owns the
router.

Commands (``apply``, ``pause``, ...) only change the service record; the loop
does the rest.  The engine knows nothing of FUSE, and the view never reads it:
the view reads the records the engine writes (through a cache fed by the
store's watch) and acts only by :meth:`Engine.command`.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import trio

from ..model import rollout
from ..model import status as derive
from ..model.ctl import NODE_VERBS
from ..model.errors import CommandError, Kind
from ..model.manifest import (MAX_REPLICAS, Manifest, ManifestError, Parsed, format_seconds, parse,
                              set_replicas_line, valid_name)
from ..model.rollout import Phase
from ..node.identity import UserPolicy, deployer_uid  # (the one exception: docs/architecture.md)
from ..state.events import CLUSTER, EventLog
from ..state.kv import Change
from ..state.members import canaries_of, member_of, phase_of, rolling_back_of, standing_of
from ..state.records import DRAIN, INSTANCES, RUN, STOP, decode
from ..state.store import InstanceRecord, ServiceRecord, Store, StoreFull
from .nodes import Nodes
from .stats import ServiceStats

log = logging.getLogger(__name__)
NODE = socket.gethostname() or "local"
LOOPBACK = "127.0.0.1"  # where this node's instances listen (a cluster gives each node its --address)
MAX_SERVICES = 500
MAX_INSTANCES = 5000
STORE_RETRY = 1.0  # seconds between tries of a full state disk
# Who writes which fields of an instance record (no lost updates: each writes only its own,
# read-modify-write). The controller: where and what it should run, and its restart budget.
CONTROLLER_FIELDS = ("slot", "version", "generation", "node", "address", "desired", "restarts",
                     "restart_times", "lost")
# The node agent: what it saw. GiveUp is the one place the controller records a state: failed.
AGENT_FIELDS = ("pid", "start_time", "state", "health", "phase", "why", "exit_ok", "last_exit", "started",
                "incarnation", "oom_kills", "first_bad", "port")  # port: where the node had it listen


class Routing(Protocol):
    """Where the engine sends routing tables (traffic/: the built-in router or HAProxy)."""

    def set_backends(self, service: str, port: int | None, backends: list[tuple[str, int]],
                     weights: list[int] | None = None, *, protocol: str = "tcp") -> None:
        """``weights``: one per backend, the share of connections (requests) each gets; None: even.
        ``protocol``: tcp (bytes) or http (per request), docs/traffic.md."""
        ...
    async def drain(self, service: str, backend: tuple[str, int], timeout: float) -> int | None:
        """Wait for ``backend``'s connections to end, at most ``timeout``; how many were still
        open when it ran out (0 or None: none, or not known)."""
        ...
    def routed(self) -> bool:
        """True once every table given so far has been delivered (or failed to be)."""
        ...
    async def wait_routed(self) -> None: ...
    def failure(self, service: str) -> str | None:
        """Why the router could not take the service's newest table (it could not listen), else None."""
        ...
    def port_problem(self, port: int) -> tuple[Kind, str] | None:
        """(kind, reason) if the router could not listen on ``port`` now, else None."""
        ...


class NullRouter:
    def set_backends(self, service: str, port: int | None, backends: list[tuple[str, int]],
                     weights: list[int] | None = None, *, protocol: str = "tcp") -> None:
        pass

    def routed(self) -> bool:
        return True

    async def wait_routed(self) -> None:
        pass

    async def drain(self, service: str, backend: tuple[str, int], timeout: float) -> int | None:
        return None

    def failure(self, service: str) -> str | None:
        return None

    def port_problem(self, port: int) -> tuple[Kind, str] | None:
        return None


@dataclass(eq=False)
class Instance:
    rec: InstanceRecord
    manifest: Manifest
    phase: Phase = Phase.STARTING
    why: str = ""
    exit_ok: bool = False
    leaving: bool = False
    busy: bool = False  # a restart is asked for, and the agent has not yet reported the new process
    first_bad: float | None = None  # start of the current failing streak (trio clock)
    last_exit: float | None = None
    restart_times: list[float] = field(default_factory=list)
    stopped: trio.Event | None = None  # set once the agent reports it stopped after ``desired stop``

    @property
    def running(self) -> bool:
        """A process of it runs, as its node agent last reported."""
        return self.rec.pid is not None and self.rec.state in ("running", "draining")

    @property
    def backend(self) -> tuple[str, int] | None:
        return (self.rec.address, self.rec.port) if self.rec.port else None


class Service:
    def __init__(self, engine: "Engine", rec: ServiceRecord) -> None:
        self.engine = engine
        self.rec = rec
        self.manifest = parse(rec.manifest, name=rec.name).manifest
        self.instances: dict[int, Instance] = {}
        # Lost with their node (it went down): not the service's any more, kept until that node
        # stops them or is forgotten (control/nodes.py liveness_changed).
        self.lost: dict[int, Instance] = {}
        self._replacing: list[tuple[int, str]] = []  # (slot, node) of lost ones no start has replaced yet
        # The pause boundary is in the record (wall clock): a restarted server waits out the same pause.
        # A rollout in flight when the server started (again): its instances may be gone with a clean
        # stop, and the good version's strength comes back before the rollout goes on (rollout.py).
        self.state = rollout.State(status=rec.update_status, steps=rec.steps, boundary=_boundary_from(rec.batch_ended),
                                   restoring=rec.update_status in ("rolling", "paused", "canary"))
        self._saved_boundary = self.state.boundary
        self._wakeup = trio.Event()
        self._changed = trio.Event()
        self._parsed: dict[str, Manifest] = {}  # manifest text -> parsed, for instances of the good version
        if rec.good_version is None and rec.version:
            # A record from before good_* was kept: what is settled in force completed,
            # and during a rollout the previous version was the one in force.
            if rec.update_status == "none" and not rec.stopped:
                rec.good_version, rec.good_manifest, rec.good_generation = rec.version, rec.manifest, rec.generation
                rec.before_good_version, rec.before_good_manifest = rec.previous_version, rec.previous_manifest
            elif rec.previous_version:
                rec.good_version, rec.good_manifest = rec.previous_version, rec.previous_manifest
        self.mtime = time.time()
        self.loop_scope = trio.CancelScope()
        self._unrouted: bool | None = None  # None until routing was first decided
        self._at_limit = False
        self._unplaced = ""  # why the last start could not be placed (said once)
        self._awaiting_router = False
        self.commands = 0  # bumped by every command: a plan made before one is stale
        self.deleted = False  # `delete` finished: the service is gone from the engine
        self.stats = ServiceStats()  # counted for the metrics, from this server's start

    @property
    def name(self) -> str:
        return self.rec.name

    # -- what the filesystem shows --------------------------------------------------

    def target(self) -> rollout.Target:
        m = self.manifest
        rec = self.rec
        # A drain moves instances batch by batch whatever the strategy: `replace` would stop them first.
        strategy = "rolling" if m.update == "replace" and self.moving_off() else m.update
        return rollout.Target(key=(rec.version or "", rec.generation),
                              replicas=0 if rec.stopped else rec.replicas,
                              strategy=strategy, batch=m.update_batch, pause=m.update_pause,
                              restart=m.restart, max_restarts=m.max_restarts,
                              good=(rec.good_version, rec.good_generation) if rec.good_version else None,
                              stopped=rec.stopped, canary=self.canaries(), auto_promote=m.auto_promote)

    def moving_off(self) -> list[str]:
        """The draining nodes this service still has instances on (not yet told to leave): from the
        records (the node's, each instance's ``node``), so a restart of deployfs mid-drain carries on."""
        draining = self.engine.nodes.draining
        if not draining:
            return []
        return sorted({i.rec.node for i in self.instances.values() if i.rec.node in draining and not i.leaving})

    def canaries(self) -> int:
        """How many canaries run beside the old set now: 0 outside a canary phase."""
        return canaries_of(self.rec, self.manifest)

    def set_previous(self) -> None:
        """The rollback target: the last good version while another is the target, else the good one before it."""
        rec = self.rec
        if rec.version == rec.good_version:
            rec.previous_version, rec.previous_manifest = rec.before_good_version, rec.before_good_manifest
        else:
            rec.previous_version, rec.previous_manifest = rec.good_version, rec.good_manifest

    def completed(self) -> None:
        """The target is fully in force: it becomes the good version, and the one before it the rollback target."""
        rec = self.rec
        if rec.version != rec.good_version:
            rec.before_good_version, rec.before_good_manifest = rec.good_version, rec.good_manifest
        rec.good_version, rec.good_manifest, rec.good_generation = rec.version, rec.manifest, rec.generation
        self.set_previous()

    def manifest_for(self, key: rollout.Key) -> Manifest:
        """The manifest an instance of ``key`` runs: the target's, or the good version's when a failure restores it."""
        if key == self.target().key:
            return self.manifest
        text = self.rec.good_manifest if key[0] == self.rec.good_version else self.engine.store.get_version(self.name, key[0])
        if text is None:
            raise KeyError(f"no manifest for version {key[0]}")
        if text not in self._parsed:
            self._parsed = {text: parse(text, name=self.name).manifest}  # one good version at a time
        return self._parsed[text]

    def views(self) -> list[rollout.Inst]:
        now = trio.current_time()
        moving = self.engine.nodes.draining
        out = []
        for i in self.instances.values():
            phase = Phase.LEAVING if i.leaving else Phase.STARTING if i.busy else i.phase
            recent = sum(1 for t in i.restart_times if now - t < rollout.RESTART_WINDOW)
            key = (i.rec.version, i.rec.generation)
            if moving and i.rec.node in moving:
                # `drain`: to the planner an instance on a draining node is of another version, so
                # the rolling rules move it: a replacement elsewhere, ready, then this one retires.
                key = (f"{i.rec.version}@{i.rec.node}", i.rec.generation)
            out.append(rollout.Inst(i.rec.id, i.rec.slot, key, phase, i.why, i.exit_ok, i.last_exit, recent))
        return out

    def by_slot(self) -> list[Instance]:
        return sorted(self.instances.values(), key=lambda i: i.rec.slot)

    def members(self) -> list[derive.Member]:
        """The instances as the derivations (model/status.py) see them: the view reads the same from the records."""
        return [derive.Member((i.rec.version, i.rec.generation), i.rec.slot, i.phase, i.leaving, i.busy, i.backend)
                for i in self.instances.values()]

    def standing(self) -> derive.Standing:
        return standing_of(self.rec, self.manifest, steps=self.state.steps)

    def progress(self) -> tuple[int, int]:
        return derive.progress(self.standing(), self.members())

    def endpoints(self) -> list[tuple[str, int]]:
        return derive.endpoints(self.members())

    def health(self) -> str:
        return derive.health(self.rec.stopped, self.rec.replicas, self.members())

    def outcome(self) -> str | None:
        """What `wait` returns, or None while a rollout is in flight."""
        return "deleted" if self.deleted else derive.outcome(self.standing(), self.members())

    def rolling_back_by_itself(self) -> bool:
        """A failed rollout with ``auto_rollback yes`` that has a good version to go back to."""
        return rolling_back_of(self.rec, self.manifest)

    def restored(self) -> bool | None:
        """After a failure: the good version serves ``replicas`` again and the failed release is gone.
        None: it cannot be, the good version went bad itself (the rollback then fails, and says why)."""
        good = (self.rec.good_version, self.rec.good_generation)
        insts = list(self.instances.values())
        if any((i.rec.version, i.rec.generation) == good and i.phase in (Phase.UNHEALTHY, Phase.EXITED, Phase.FAILED)
               for i in insts):
            return None
        ready = sum(1 for i in insts if (i.rec.version, i.rec.generation) == good and i.phase is Phase.READY)
        return ready >= self.rec.replicas and all(
            (i.rec.version, i.rec.generation) == good and not i.leaving and not i.busy for i in insts)

    async def wait_change(self) -> None:
        await self._changed.wait()

    # -- the loop ------------------------------------------------------------------------

    def poke(self) -> None:
        # After the commit of what the caller wrote: a command refused on a full disk wakes nobody.
        self.engine.store.after_commit(self._poke)

    def _poke(self) -> None:
        self._wakeup.set()
        self._changed.set()
        self._changed = trio.Event()
        self.mtime = time.time()
        self.engine.notify(self.name)

    async def run(self) -> None:
        with self.loop_scope:
            # A shutdown that came before this task first ran cancelled the scope
            # already; the first pass would act before any checkpoint noticed.
            await trio.lowlevel.checkpoint()
            await self._loop()

    async def _loop(self) -> None:
        while True:
            self._wakeup = trio.Event()
            if self.rec.deleting and not self.instances:
                await self._remove()
                return
            routed = self.engine.router.routed()
            if not routed and not self._awaiting_router:
                self._awaiting_router = True
                self.engine.nursery.start_soon(self._poke_once_routed)
            refused = self.engine.router.failure(self.name) if routed else None
            if refused and self.rec.update_status in ("rolling", "paused"):
                # `done` means the port serves this service: a router that could not listen fails it.
                self.state = rollout.State("failed")
                self.do(rollout.Fail(f"router: {refused}"))
                self.poke()
                continue
            p = rollout.plan(self.target(), self.views(), self.state, trio.current_time(), routed)
            self.state = p.state
            changed = []
            commands = self.commands
            for action in p.actions:
                changed.append(self.do(action))
                if isinstance(action, rollout.Start):
                    # A start is a placement and a commit, and the node agent forks on
                    # the same loop: `scale 1000` in one stretch held every FUSE request
                    # (the ctl write's own reply too) for over a second. Let them in between.
                    await trio.sleep(0)
                    if self.commands != commands:
                        break
            if self._replacing and (self.rec.stopped or (p.state.status == "none" and not any(
                    isinstance(a, rollout.Start) for a in p.actions))):
                self._replacing.clear()  # (stopped, or scaled below what was lost: no start will replace them)
            if self.commands != commands:
                # A command landed between spawns: the rest of this plan (starts for the
                # old target, its status) is stale, and what the command set stands.
                continue
            if (self.rec.update_status, self.rec.steps, self._saved_boundary) != (
                    p.state.status, p.state.steps, p.state.boundary):
                self.rec.update_status, self.rec.steps = p.state.status, p.state.steps
                self.save()
                if p.state.status == "canary" and not any(changed):
                    self.poke()  # (resume in a canary phase: the status is all that moved, and `wait` answers on it)
            if self.rolling_back_by_itself() and self.restored() is not False and not self.engine.stopping:
                self.engine.auto_rollback(self)
                continue
            if any(changed):
                self.poke()
                await trio.sleep(0)
                continue
            # Nothing to do, or only what cannot be done yet (a limit): wait,
            # retrying refused actions now and then instead of spinning.
            wake = p.wake_at if p.wake_at is not None else math.inf
            if p.actions:
                wake = min(wake, trio.current_time() + 1.0)
            with trio.move_on_at(wake):
                await self._wakeup.wait()

    def do(self, a: rollout.Action) -> bool:
        """Carry out one action; False when it could not be done (yet)."""
        e = self.engine
        if e.stopping and isinstance(a, (rollout.Start, rollout.Restart)):
            return False  # deployfs is shutting down: nothing new may start behind its stops
        if isinstance(a, rollout.Start):
            if e.instance_count() >= e.max_instances:
                if not self._at_limit:
                    self.event(f"cannot start instance {a.slot}: the limit of {e.max_instances} instances is reached")
                self._at_limit = True
                return False
            self._at_limit = False
            where = e.nodes.place(self)
            if where.node is None:
                if where.reason != self._unplaced:
                    self.event(f"cannot start instance {a.slot}: {where.reason}")
                self._unplaced = where.reason
                return False
            self._unplaced = ""
            version, generation = a.key or self.target().key
            m = self.manifest_for((version, generation))
            # No port: its node agent gives one and records it with the pid; until then it has no
            # backend, so nothing routes to it (docs/architecture.md "Ports").
            rec = InstanceRecord(self.name, e.next_instance_id(), a.slot, version, generation,
                                 node=where.node, address=e.nodes.address_of(where.node))
            inst = Instance(rec, m)
            self.instances[rec.id] = inst
            rec.desired = RUN
            e.store.put_instance(rec)  # recorded before it exists: a crash in between leaves a findable stray
            if self._replacing:
                slot, node = self._replacing.pop(0)
                self.event(f"instance {a.slot} replaces {slot} (node {node} down)")
        elif isinstance(a, (rollout.Stop, rollout.Restart, rollout.GiveUp)) and a.id not in self.instances:
            return False  # gone while an earlier action of the same plan yielded
        elif isinstance(a, rollout.Stop):
            self.stop_instance(self.instances[a.id], a.reason)
        elif isinstance(a, rollout.Restart):
            inst = self.instances[a.id]
            inst.busy = True
            now = trio.current_time()
            inst.restart_times = [t for t in inst.restart_times if now - t < rollout.RESTART_WINDOW] + [now]
            inst.rec.restarts += 1
            self.stats.restarts += 1
            recent = sum(1 for t in inst.restart_times if trio.current_time() - t < rollout.RESTART_WINDOW)
            self.event(f"instance {inst.rec.slot} {a.reason}, restarting ({recent}/{inst.manifest.max_restarts})")
            self.save_instance(inst)  # restarts past the agent's incarnation: it stops the process, starts anew
        elif isinstance(a, rollout.GiveUp):
            inst = self.instances[a.id]
            inst.phase, inst.rec.state, inst.rec.health, inst.rec.phase = Phase.FAILED, "failed", "failed", "failed"
            inst.rec.desired = STOP  # whatever still runs of it goes; the record stays, failed
            inst.rec.restart_times = [_to_wall(t) for t in inst.restart_times]
            e.store.put_instance_fields(inst.rec, CONTROLLER_FIELDS + ("state", "health", "phase"))
            self.event(f"instance {inst.rec.slot} failed: {a.reason}; giving up (restart it with `restart`)")
        elif isinstance(a, rollout.Fail):
            self.rec.failure = a.reason + self._detection()
            self.rec.update_status = "failed"
            self.stats.rollouts_failed += 1
            self.keep_logs("failed", lambda i: (i.rec.version, i.rec.generation) == self.target().key)
            self.save()
            self.event(f"rolling update failed: {self.rec.failure}")
            if self.rec.canary_phase:
                self.rec.canary_phase = False
                self.routing_changed()  # no more canary weights: the old set takes every request
            if self.rolling_back_by_itself():
                self.event(f"auto_rollback: deployfs restores {self.rec.good_version}, then rolls back to it")
        elif isinstance(a, rollout.Promote):
            self.promote(f"deployfs ({a.reason})")
        elif isinstance(a, rollout.Complete):
            # A move off a draining node is a rollout to the version in force (no rollout_from); its last
            # instances there may be gone already, and then the draining nodes are where it came from.
            draining = e.nodes.draining
            moved = sorted({i.rec.node for i in self.instances.values() if i.rec.node in draining}) or (
                sorted(draining) if self.rec.rollout_from is None and self.rec.version == self.rec.good_version
                else [])
            with e.store.transaction():
                for id, slot in a.renumber.items():
                    self.instances[id].rec.slot = slot
                    self.save_instance(self.instances[id])
                self.rec.update_status, self.rec.failure, self.rec.canary_phase = "none", "", False
                self.completed()
                self.save()
            took = time.time() - (self.rec.rollout_started or time.time())
            what = "rolling update" if self.rec.rollout_from else "deploy"
            if moved and not self.rec.rollout_from:
                what = f"move off node {', '.join(moved)}"
            e.nodes.drained()
            self.stats.rollouts_completed += 1
            self.stats.rollout_seconds.observe(max(took, 0.0))
            self.event(f"{what} complete: {self.rec.version} in {max(took, 0.0):.1f}s")
            self.rec.rollout_from, self.rec.rollout_started = None, None
            self.save()
        return True

    async def _remove(self) -> None:
        """The last step of `delete`: every instance is gone; release the port, drop the records."""
        e, port = self.engine, self.manifest.port
        e.router.set_backends(self.name, None, [])
        with trio.move_on_after(30):
            await e.router.wait_routed()  # the port is free once this returns
        e.store.delete_service(self.name)
        e.events.forget(self.name)
        if e.services.get(self.name) is self:
            del e.services[self.name]
        self.deleted = True
        e.events.emit(CLUSTER, f"deleted {self.name}" + (f": port {port} released" if port else ""))
        self.poke()

    async def _poke_once_routed(self) -> None:
        await self.engine.router.wait_routed()
        self._awaiting_router = False
        self.poke()

    def _detection(self) -> str:
        now = trio.current_time()
        bad = [i.first_bad for i in self.instances.values() if i.first_bad is not None
               and (i.rec.version, i.rec.generation) == self.target().key]
        return f" (detected {now - min(bad):.2f}s after the first failure)" if bad else ""

    # -- instance lifecycle ----------------------------------------------------------

    def observed(self, rec: InstanceRecord) -> None:
        """The node agent wrote what it sees of an instance: turn it into the phase plan() reads."""
        inst = self.instances.get(rec.id)
        if inst is None:
            if rec.id in self.lost and rec.pid is None and rec.state in ("stopped", "failed"):
                self.drop_lost(self.lost[rec.id], "its node came back and stopped it")
            return
        for name in AGENT_FIELDS:
            setattr(inst.rec, name, getattr(rec, name))
        if inst.stopped is not None:
            if rec.desired == STOP and rec.pid is None and rec.state in ("stopped", "failed"):
                inst.stopped.set()
            return
        if inst.leaving or inst.phase is Phase.FAILED or rec.incarnation != inst.rec.restarts:
            return  # (its process is not the one the latest intent asked for yet)
        before = (inst.phase, inst.why, inst.busy)
        now = trio.current_time()
        if inst.busy and rec.state in ("running", "exited"):
            inst.busy, inst.first_bad = False, None
            inst.phase = Phase.STARTING
        if rec.state == "exited":
            if inst.phase is not Phase.EXITED:
                inst.phase, inst.why, inst.exit_ok, inst.last_exit = Phase.EXITED, rec.why, rec.exit_ok, now
                inst.first_bad = inst.first_bad or now
        elif rec.state == "running" and phase_of(rec) in (Phase.STARTING, Phase.READY, Phase.UNHEALTHY):
            inst.phase, inst.why = phase_of(rec), rec.why  # (the view's rule: state/members.py)
            if inst.phase is Phase.UNHEALTHY:
                inst.first_bad = inst.first_bad or (_from_wall(rec.first_bad) if rec.first_bad else now)
            elif inst.phase is Phase.READY:
                inst.first_bad = None
        if (inst.phase, inst.why, inst.busy) != before:
            self.routing_changed()
            self.poke()

    def lose(self, node: str) -> list[int]:
        """``node`` is down: its instances are lost (the planner no longer sees them, so it starts
        replacements on other nodes at once); their records stay with ``desired stop`` for that
        node to carry out if it comes back.  The slots lost, not counting those already leaving."""
        lost = sorted((i for i in self.instances.values() if i.rec.node == node), key=lambda i: i.rec.slot)
        if not lost:
            return []
        replaced = [i.rec.slot for i in lost if not i.leaving]
        with self.engine.store.transaction():
            for inst in lost:
                del self.instances[inst.rec.id]
                inst.rec.desired, inst.rec.lost = STOP, True
                self.lost[inst.rec.id] = inst
                if inst.stopped is not None:
                    inst.stopped.set()  # a stop in flight: the node carries it out if it returns
                if inst.rec.pid is None and inst.rec.state in ("stopped", "failed"):
                    self.drop_lost(inst, "")  # nothing of it runs there, as its node last said
                else:
                    self.save_instance(inst)
            self._replacing += [(slot, node) for slot in replaced]
            self.event(f"node {node} down: instance{'s' if len(lost) != 1 else ''} "
                       f"{', '.join(str(i.rec.slot) for i in lost)} lost" + (", replaced on other nodes" if replaced else ""))
        self.routing_changed()
        self.poke()
        return [i.rec.slot for i in lost]

    def forget_lost(self, nodes: set[str]) -> None:
        """Lost instances of a node whose record is gone (the node was removed): nobody will stop them."""
        for inst in [i for i in self.lost.values() if i.rec.node not in nodes]:
            self.drop_lost(inst, f"node {inst.rec.node} is no longer known")

    def drop_lost(self, inst: Instance, why: str) -> None:
        self.lost.pop(inst.rec.id, None)
        self.engine.store.delete_instance(self.name, inst.rec.id)
        if why:
            self.event(f"instance {inst.rec.slot} of node {inst.rec.node} (replaced while it was down): {why}; "
                       "its record goes")

    def stop_instance(self, inst: Instance, reason: str) -> None:
        inst.leaving = True
        inst.rec.desired = DRAIN
        self.save_instance(inst)
        self.routing_changed()
        if inst.running:
            self.event(f"instance {inst.rec.slot} draining ({reason})")
        self.engine.nursery.start_soon(self._stop, inst)

    async def _stop(self, inst: Instance) -> None:
        m, e = inst.manifest, self.engine
        if inst.running and inst.backend and inst.phase is Phase.READY:
            if left := await e.router.drain(self.name, inst.backend, m.drain_timeout):
                # Those connections are cut by the stop signal (unless the app finishes them): say so.
                self.event(f"instance {inst.rec.slot} drain timed out after {m.drain_timeout:g}s: "
                           f"{left} connection{'s' if left != 1 else ''} still open")
        if inst.rec.lost:
            return  # its node went down meanwhile: the stop is that node's if it comes back (lose)
        inst.stopped = trio.Event()
        inst.rec.desired = STOP
        self.save_instance(inst)
        now = e.store.get_instance(self.name, inst.rec.id)
        if now is not None and not (now.pid is None and now.state in ("stopped", "failed")):
            await inst.stopped.wait()  # the agent stops it (stop_signal, SIGKILL at stop_timeout) and says so
        if inst.rec.lost:
            return
        self.instances.pop(inst.rec.id, None)
        e.store.delete_instance(self.name, inst.rec.id)  # (its agent frees its port)
        self.poke()

    # -- bookkeeping ---------------------------------------------------------------------

    def promote(self, who: str, event: str = "") -> None:
        """End the canary phase: the rest rolls out the rolling way (paused stays paused)."""
        rec = self.rec
        rec.canary_phase = False
        if rec.update_status == "canary":
            rec.update_status = "rolling"
        self.state = rollout.State(rec.update_status, rec.steps, trio.current_time(), self.state.restoring)
        self.save()
        self.event(event or f"canary promoted by {who}: rolling out the rest")
        self.routing_changed()  # every instance counts the same again

    def weights(self, endpoints: list[tuple[str, int]]) -> list[int] | None:
        """canary_weight during a canary phase: the canaries' share, whatever their number."""
        pct = self.manifest.canary_weight
        if pct is None or not self.canaries() or self.rec.update_status == "failed":
            return None
        key = self.target().key
        canary = {i.backend for i in self.instances.values() if (i.rec.version, i.rec.generation) == key}
        flags = [b in canary for b in endpoints]
        # Every backend keeps at least one share where it can: past 100 backends the total grows.
        total = 100 * max(1, math.ceil(len(endpoints) / 100))
        return rollout.split_weights(flags, pct, total) if any(flags) and not all(flags) else None

    def routing_changed(self) -> None:
        # The router takes what the records say once they say it: a command refused on a full disk
        # (its writes rolled back, the engine's memory restored) leaves the router as it was.
        self.engine.store.after_commit(self._route)

    def _route(self) -> None:
        endpoints = self.endpoints()
        weights = self.weights(endpoints)
        protocol = self.manifest.traffic_protocol
        if weights is None:  # (as before weights existed: a router or fake that knows none is fed as it was)
            self.engine.router.set_backends(self.name, self.manifest.port, endpoints, protocol=protocol)
        else:
            self.engine.router.set_backends(self.name, self.manifest.port, endpoints, weights, protocol=protocol)
        empty = self.manifest.port is not None and not endpoints
        if self._unrouted is not None and empty != self._unrouted:
            if empty:
                self.event(f"no healthy instance: connections to port {self.manifest.port} are refused")
            else:
                self.event(f"serving on port {self.manifest.port}")
        self._unrouted = empty

    def keep_logs(self, why: str, which: Callable[[Instance], bool]) -> None:
        """Keep these instances' output readable as logs/<why>-<slot> until the next rollout."""
        self.rec.kept_logs = {f"{why}-{i.rec.slot}": i.rec.id for i in self.instances.values() if which(i)}

    def save(self) -> None:
        self.rec.batch_ended = _boundary_to(self.state.boundary)
        self._saved_boundary = self.state.boundary
        self.engine.store.put_service(self.rec)

    def save_instance(self, inst: Instance) -> None:
        """Record the controller's intent (its own fields only: the agent's observations stay), times as wall clock."""
        rec = inst.rec
        rec.restart_times = [_to_wall(t) for t in inst.restart_times]
        self.engine.store.put_instance_fields(rec, CONTROLLER_FIELDS)

    def event(self, text: str) -> None:
        self.engine.events.emit(self.name, text)


# A manifest's limit this host has no cgroup controller for: (its field, why), or None.
LimitCheck = Callable[[Manifest], "tuple[str, str] | None"]


class Engine:
    def __init__(self, store: Store, *, events: EventLog | None = None,
                 router: Routing | None = None, max_services: int = MAX_SERVICES,
                 max_instances: int = MAX_INSTANCES, users: UserPolicy | None = None,
                 limit_problem: LimitCheck | None = None, node: str = NODE, address: str = LOOPBACK) -> None:
        """``limit_problem``: what this host cannot enforce of a manifest's limits, checked at apply
        (docs/architecture.md "Controller and node agent"); None: nothing is refused for it."""
        self.store = store
        # The node this process's instances run on and where they listen (--node/--address in a cluster).
        self.node, self.address = node, address
        self.nodes = Nodes(self, node, address)  # the node records: placement, cordon, drain
        self.events = events or EventLog(store)
        self.router = router or NullRouter()
        self.max_services, self.max_instances = max_services, max_instances
        self.limit_problem = limit_problem
        self.users = users  # who instances run as, and who may say so (None: as deployfs, no check)
        self.services: dict[str, Service] = {}
        self.listeners: list = []  # called with a service name when anything about it changes
        self.stopping = False  # set by shutdown: nothing starts after it
        self.nursery: trio.Nursery

    def notify(self, name: str) -> None:
        for listener in self.listeners:
            listener(name)

    def next_instance_id(self) -> int:
        return self.store.next_instance_id()  # from the records: a restart never reuses an id

    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.services.values())

    def liveness_changed(self) -> None:
        """The serve layer's word that some node's liveness (:attr:`Nodes.alive`) may have changed,
        once the cluster view is loaded: nodes are declared down or back, lost instances replaced,
        and every service's reconcile wakes at once (control/nodes.py)."""
        self.nodes.liveness_changed()

    def prepare(self) -> None:
        """Join the nodes and give old records their intent: before this node's agent adopts
        anything (serve/local.py LocalNode runs them in that order)."""
        self.nodes.join()
        self._intents_for_old_records()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise every service; :meth:`prepare` first, and this node's agent adopted what runs."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            cache = self.store.cache(INSTANCES)  # what the agent reports, heard after commit (or kept in memory)
            await nursery.start(cache.run)
            cache.subscribe(self._observed)
            self._recover()
            nursery.start_soon(self._watch_store)  # (once the services are known: it tells each of a full disk)
            task_status.started()
            await trio.sleep_forever()

    def _observed(self, changes: list[Change]) -> None:
        for c in changes:
            if c.kind != "put":
                continue
            try:
                rec = decode(InstanceRecord, c.kv.value)
            except (ValueError, TypeError):
                continue
            svc = self.services.get(rec.service)
            if svc is not None:
                svc.observed(rec)

    def _intents_for_old_records(self) -> None:
        """Records of a deployfs before the node agent carry no intent: give them the one the
        engine acted on, so the agent adopts (never restarts) what runs."""
        with self.store.transaction():
            for svc in self.store.list_services():
                for irec in self.store.list_instances(svc.name):
                    if irec.desired:
                        continue
                    irec.desired = DRAIN if irec.state == "draining" else STOP if irec.state == "failed" else RUN
                    irec.node = irec.node or self.node  # (from before nodes were recorded: this machine's)
                    irec.incarnation = -1 if irec.pid is None and irec.state == "starting" else irec.restarts
                    self.store.put_instance(irec)

    def _recover(self) -> None:
        """Load every service and its instances as the node agent found them; finish what was leaving."""
        for rec in self.store.list_services():
            svc = Service(self, rec)
            self.services[svc.name] = svc
            leaving = []
            for irec in self.store.list_instances(rec.name):
                text = self.store.get_version(svc.name, irec.version) or svc.rec.manifest
                inst = Instance(irec, parse(text, name=svc.name).manifest)
                # The restart budget and the last exit carry on (max_restarts counts across a restart of deployfs).
                inst.restart_times = [_from_wall(t) for t in irec.restart_times]
                inst.last_exit = None if irec.last_exit is None else _from_wall(irec.last_exit)
                inst.exit_ok, inst.why = irec.exit_ok, irec.why
                # What the view shows of this record is what the engine carries on from (state/members.py):
                # a running unhealthy one stays unhealthy, a restart in flight stays out of the router.
                member = member_of(irec)
                inst.phase, inst.busy = member.phase, member.busy
                inst.first_bad = _from_wall(irec.first_bad) if irec.first_bad is not None else None
                if inst.phase is Phase.EXITED and inst.last_exit is None:
                    inst.last_exit = trio.current_time()
                if irec.lost:  # (a controller before this one replaced it: its node has yet to stop it)
                    svc.lost[irec.id] = inst
                    if irec.pid is None and irec.state in ("stopped", "failed"):
                        svc.drop_lost(inst, "its node came back and stopped it")
                    continue
                svc.instances[irec.id] = inst
                if member.leaving:
                    leaving.append(inst)
            # Routing only once every instance is known, then finish what was leaving.
            svc.routing_changed()
            for inst in leaving:
                svc.stop_instance(inst, "it was draining when deployfs stopped")
        for svc in self.services.values():
            self.nursery.start_soon(svc.run)

    async def _watch_store(self) -> None:
        """A full state disk: say so in every events file, retry, say when it is over."""
        said: str | None = None
        while True:
            if self.store.full is not None:
                self.store.flush()
            full = self.store.full
            if (full is None) != (said is None):
                for name in (CLUSTER, *self.services):  # /deploy/events and every service's
                    self.events.emit(name, f"{full}: commands and manifest changes are refused (ENOSPC) until "
                                     "there is room; supervision goes on, its records and events kept in memory "
                                     "meanwhile" if full else "the state disk has room again: what was kept in "
                                     "memory is saved")
                said = full
            await trio.sleep(STORE_RETRY)

    async def shutdown(self, *, keep_instances: bool = False) -> None:
        """Drain and stop every instance (unless kept), then stop all tasks."""
        self.stopping = True
        for svc in self.services.values():
            svc.loop_scope.cancel()  # nothing may restart what we stop
        if keep_instances:
            for svc in self.services.values():  # the history says why nothing was drained
                if n := sum(1 for i in svc.instances.values() if i.running):
                    svc.event(f"deployfs stopping: {n} instance{'s' if n != 1 else ''} kept running "
                              "(--keep-instances); the next start adopts them")
        else:
            for svc in self.services.values():
                for inst in list(svc.instances.values()):
                    if not inst.leaving:
                        svc.stop_instance(inst, "deployfs is shutting down")
            with trio.move_on_after(120):
                while any(s.instances for s in self.services.values()):
                    await trio.sleep(0.05)
        self.nursery.cancel_scope.cancel()

    # -- commands -----------------------------------------------------------------------

    def command(self, name: str, verb: str, arg: str | None, who: str) -> str:
        """Carry out one ctl verb; return the reply, or raise CommandError.

        A command's writes are one transaction.  On a full state disk it is
        refused whole (ENOSPC), and what it changed in memory is put back.
        """
        svc = self.services.get(name)
        if svc is not None:
            svc.commands += 1
        saved = None if svc is None else (replace(svc.rec), svc.manifest, svc.state)
        refused: CommandError | None = None
        try:
            with self.store.transaction(refuse_when_full=True):
                try:
                    reply = self._command(name, verb, arg, who)
                except CommandError as e:
                    refused = e  # what it wrote (the reason, in events) is kept
        except StoreFull as e:
            if svc is not None and saved is not None:
                rec, svc.manifest, svc.state = saved
                vars(svc.rec).update(vars(rec))
            elif (new := self.services.pop(name, None)) is not None:
                new.loop_scope.cancel()
                self.router.set_backends(name, None, [])
            raise CommandError(Kind.NO_SPACE, str(e)) from None
        if refused is not None:
            raise refused
        return reply

    def refused(self, name: str | None, who: str, reason: str) -> None:
        """Keep a refused command in its service's events, or in the cluster log when
        there is no such service (a typo, a deleted one, a line that named none)."""
        target = name if name is not None and name in self.services else CLUSTER
        self.events.emit(target, f"command refused ({who}): {reason}")

    def _command(self, name: str, verb: str, arg: str | None, who: str) -> str:
        if verb in NODE_VERBS:  # (top ctl only: `name` is a node's)
            return self.nodes.command(name, verb, who)
        if not valid_name(name):
            raise CommandError(Kind.INVALID, f"bad service name {name!r}")
        if verb == "apply":
            return self._apply(name, who)
        svc = self.services.get(name)
        if svc is None:
            raise CommandError(Kind.NOT_FOUND, f"no service {name!r} is deployed (apply it first)")
        rec, status = svc.rec, svc.rec.update_status
        if rec.deleting and verb not in ("stop", "delete"):
            raise CommandError(Kind.BUSY, f"{name} is being deleted")
        if verb == "pause":
            if status == "paused":
                return "ok already paused"
            if status not in ("rolling", "canary"):
                raise CommandError(Kind.BUSY, f"{name}: no rollout in flight to pause (update_status {status})")
            rec.paused_at = time.time() if rec.canary_phase else None
            self._set_status(svc, "paused", f"rolling update paused by {who}")
        elif verb == "resume":
            if status != "paused":
                raise CommandError(Kind.BUSY, f"{name}: not paused (update_status {status})")
            b, now = svc.state.boundary, trio.current_time()
            at = None if rec.paused_at is None else _from_wall(rec.paused_at)
            if rec.canary_phase and at is not None and b is not None and b != float("-inf"):
                # auto_promote counts healthy canary time outside the pause: its clock carries on from where it was.
                svc.state = replace(svc.state, boundary=b + now - max(at, b))
            rec.paused_at = None
            self._set_status(svc, "rolling", f"rolling update resumed by {who}")
        elif verb == "step":
            if status != "paused":
                raise CommandError(Kind.BUSY, f"{name}: step works while paused (update_status {status})")
            key = svc.target().key
            if svc.canaries() and sum(1 for i in svc.instances.values()
                                      if (i.rec.version, i.rec.generation) == key) >= svc.canaries():
                # The canary is the only batch before a decision: nothing to step to.
                raise CommandError(Kind.BUSY, f"{name}: the canaries are started; promote (then step), "
                                              "or rollback")
            svc.state = rollout.State("paused", svc.state.steps + 1, svc.state.boundary, svc.state.restoring)
            rec.steps = svc.state.steps
            svc.save()
            svc.event(f"rolling update step by {who}")
        elif verb == "promote":
            if not rec.canary_phase or status not in ("canary", "paused"):
                raise CommandError(Kind.BUSY, f"{name}: no canary to promote (update_status {status})")
            svc.promote(who)
        elif verb == "abort":
            if status not in ("rolling", "paused", "canary"):
                raise CommandError(Kind.BUSY, f"{name}: no rollout in flight to abort (update_status {status})")
            if not rec.good_version or rec.good_version == rec.version:
                raise CommandError(Kind.BUSY, f"{name}: no earlier version to return to")
            text = set_replicas_line(rec.good_manifest.encode(), rec.replicas).decode()
            m = parse(text, name=name).manifest
            self._check_port(name, m.port)
            self._begin(svc, m, text, f"{'canary' if rec.canary_phase else 'rollout'} aborted: rollback", who)
        elif verb == "rollback":
            if not rec.previous_version:
                raise CommandError(Kind.BUSY, f"{name}: no previous version to roll back to")
            # The replica count is not part of a version: a rollback keeps the one set now (as apply does after scale).
            text = set_replicas_line(rec.previous_manifest.encode(), rec.replicas).decode()
            parsed = parse(text, name=name)
            self._check_users(parsed, name, who)
            parsed, text = self._recorded(parsed, text, name)
            m = parsed.manifest
            self._check_port(name, m.port)
            self._begin(svc, m, text, "rollback", who)
        elif verb == "restart":
            if status in ("rolling", "paused", "canary"):
                raise CommandError(Kind.BUSY, f"{name}: a rollout is in flight (update_status {status})")
            rec.generation += 1
            self._begin(svc, svc.manifest, rec.manifest, "rolling restart", who)
        elif verb == "scale":
            n = _count(arg)
            if status == "failed":
                raise CommandError(Kind.BUSY, f"{name}: the last rollout failed; apply a fixed manifest or rollback first")
            with self.store.transaction():
                rec.replicas = n
                rec.manifest = set_replicas_line(rec.manifest.encode(), n).decode()
                svc.manifest = svc.manifest.with_replicas(n)  # what `restart` rolls out again
                if rec.version == rec.good_version:
                    rec.good_manifest = rec.manifest
                f = self.store.get_file(name)
                if f is not None:
                    self.store.put_file(name, set_replicas_line(f.data, n))
                svc.save()
                svc.event(f"scaled to {n} by {who}")
        elif verb in ("stop", "delete"):
            if rec.deleting:
                return "ok already deleting"
            svc.keep_logs("stopped", lambda i: not i.leaving)
            abandoned = rec.version if rec.canary_phase and rec.good_version and rec.good_version != rec.version else None
            if abandoned:
                # A stop ends a canary by abandoning it: nobody promoted it, so what `restart` (or a
                # restart of deployfs) brings back is the good version, never the canary everywhere.
                text = set_replicas_line(rec.good_manifest.encode(), rec.replicas).decode()
                rec.version, rec.manifest, rec.generation = rec.good_version, text, rec.good_generation
                svc.manifest = parse(text, name=name).manifest
                svc.set_previous()
            rec.stopped, rec.deleting = True, verb == "delete"
            rec.canary_phase = False
            svc.state = rollout.State()
            rec.update_status, rec.steps, rec.rollout_from, rec.rollout_started = "none", 0, None, None
            with self.store.transaction():
                svc.save()
                if verb == "delete":
                    svc.event(f"deleting by {who}: stopping every instance")
                    self.events.emit(CLUSTER, f"deleting {name} by {who}")
                else:
                    svc.event(f"stopping every instance by {who}")
                if abandoned:
                    svc.event(f"canary of {abandoned} abandoned by stop: {rec.version} is in force "
                              f"(`restart` brings it back; apply again to retry the canary)")
        else:
            raise CommandError(Kind.INVALID, f"unknown verb {verb!r}")
        svc.poke()
        return "ok deleting" if verb == "delete" else "ok"

    def _apply(self, name: str, who: str) -> str:
        f = self.store.get_file(name)
        if f is None:
            raise CommandError(Kind.NOT_FOUND, f"no manifest manifests/{name}")
        try:
            parsed = parse(f.data, name=name)
        except ManifestError as e:
            if name in self.services:
                self.services[name].event(f"apply refused: {e}")
            raise CommandError(Kind.INVALID, str(e)) from None
        self._check_users(parsed, name, who)
        parsed, text = self._recorded(parsed, f.data.decode(), name)
        m = parsed.manifest
        svc = self.services.get(name)
        if svc is not None and svc.rec.deleting:
            raise CommandError(Kind.BUSY, f"{name} is being deleted: apply it again once it is gone "
                                            f"(cat active/{name}/wait)")
        self._check_port(name, m.port)
        if svc is None:
            if len(self.services) >= self.max_services:
                raise CommandError(Kind.NO_SPACE, f"the limit of {self.max_services} services is reached")
            rec = ServiceRecord(name, version=m.version, replicas=m.replicas, manifest=text, update_status="rolling",
                                rollout_started=time.time())
            with self.store.transaction():
                self.store.put_version(name, m.version, text)
                self.store.put_service(rec)
                svc = Service(self, rec)
                svc.state = rollout.State("rolling", 0, float("-inf"))
                svc.stats.rollouts_started += 1
                self.services[name] = svc
                _warn(svc, parsed.warnings)
                svc.event(f"deployed {m.version} replicas={m.replicas} by {who}")
            self.nursery.start_soon(svc.run)
            svc.routing_changed()  # open the port now: a router may need time to listen (haproxy reloads)
            svc.poke()
            return f"ok deployed {m.version}"
        rec = svc.rec
        if text != rec.manifest:  # said once per manifest text, not on every apply of it
            _warn(svc, parsed.warnings)
        if m.version == rec.version and rec.update_status != "failed":
            was_stopped = rec.stopped
            changed = was_stopped or m.replicas != rec.replicas or m != svc.manifest
            rec.stopped, rec.replicas, rec.manifest = False, m.replicas, text
            old = svc.manifest
            # How the router forwards, and the canaries' share, are no part of an instance: no rollout,
            # the routers take them at once (canary_weight 1 -> 10 -> 50 is how a canary is ramped).
            reroute = m.traffic_protocol != old.traffic_protocol or m.canary_weight != old.canary_weight
            svc.manifest = m
            if reroute:
                svc.routing_changed()
            if rec.canary_phase and m.update != "canary":
                # The strategy is no part of the version: the canary phase simply ends, and says so.
                svc.promote(who, f"canary superseded by update {m.update} (apply by {who}): rolling out the rest")
            if was_stopped:  # starting again is a deploy: `wait` follows it
                rec.kept_logs = {}
                svc.state = rollout.State("rolling", 0, float("-inf"))
                rec.update_status, rec.rollout_started = "rolling", time.time()
                svc.stats.rollouts_started += 1
            svc.save()
            if not changed:
                return f"ok unchanged {m.version}"
            svc.event(f"{'started' if was_stopped else 'applied'} {m.version} replicas={m.replicas} by {who}"
                      + _protocol_change(old, m))
            svc.poke()
            return f"ok {m.version} replicas={m.replicas}"
        frm = rec.version
        self._begin(svc, m, text, f"{m.update} update" if m.update != "rolling" else "rolling update", who)
        if svc.rec.canary_phase:
            return f"ok canary {frm}->{m.version}"
        return f"ok rolling {frm}->{m.version}"

    def _recorded(self, parsed: Parsed, text: str, name: str) -> tuple[Parsed, str]:
        """What the version records: the user --default-user chose written in (identity.UserPolicy.record)."""
        return (parsed, text) if self.users is None else self.users.record(parsed, text, name)

    def _check_users(self, parsed: Parsed, name: str, who: str) -> None:
        """Refuse a user or group this host does not have, one the deployer may not run as,
        or a limit this host has no cgroup controller for (it would only fail every start)."""
        m, source = parsed.manifest, f"manifests/{name}"
        try:
            if self.users is not None:
                self.users.check(parsed, source, deployer_uid(who))
            problem = self.limit_problem(m) if self.limit_problem is not None else None
            if problem is not None:
                raise ManifestError(source, parsed.lines.get(problem[0]), problem[1])
        except ManifestError as e:
            if name in self.services:
                self.services[name].event(f"apply refused: {e}")
            raise CommandError(Kind.INVALID, str(e)) from None

    def _check_port(self, name: str, port: int | None) -> None:
        """Refuse a public port that another service has, or another program holds (EADDRINUSE)."""
        if port is None:
            return
        for other in self.services.values():
            if other.name != name and other.manifest.port == port:
                held = " (stopped: delete it to free the port)" if other.rec.stopped else ""
                raise CommandError(Kind.ADDRESS_IN_USE, f"port {port} is already the port of service {other.name!r}{held}")
        svc = self.services.get(name)
        if svc is not None and svc.manifest.port == port:
            return  # the router already listens there for this service
        problem = self.router.port_problem(port)
        if problem is not None:
            code, why = problem
            raise CommandError(code, f"port {port}: {why} (another program has it)")

    def _begin(self, svc: Service, m: Manifest, text: str, what: str, who: str) -> None:
        rec = svc.rec
        frm = rec.version
        with self.store.transaction():
            self.store.put_version(rec.name, m.version, text)
            if m.version == rec.good_version and frm != rec.good_version:
                # Back to the good version: its running instances are the target, not old ones to replace.
                rec.generation = rec.good_generation
            rec.version, rec.manifest, rec.replicas, rec.stopped = m.version, text, m.replicas, False
            rec.update_status, rec.steps, rec.failure, rec.rollout_from = "rolling", 0, "", frm
            # A canary phase only when there is an old set to compare with; never when going back to the good version.
            rec.canary_phase = m.update == "canary" and bool(svc.instances) and m.version != rec.good_version
            if rec.canary_phase:
                rec.update_status = "canary"
            rec.rolled_back = ""
            rec.kept_logs = {}
            rec.rollout_started = time.time()
            svc.stats.rollouts_started += 1
            svc.set_previous()  # only a version that completed can be the rollback target
            old, svc.manifest = svc.manifest, m
            svc.state = rollout.State(rec.update_status, 0, float("-inf"))
            svc.save()
            canary = f" canary={svc.canaries()}" if rec.canary_phase else ""
            if rec.canary_phase and m.canary_weight is not None:
                canary += f" canary_weight={m.canary_weight}%"
            svc.event(f"{what} started {frm}→{m.version} strategy={m.update}{canary} batch={m.update_batch} "
                      f"pause={format_seconds(m.update_pause)}s by {who}" + _protocol_change(old, m))
        if self.router.failure(svc.name) or (old.port, old.traffic_protocol) != (m.port, m.traffic_protocol):
            # The router refused the port before (let it try again), or the port is another now: a
            # rollback to the version with a port the failed release dropped must listen on it again
            # even though no instance changes.
            svc.routing_changed()
        svc.poke()

    def auto_rollback(self, svc: Service) -> None:
        """auto_rollback yes: the good version serves again after a failure; make it the target."""
        rec = svc.rec
        why, to = rec.failure, rec.good_version
        text = set_replicas_line(rec.good_manifest.encode(), rec.replicas).decode()
        kept = dict(rec.kept_logs)
        with self.store.transaction():
            self._begin(svc, parse(text, name=svc.name).manifest, text, "automatic rollback", "deployfs (auto_rollback)")
            rec.rolled_back = why
            rec.kept_logs = kept  # logs/failed-N are what shows why: kept until a rollout a person starts
            svc.save()
        svc.event(f"auto_rollback: rolling back to {to} (decided by deployfs) after: {why}")

    def _set_status(self, svc: Service, status: str, event: str) -> None:
        svc.state = rollout.State(status, 0, svc.state.boundary, svc.state.restoring)
        svc.rec.update_status, svc.rec.steps = status, 0
        svc.save()
        svc.event(event)


def _to_wall(t: float) -> float:
    """A trio-clock time as wall-clock seconds: what the records keep."""
    return time.time() - (trio.current_time() - t)


def _from_wall(w: float) -> float:
    return trio.current_time() - (time.time() - w)


def _boundary_to(boundary: float | None) -> float | None:
    """rollout.State.boundary for the record: None mid-batch, 0 for "long ago" (-inf)."""
    if boundary is None:
        return None
    return 0.0 if boundary == float("-inf") else _to_wall(boundary)


def _boundary_from(batch_ended: float | None) -> float | None:
    if batch_ended is None:
        return None
    return float("-inf") if batch_ended == 0.0 else _from_wall(batch_ended)


MAX_WARNINGS = 10  # events per apply; a manifest of 1,500 unknown lines is one mistake, not 1,500


def _protocol_change(old: Manifest, new: Manifest) -> str:
    """The event's note when how the router forwards changes: its default follows the health check."""
    a, b = old.traffic_protocol, new.traffic_protocol
    note = "" if a == b else f" (protocol {a} -> {b})"
    if old.canary_weight != new.canary_weight:
        def pct(w: int | None) -> str:
            return "their share" if w is None else f"{w}%"
        note += f" (canary_weight {pct(old.canary_weight)} -> {pct(new.canary_weight)})"
    return note


def _warn(svc: Service, warnings: Sequence[str]) -> None:
    for w in warnings[:MAX_WARNINGS]:
        svc.event(f"warning: {w}")
    if len(warnings) > MAX_WARNINGS:
        svc.event(f"warning: {len(warnings) - MAX_WARNINGS} more like these")


def _count(arg: str | None) -> int:
    if arg is None or not re.fullmatch(r"[0-9]{1,6}", arg) or int(arg) > MAX_REPLICAS:
        raise CommandError(Kind.INVALID, f"scale: expected a whole number 0 to {MAX_REPLICAS}, got {arg!r}")
    return int(arg)
