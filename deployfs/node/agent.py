"""The node agent: runs the instances the store assigns to this node, and records what it sees.

The controller and the agent meet only in the store (docs/architecture.md, "Controller and node agent").  The
controller writes an instance record naming a ``node`` and an intent, ``desired``:

- ``run``: a process of this instance should be running.  Bumping ``restarts`` asks for a
  fresh one (the agent stops the old process first); the agent notes in ``incarnation``
  which ``restarts`` its process was started for, so the intent survives a restart of
  either side.
- ``stop``: no process should run; the agent stops it (``stop_signal``, SIGKILL after
  ``stop_timeout``) and records ``state stopped``.  The controller deletes the record
  afterwards; a record deleted while its process runs is stopped as well.

- ``drain``: the controller is draining it (it owns the router): keep the process, stop
  probing it (after its stop signal a probe can only fail, and that says nothing).

``desired ""`` (a record of a deployfs before the agent) is not the agent's; the engine turns
those into intents when it starts, before its agent adopts anything.

It probes each process it runs (the manifest's ``health``) and writes ``health``, ``phase``
and ``why`` as :mod:`deployfs.model.probing` turns the verdicts into them -- the rule the
engine follows too.  The agent decides nothing: an instance that exits is recorded as ``exited`` (its status
and time in ``why``, ``exit_ok``, ``last_exit``) and stays down until the controller asks
for a restart.  It follows ``instances/`` through a :class:`~deployfs.state.cache.Cache`
(the store's watch) and writes back with conditional writes, retried on conflict, so it
needs nothing of the controller but the records: on SQLite in one process today, on etcd
with the controller elsewhere tomorrow.  Leaving the agent (cancelling :meth:`run`) leaves
the processes running; the next agent on the same store adopts them by pid and
``/proc`` start time.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import trio

from ..model import probing
from ..model.histogram import Histogram
from ..model.manifest import Manifest, ManifestError, format_size, parse
from ..model.rollout import Phase
from ..state.cache import Cache
from ..state.events import EventLog
from ..state.kv import Change, Compare, Conflict, KVStore, LeaseNotFound, Put, Read, StoreError
from ..state.records import DRAIN, INSTANCES, RUN, STOP, InstanceRecord, decode, encode, instance_key, version_key
from .cgroups import Limits
from .health import Prober, Probes
from .identity import UserPolicy
from .runtime import MARKER, LaunchSpec, Process, Runtime, StartError, find_strays
from .ticker import Ticker

log = logging.getLogger(__name__)

UNREACHABLE_RETRY = 1.0  # seconds between tries while the store (a cluster's etcd) cannot be reached
LOG_CHECK = 0.25  # seconds between looks at a quiet instance's log size
GONE = "gone while deployfs was down"  # (one process runs controller and agent: deployfs, to its users)


def launch_spec(m: Manifest, rec: InstanceRecord, users: UserPolicy | None) -> LaunchSpec:
    """How an instance of ``m`` is started."""
    argv = m.instance_argv(port=rec.port, instance=rec.slot, version=rec.version, address=rec.address)
    env = m.instance_env(port=rec.port, instance=rec.slot, version=rec.version, address=rec.address)
    return LaunchSpec(rec.service, rec.id, argv, env, m.dir, m.log_lines,
                      user=users.run_as(m) if users else m.user, group=m.group,
                      limits=Limits(m.memory, m.cpus, m.pids), nofile=m.nofile)


@dataclass(eq=False)
class _Held:
    """One instance of this node, as the agent holds it (and, for probing.observe, its probe state)."""
    wake: trio.Event = field(default_factory=trio.Event)
    proc: Process | None = None
    manifest: Manifest | None = None
    slot: int = 0  # as its record says: what events call it
    incarnation: int = -1  # the record's ``restarts`` the process was started for
    probes_scope: trio.CancelScope | None = None  # the probe loop of the process held
    health: str = "starting"
    phase: Phase = Phase.STARTING
    why: str = ""
    started_at: float = 0.0  # trio clock
    healthy_since: float | None = None
    first_bad: float | None = None
    fails: int = 0
    probes: int = 0
    port: int | None = None  # the port this agent gave it (released when its record goes)


# Probes: a good check answers in milliseconds; health_timeout defaults to 5 s.  Few buckets:
# each is a line per service in every scrape (bench/supervise.py: 200 services).
PROBE_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


@dataclass
class ProbeStats:
    """The probes of one service on this node, for the metrics (since this agent started)."""
    failures: int = 0
    seconds: Histogram = field(default_factory=lambda: Histogram(PROBE_BUCKETS))


class NodeAgent:
    def __init__(self, store: KVStore, runtime: Runtime, node: str, *, prober: Prober | None = None,
                 users: UserPolicy | None = None, events: EventLog | None = None, ticker: Ticker | None = None,
                 state_dir: str | None = None, log_check_every: float = 0.05,
                 cache: Cache | None = None) -> None:
        """``cache``: of ``instances/`` on ``store`` (default: one of its own; SQLite in one process
        passes :meth:`~deployfs.state.store.SqliteStore.cache`, which also shows writes kept in memory)."""
        self.store, self.runtime, self.node, self.users = store, runtime, node, users
        self.events = events  # what it observes is said there (None: logged only)
        self.ticker = ticker  # shared probe sleeps (None: each its own timer)
        self.state_dir = state_dir  # where stray marked processes are looked for at adoption
        self.log_check_every = log_check_every
        self.probe_stats: dict[str, ProbeStats] = {}  # per service: what the metrics show of probes
        self._own_prober: Probes | None = None  # made here, so closed with the agent
        if prober is None:
            prober = self._own_prober = Probes()
        self.prober = prober
        self.cache = cache if cache is not None else Cache(store, INSTANCES)
        self._held: dict[str, _Held] = {}  # instance key -> what runs for it here
        self.leaving = False  # this node leaves the cluster: nothing starts here any more
        self._nursery: trio.Nursery | None = None

    def pid(self, service: str, id: int) -> int | None:
        """The pid of the process the agent holds for an instance (tests, diagnostics)."""
        held = self._held.get(instance_key(service, id))
        return held.proc.pid if held is not None and held.proc is not None else None

    def probes_of(self, service: str) -> tuple[int, Histogram]:
        """A service's probe failures and durations here (the metrics read them)."""
        stats = self.probe_stats.get(service) or ProbeStats()
        return stats.failures, stats.seconds

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Adopt what runs already, then act on every change of this node's records until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.cache.run)
                if self.ticker is None:
                    self.ticker = Ticker()
                    nursery.start_soon(self.ticker.run)
                await self._adopt()
                self.cache.subscribe(self._changed)
                for kv in self.cache.range(INSTANCES):
                    self._kick(kv.key)
                nursery.start_soon(self._bound_logs)
                task_status.started()
        finally:
            if self._own_prober is not None:
                with trio.CancelScope(shield=True):
                    await self._own_prober.aclose()

    async def stop_all(self) -> None:
        """Stop every process held here, recording it: a node leaving a cluster (its instances'
        records stay for the controller, which replaces them on other nodes)."""
        self.leaving = True
        async with trio.open_nursery() as nursery:
            for key, held in list(self._held.items()):
                if held.proc is not None:
                    nursery.start_soon(self._stop, key, held, self._mine(key))

    def _say(self, service: str, slot: int, text: str) -> None:
        if self.events is not None:
            self.events.emit(service, f"instance {slot} {text}")
        else:
            log.info("%s instance %d %s", service, slot, text)

    # -- following the records --------------------------------------------------------------

    def _mine(self, key: str) -> InstanceRecord | None:
        kv = self.cache.get(key)
        if kv is None:
            return None
        try:
            rec = decode(InstanceRecord, kv.value)
        except (ValueError, TypeError) as e:  # a record this agent cannot read is nobody's to run here
            log.warning("instance record %s unreadable: %s", key, e)
            return None
        return rec if rec.node == self.node and rec.desired in (RUN, DRAIN, STOP) else None

    def _changed(self, changes: list[Change]) -> None:
        for c in changes:
            self._kick(c.kv.key)

    def _kick(self, key: str) -> None:
        held = self._held.get(key)
        if held is not None:
            held.wake.set()
        elif (rec := self._mine(key)) is not None:
            held = self._held[key] = _Held(slot=rec.slot, incarnation=rec.incarnation, port=rec.port)
            if rec.port is not None:
                self.runtime.claim_port(rec.port)
            assert self._nursery is not None
            self._nursery.start_soon(self._work, key, held)

    async def _adopt(self) -> None:
        """Take over the processes a previous agent (or deployfs) left running for this node;
        record what died meanwhile; stop what no record accounts for."""
        unrecorded: set[tuple[str, int]] = set()
        known: set[tuple[str, int]] = set()  # instances whose marked processes are theirs
        gone: list[tuple[str, int]] = []
        mine: list[tuple[str, InstanceRecord]] = []
        others: set[tuple[str, int]] = set()  # records of other nodes: never this agent's to sweep
        for kv in self.cache.range(INSTANCES):
            rec = self._mine(kv.key)
            if rec is None:
                others.add(_split(kv.key))
                continue
            mine.append((kv.key, rec))
            held = self._held[kv.key] = _Held(slot=rec.slot, incarnation=rec.incarnation, port=rec.port)
            if rec.port is not None:
                self.runtime.claim_port(rec.port)  # given by the agent before: still this instance's
            ident = (rec.service, rec.id)
            if rec.pid and rec.start_time and rec.state not in ("exited", "stopped", "failed"):
                held.proc = self.runtime.adopt(rec.pid, rec.start_time, rec.service, rec.id)
                if held.proc is None:
                    # A recorded pid that is gone, yet a live process marked with this id: a restart
                    # whose record was lost (a crash on a full state disk). A stray: swept below.
                    gone.append(ident)
                    await self._observe_gone(kv.key, rec)
                else:
                    known.add(ident)
            elif rec.pid is None and rec.state == "starting":
                held.incarnation = -1  # unless the marker finds it below: it never ran, so it starts
                unrecorded.add(ident)
                known.add(ident)
            elif rec.pid is None:
                known.add(ident)
            else:
                gone.append(ident)  # it ended before: whatever it left running goes
        # Started, but the agent died before it wrote the pid: the marker finds it.
        found = self.runtime.find_unrecorded(unrecorded) if unrecorded else {}
        for (service, id), proc in found.items():
            key = instance_key(service, id)
            held = self._held[key]
            held.proc = proc
            rec = self._mine(key)
            held.incarnation = rec.restarts if rec else -1
            await self._record(key, self._running(proc, held.incarnation))
        # What a leader that died meanwhile left behind (a grandchild holding its port, say)
        # must go before anything takes its place.
        if gone:
            await self.runtime.sweep(gone)
        await self.runtime.prune({(rec.service, rec.id) for _, rec in mine} | others)
        if self.state_dir:
            for pid in find_strays(self.state_dir, known | others):
                log.warning("stopping stray instance process %d", pid)
                for kill in (os.killpg, os.kill):  # its group, if it leads one, and itself
                    try:
                        kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        assert self._nursery is not None
        for key, held in list(self._held.items()):
            if held.proc is not None:
                rec = self._mine(key)
                self._say(*_split_service(key), held.slot, f"adopted pid={held.proc.pid}")
                held.manifest = await self._manifest_or_none(key)
                self._nursery.start_soon(self._watch_exit, held, held.proc)
                if rec is not None and held.manifest is not None and rec.desired == RUN:
                    self._begin_probes(key, held, rec, held.manifest, adopted=rec.health == "healthy")
            self._nursery.start_soon(self._work, key, held)

    # -- acting -------------------------------------------------------------------------------

    async def _work(self, key: str, held: _Held) -> None:
        """One instance, one task: its actions never overlap."""
        try:
            while True:
                held.wake = trio.Event()
                try:
                    if not await self._step(key, held):
                        return
                except Exception:  # one instance's surprise must not take the node's others down
                    log.exception("node agent: instance %s", key)
                await held.wake.wait()
        finally:
            if self._held.get(key) is held:
                del self._held[key]

    async def _step(self, key: str, held: _Held) -> bool:
        """Bring what runs for ``key`` to what its record asks; False once the record is gone."""
        while True:
            rec = self._mine(key)
            if rec is not None:
                held.slot = rec.slot
            if rec is None or rec.desired == STOP:
                await self._stop(key, held, rec)
                if rec is None:
                    self.runtime.remove_log(*_split(key))
                    if held.port is not None:
                        self.runtime.release_port(held.port)
                        held.port = None
                return rec is not None
            if rec.desired == DRAIN and held.probes_scope is not None:
                self._end_probes(held)  # leaving: its stop signal is coming, a probe decides nothing
                await self._record(key, lambda r: r.state == "running" and _set(r, state="draining"))
            if held.proc is not None and held.incarnation != rec.restarts:
                await self._stop(key, held, None)  # a restart: the new process is recorded next
                continue
            if held.proc is None and held.incarnation != rec.restarts and rec.desired == RUN and not self.leaving:
                await self._start(key, held, rec)
            elif held.proc is not None and held.proc.exited:
                await self._exited(key, held, rec)
            return True

    async def _start(self, key: str, held: _Held, rec: InstanceRecord) -> None:
        held.incarnation = rec.restarts
        try:
            m = await self._manifest(rec)
            if m.port and rec.port is None:
                # Where it listens is this node's to say (docs/architecture.md "Ports"): given at its
                # first start, recorded with its pid, kept across restarts, freed with its record.
                rec.port = held.port = self.runtime.allocate_port()
            proc = self.runtime.start(launch_spec(m, rec, self.users))
        except (StartError, ManifestError, KeyError) as e:
            why = str(e) if not isinstance(e, KeyError) else f"no manifest for version {rec.version}"
            await self._record(key, lambda r: _set(r, pid=None, start_time=None, state="exited", health="stopped",
                                                   phase="exited", why=why, exit_ok=False, last_exit=time.time(),
                                                   incarnation=held.incarnation, port=rec.port))
            self._say(rec.service, rec.slot, f"failed to start: {why}")  # (after the record it tells of)
            return
        held.proc, held.manifest = proc, m
        await self._record(key, self._running(proc, held.incarnation, rec.port))
        port = f" port={rec.port}" if rec.port else ""
        self._say(rec.service, rec.slot, f"started version={rec.version} pid={proc.pid}{port}")
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_exit, held, proc)
        self._begin_probes(key, held, rec, m, adopted=False)

    # -- probing ----------------------------------------------------------------------------------

    def _begin_probes(self, key: str, held: _Held, rec: InstanceRecord, m: Manifest, *, adopted: bool) -> None:
        now = trio.current_time()
        held.health, held.phase, held.why, held.started_at = "starting", Phase.STARTING, "", now
        held.healthy_since, held.first_bad, held.fails, held.probes = None, None, 0, 0
        if adopted:  # it was ready before this agent: it stays ready unless a probe says otherwise
            held.health, held.phase, held.healthy_since = "healthy", Phase.READY, now - m.min_healthy
        held.probes_scope = scope = trio.CancelScope()
        assert self._nursery is not None
        self._nursery.start_soon(self._probe_loop, key, held, rec, m, scope)

    def _end_probes(self, held: _Held) -> None:
        if held.probes_scope is not None:
            held.probes_scope.cancel()
            held.probes_scope = None

    async def _probe_loop(self, key: str, held: _Held, rec: InstanceRecord, m: Manifest,
                          scope: trio.CancelScope) -> None:
        with scope:
            check = m.instance_health(port=rec.port, instance=rec.slot, version=rec.version, address=rec.address)
            # An exec probe carries the instance's marker: what it leaves behind goes with the instance.
            env = {MARKER: self.runtime.marker(rec.service, rec.id)}
            if check is None:  # no check: alive for one health_interval is healthy, then the soak
                if held.health == "starting":
                    await trio.sleep_until(held.started_at + m.health_interval)
                    await self._verdict(key, held, m, True, "alive for one health_interval")
                    await trio.sleep(m.min_healthy)
                    await self._verdict(key, held, m, True, "")
                return
            assert self.ticker is not None
            while True:
                now = trio.current_time()
                verdict = await self.prober.probe(check, m.health_timeout, env=env)
                stats = self.probe_stats.setdefault(rec.service, ProbeStats())
                stats.seconds.observe(trio.current_time() - now)
                stats.failures += not verdict.ok
                await self._verdict(key, held, m, verdict.ok, verdict.detail)
                wake, period = probing.next_probe(held, m, now)
                # Shared ticks of at most 1/20 of the period: cheap for a thousand instances.
                await self.ticker.sleep_until(wake, quantum=period / 20)

    async def _verdict(self, key: str, held: _Held, m: Manifest, ok: bool, detail: str) -> None:
        held.health, said = probing.observe(held, held.health, m, ok, detail, trio.current_time())
        service = _split_service(key)[0]
        for text in said:
            self._say(service, held.slot, text)
        health, phase, why = held.health, held.phase.value, held.why
        # When the failing streak began, as wall clock: the controller's "detected Ns after the first failure".
        first_bad = None if held.first_bad is None else time.time() - (trio.current_time() - held.first_bad)
        await self._record(key, lambda r: r.state == "running" and r.desired == RUN and _set(
            r, health=health, phase=phase, why=why, first_bad=first_bad if phase == "unhealthy" else None))

    async def _watch_exit(self, held: _Held, proc: Process) -> None:
        await proc.wait()
        held.wake.set()

    async def _exited(self, key: str, held: _Held, rec: InstanceRecord) -> None:
        proc = held.proc
        assert proc is not None
        self._end_probes(held)
        status = proc.exit_status
        why = "exited" if status is None else f"exited with status {status}"
        if proc.killed_by is not None:  # `kill -9` by hand: say so, not "status 137"
            why = f"killed by signal {proc.killed_by} ({_signame(proc.killed_by)})"
        oom = 1 if proc.oom_kills else 0
        m = held.manifest
        if oom:
            limit = f" (limit {format_size(m.memory)})" if m is not None and m.memory else ""
            why = f"killed: out of memory{limit}" if status in (None, 128 + signal.SIGKILL) else \
                f"{why} after a process of it was killed: out of memory{limit}"
        await self._record(key, lambda r: r.state in ("running", "draining") and _set(
            r, state="exited", health="stopped", phase="exited", why=why, exit_ok=status == 0,
            last_exit=time.time(), oom_kills=r.oom_kills + oom))
        if rec.desired == RUN:  # (one leaving ended on its own: nobody waits for the news)
            self._say(rec.service, rec.slot, why)
        # The instance is over: whatever its leader left running goes with it.
        await proc.stop(m.stop_signum if m else 15, 0.0)
        held.proc = None  # and nothing runs until the controller bumps ``restarts``

    async def _stop(self, key: str, held: _Held, rec: InstanceRecord | None) -> None:
        """Stop the process held; ``rec``: the record asked for it (say so and record it), else a restart."""
        self._end_probes(held)
        proc, held.proc = held.proc, None
        said = ""
        if proc is not None:
            was_running = not proc.exited
            m = held.manifest or await self._manifest_or_none(key)
            signum, timeout = (m.stop_signum, m.stop_timeout) if m else (15, 10.0)
            killed = await proc.stop(signum, timeout)
            if rec is not None and was_running:
                # A kill cuts whatever the instance still had in flight: say so (once the record says it stopped).
                said = f"stopped (killed: still running {timeout:g}s after SIG{m.stop_signal if m else 'TERM'})" \
                    if killed else "stopped"
        if rec is not None:
            await self._record(key, lambda r: _set(r, pid=None, start_time=None, health="stopped" if r.state != "failed"
                                                   else r.health, state="failed" if r.state == "failed" else "stopped"))
            if said:
                self._say(rec.service, rec.slot, said)

    async def _observe_gone(self, key: str, rec: InstanceRecord) -> None:
        why, oom = GONE, 0
        if self.runtime.oom_kills(rec.service, rec.id):  # read before the sweep removes its cgroup
            m = await self._manifest_or_none(key)
            memory = m.memory if m is not None else None
            why, oom = f"killed: out of memory{f' (limit {format_size(memory)})' if memory else ''} while deployfs was down", 1
        await self._record(key, lambda r: _set(r, pid=None, start_time=None, state="exited", health="stopped",
                                               phase="exited", why=why, exit_ok=False, last_exit=time.time(),
                                               oom_kills=r.oom_kills + oom))

    def _running(self, proc: Process, incarnation: int, port: int | None = None) -> Callable[[InstanceRecord], bool]:
        now = time.time()
        return lambda r: _set(r, pid=proc.pid, start_time=proc.start_time, state="running", incarnation=incarnation,
                              health="starting", phase="starting", why="", started=now,
                              port=port if port is not None else r.port)

    async def _get(self, key: str) -> Read:
        """Read, waiting out a store that cannot be reached (a cluster's etcd): what runs here
        goes on meanwhile, and what the agent has to say is said once it is back."""
        delay = 0.1
        while True:
            try:
                return await self.store.get(key)
            except (Conflict, LeaseNotFound):
                raise
            except StoreError as e:
                log.warning("node agent: cannot read %s yet: %s", key, e)
                await trio.sleep(delay)
                delay = min(delay * 2, UNREACHABLE_RETRY)

    async def _manifest(self, rec: InstanceRecord) -> Manifest:
        read = await self._get(version_key(rec.service, rec.version))
        if read.kv is None:
            raise KeyError(rec.version)
        return parse(read.kv.value, name=rec.service).manifest

    async def _manifest_or_none(self, key: str) -> Manifest | None:
        rec = self._mine(key)
        try:
            return None if rec is None else await self._manifest(rec)
        except (KeyError, ManifestError):
            return None

    async def _record(self, key: str, change: Callable[[InstanceRecord], bool]) -> None:
        """Write what was observed into the record, on condition it did not change meanwhile (else retry)."""
        while True:
            read = await self._get(key)
            if read.kv is None:
                return  # the controller dropped it: nothing left to tell
            rec = decode(InstanceRecord, read.kv.value)
            if not change(rec):
                return
            try:
                await self.store.txn([Compare(key, read.kv.mod_revision)], [Put(key, encode(rec))])
                return
            except Conflict:
                continue
            except StoreError as e:  # unknown whether it was written: read again and see
                log.warning("node agent: cannot record %s yet: %s", key, e)
                await trio.sleep(UNREACHABLE_RETRY)

    async def _bound_logs(self) -> None:
        """Instances write their own log files: hold each to its bound, all the time.

        Every log is looked at every LOG_CHECK s (a stat); one that was just
        trimmed is flooding, and is looked at every ``log_check_every`` s, so a
        program writing as fast as it can (``yes``) cannot fill the disk.
        """
        due: dict[str, float] = {}
        while True:
            await trio.sleep(self.log_check_every)
            now = trio.current_time()
            live = set()
            for key, held in list(self._held.items()):
                if held.manifest is None:
                    continue
                live.add(key)
                if due.get(key, 0.0) > now:
                    continue
                service, id = _split(key)
                try:
                    flooding = await self.runtime.bound_log(service, id, held.manifest.log_lines)
                except OSError as e:  # a full state disk: try again next round, never die of it
                    log.warning("cannot bound the log of %s instance %d: %s", service, held.slot, e)
                    flooding = False
                due[key] = now + (0.0 if flooding else LOG_CHECK)
            await trio.sleep(0)
            for key in set(due) - live:
                del due[key]


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _set(rec: InstanceRecord, **values: object) -> bool:
    """Set fields; True if any changed (an unchanged record is not written again)."""
    changed = False
    for k, v in values.items():
        if getattr(rec, k) != v:
            setattr(rec, k, v)
            changed = True
    return changed


def _split(key: str) -> tuple[str, int]:
    service, id = key[len(INSTANCES):].rsplit("/", 1)
    return service, int(id)


def _split_service(key: str) -> tuple[str]:
    return (_split(key)[0],)
