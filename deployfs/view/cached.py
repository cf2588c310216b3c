"""The view's :class:`~deployfs.view.source.Source` over the records, as a cache of the store shows them.

Services, instances and manifests are read from a :class:`~deployfs.state.cache.Cache` fed by the
store's watch, never from whoever supervises the instances: a record written into the store by
anyone (the engine, a node agent, another machine) is what a shell sees.  What is derived from the
records (progress, health, endpoints, the processes running, what `wait` answers) is worked out by
the pure rules of ``model/status.py``, the same the engine follows.

Read-your-writes: the cache applies the watch a scheduling step after the store commits, and a
remote store later still.  ``revision`` tells the store revision of the last write this process
made (a command's, a manifest's: on SQLite the store's own), and a front end awaits
:meth:`CachedSource.settled` (the cache at that revision) before it answers the request that
wrote: `echo apply > ctl; cat status` shows the command's effect, on SQLite as on etcd.

Not everything is a record, and those keep narrow calls of their own (docs/architecture.md): commands go to
the controller (``Commands``: the engine's ``command`` and ``refused``); events are read from the
event log's segments in memory (each event is committed before it is shown there); an instance's
output from its log files; its CPU and memory from ``/proc``; the metrics from the engine's
counters.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from functools import partial
from typing import Awaitable, Callable, Iterator, Protocol, TypeVar

import trio

from ..model import status as derive
from ..model.cluster import ClusterStatus, cluster_status
from ..model.errors import Error, Kind
from ..model.manifest import Manifest, ManifestError, parse
from ..model.status import Derived, InstanceStatus, ServiceStatus
from ..state.cache import Cache
from ..state.events import EventLog
from ..state import logfiles
from ..state.kv import Change, KeyValue, StoreFull
from ..state.logclient import Owner, RemoteLogs, Unreachable
from ..state.logfiles import LogInfo
from ..state.members import member_of, standing_of
from ..state.records import (ALIVE, INSTANCES, MANIFESTS, NODES, SERVICES, InstanceRecord, ManifestFile, NodeRecord,
                             ServiceRecord, decode, decode_file, decode_node, instance_key, instances_prefix, manifest_key,
                             node_key, service_key)
from ..state.store import Store

T = TypeVar("T")


class Commands(Protocol):
    """The one narrow interface commands go through: the controller (control/engine.Engine) on one
    machine; in a cluster, the records that reach it (control/mailbox.Outbox), awaited."""

    def command(self, service: str, verb: str, arg: str | None, who: str) -> str | Awaitable[str]:
        """Carry out a ctl verb; the reply, or CommandError."""
        ...

    def refused(self, service: str | None, who: str, reason: str) -> None: ...


class ClusterFacts(Protocol):
    """What a cluster node knows beside the records (serve/cluster.py)."""

    def alive(self, node: str) -> bool: ...
    def leader(self) -> str: ...
    def unreachable(self) -> bool: ...
    async def settled(self) -> None: ...


@contextlib.contextmanager
def _room() -> Iterator[None]:
    try:
        yield
    except StoreFull as e:  # refused whole: nothing changed
        raise Error(Kind.NO_SPACE, str(e)) from None


class CachedSource:
    def __init__(self, cache: Cache, store: Store, events: EventLog, commands: Commands, *,
                 revision: Callable[[], int], logs: Callable[[str, int], list[str]],
                 metrics: Callable[[], bytes] = lambda: b"",
                 cost: Callable[[int], tuple[float, int] | None] = lambda pid: None, node: str = "",
                 cluster: "ClusterFacts | None" = None, remote_logs: RemoteLogs | None = None) -> None:
        """``revision``: the store's revision after this process's last write (what `settled` waits
        for); ``logs``: the files of this node's instances' output; ``remote_logs``: how another
        node's are read (None: never; one machine has no other node);
        ``cost``: an instance's (CPU seconds, resident bytes) by its pid, None if not running;
        ``node``: this server's node, on one machine the one live node, leading every service
        (a cluster's liveness and leaders will be records too: alive/<name>, an election)."""
        self.cache, self.store, self.events, self.commands = cache, store, events, commands
        self._node = node
        self._facts = cluster
        self._revision, self._logs, self._metrics, self._cost = revision, logs, metrics, cost
        self._remote_logs = remote_logs
        self._decoded: dict[str, tuple[KeyValue, object]] = {}  # key -> (the value decoded, its record)
        self._parsed: dict[str, Manifest | None] = {}  # manifest text -> parsed (the last few)
        self._mtimes: dict[str, float] = {}  # service -> wall clock of the last change to its records
        self._started = time.time()
        self._changed: dict[str, trio.Event] = {}
        self._appended: dict[str, trio.Event] = {}
        self._on_change: list[Callable[[str], None]] = []
        cache.subscribe(self._heard)
        events.listeners.append(self._on_event)

    # -- keeping up ---------------------------------------------------------------------------

    def _heard(self, changes: list[Change]) -> None:
        touched: set[str] = set()
        for c in changes:
            key = c.kv.key
            if key.startswith(SERVICES):
                touched.add(key[len(SERVICES):])
            elif key.startswith(INSTANCES):
                touched.add(key[len(INSTANCES):].split("/", 1)[0])
            if c.kind == "delete":
                self._decoded.pop(key, None)
        now = time.time()
        for name in sorted(touched):
            self._mtimes[name] = now
            woken = self._changed.pop(name, None)
            if woken is not None:
                woken.set()
            for listener in list(self._on_change):
                listener(name)

    def _on_event(self, service: str) -> None:
        woken = self._appended.pop(service, None)
        if woken is not None:
            woken.set()

    async def settled(self) -> None:
        """Until the records read here show every write this process made."""
        if self._facts is not None:
            await self._facts.settled()  # committed (or refused: EIO) before it can be read
        await self.cache.wait_for(self._revision())

    def _record(self, cls: type[T], kv: KeyValue, decoder: Callable[[bytes], T] | None = None) -> T:
        """``kv`` decoded once per value it takes (a cat of status decodes nothing already seen)."""
        seen = self._decoded.get(kv.key)
        if seen is not None and seen[0] is kv:
            return seen[1]  # type: ignore[return-value]
        rec = decode(cls, kv.value) if decoder is None else decoder(kv.value)
        self._decoded[kv.key] = (kv, rec)
        return rec

    def _manifest(self, text: str, name: str) -> Manifest | None:
        if text not in self._parsed:
            if len(self._parsed) > 64:
                self._parsed.clear()
            try:
                self._parsed[text] = parse(text, name=name).manifest
            except ManifestError:
                self._parsed[text] = None  # a record the engine would not have written: shown as it is
        return self._parsed[text]

    # -- services ---------------------------------------------------------------------------

    def service_names(self) -> list[str]:
        return [kv.key[len(SERVICES):] for kv in self.cache.range(SERVICES)]

    def has_service(self, name: str) -> bool:
        return self.cache.get(service_key(name)) is not None

    def service(self, name: str) -> ServiceStatus | None:
        kv = self.cache.get(service_key(name))
        if kv is None:
            return None
        rec = self._record(ServiceRecord, kv)
        m = self._manifest(rec.manifest, name)

        def derived() -> Derived:  # only for a request that shows it: `cat version` reads no instance
            recs = (self._record(InstanceRecord, i) for i in self.cache.range(instances_prefix(name)))
            # A lost one (its node went down, a replacement took its place) is no longer the service's.
            insts = sorted((i for i in recs if not i.lost), key=lambda i: i.slot)
            members = [member_of(i) for i in insts]
            standing = standing_of(rec, m)
            return Derived(progress=derive.progress(standing, members),
                           health=derive.health(rec.stopped, rec.replicas, members),
                           endpoints=tuple(derive.endpoints(members)),
                           running=sum(1 for i in insts if _alive(i)),
                           instances=tuple(self._instance(i) for i in insts),
                           outcome=derive.outcome(standing, members))

        return ServiceStatus(
            name=name, version=rec.version or "", previous_version=rec.previous_version or "",
            update_status=rec.update_status, replicas=rec.replicas, manifest=rec.manifest,
            previous_manifest=rec.previous_manifest, failure=rec.failure,
            mtime=self._mtimes.get(name, self._started), kept_logs=dict(rec.kept_logs),
            protocol=m.traffic_protocol if m is not None else "tcp", derive=derived)

    def _instance(self, i: InstanceRecord) -> InstanceStatus:
        pid = i.pid if _alive(i) else None  # a dead process's pid may be another's by now
        # (a record from before nodes were recorded names none: it is this machine's, as the engine shows it)

        def cost() -> tuple[float, int] | None:
            return None if pid is None else self._cost(pid)
        return InstanceStatus(id=i.id, slot=i.slot, version=i.version, state=i.state, health=i.health, pid=pid,
                              port=i.port, restarts=i.restarts, started=i.started, node=i.node or self._node, cost=cost,
                              oom_kills=i.oom_kills, address=i.address)

    async def changed(self, name: str) -> None:
        if self.has_service(name):
            await self._changed.setdefault(name, trio.Event()).wait()

    def subscribe(self, on_change: Callable[[str], None], on_event: Callable[[str], None]) -> None:
        self._on_change.append(on_change)
        self.events.listeners.append(on_event)

    # -- nodes ------------------------------------------------------------------------------------

    def cluster(self) -> ClusterStatus:
        here = self._node  # (an instance record from before nodes were recorded names none: this machine's)
        counts = Counter(self._record(InstanceRecord, kv).node or here for kv in self.cache.range(INSTANCES))
        nodes = [self._record(NodeRecord, kv, partial(decode_node, kv.key)) for kv in self.cache.range(NODES)]
        if self._facts is not None:
            f = self._facts
            return cluster_status(nodes, counts, self.service_names(), alive=f.alive, leader=f.leader(),
                                  now=time.time(), store="unreachable" if f.unreachable() else "ok")
        return cluster_status(nodes, counts, self.service_names(), alive=lambda name: name == here, leader=here,
                              now=time.time())

    # -- manifests: read from the records, written through the store -------------------------------

    def manifest_names(self) -> list[str]:
        return [kv.key[len(MANIFESTS):] for kv in self.cache.range(MANIFESTS)]

    def manifest_file(self, name: str) -> ManifestFile | None:
        kv = self.cache.get(manifest_key(name))
        return None if kv is None else self._record(ManifestFile, kv, partial(decode_file, name))

    def put_manifest(self, name: str, data: bytes) -> None:
        with _room():
            self.store.put_file(name, data)

    def edit_manifest(self, name: str, edit: Callable[[bytes], bytes]) -> None:
        """Rewrite a manifest from its bytes as the store has them now (a truncate by name): it builds on
        the last commit whether or not the cache shows it yet."""
        f = self.store.get_file(name)
        self.put_manifest(name, edit(b"" if f is None else f.data))

    def replace_manifest(self, name: str, data: bytes) -> bool:
        if self.store.get_file(name) is None:
            return False
        self.put_manifest(name, data)
        return True

    def check_room(self) -> None:
        if self._facts is not None and self._facts.unreachable():
            raise Error(Kind.UNAVAILABLE, "cluster store unreachable; nothing was changed")
        if self.store.full is not None and not self.store.flush():
            raise Error(Kind.NO_SPACE, f"{self.store.full}: nothing was changed; free some space and try again")

    def delete_manifest(self, name: str) -> None:
        with _room():
            self.store.delete_file(name)

    def rename_manifest(self, old: str, new: str) -> None:
        f = self.store.get_file(old)
        if f is None:
            raise Error(Kind.NOT_FOUND, f"no manifests/{old}")
        with _room(), self.store.transaction():
            self.store.put_file(new, f.data)
            self.store.delete_file(old)

    # -- events, logs, metrics: narrow calls of their own --------------------------------------------

    def events_segment(self, service: str) -> int:
        return self.events.segment(service)

    def events_bytes(self, service: str, segment: int | None) -> bytes | bytearray:
        return self.events.raw(service, segment)

    def events_mtime(self, service: str, segment: int | None) -> float:
        ev = self.events
        if segment is None:
            return ev.mtime(service)
        return ev.segment_mtime(service, ev.segment(service) - 1 if segment == -1 else segment)

    async def events_appended(self, service: str) -> None:
        await self._appended.setdefault(service, trio.Event()).wait()

    # -- logs: this node's from its files, another node's asked of it (state/logclient.py) ---------

    def _log_owners(self, service: str, instance_id: int) -> list[Owner] | None:
        """None: the log is this node's.  Else the nodes that may keep it: the one its instance record
        names, or for an instance whose record is gone (logs/failed-N) every other node."""
        if self._remote_logs is None:
            return None
        kv = self.cache.get(instance_key(service, instance_id))
        if kv is not None:
            node = self._record(InstanceRecord, kv).node
            return None if node in ("", self._node) else [self._owner(node)]
        if logfiles.info(self._logs(service, instance_id)) is not None:
            return None
        return [self._owner(kv.key[len(NODES):]) for kv in self.cache.range(NODES)
                if kv.key[len(NODES):] != self._node]

    def _owner(self, node: str) -> Owner:
        kv = self.cache.get(node_key(node))
        if kv is None:
            return Owner(node, "", 0)
        rec = self._record(NodeRecord, kv, partial(decode_node, kv.key))
        return Owner(node, rec.address, rec.log_port)

    def _log_where(self, service: str, instance_id: int) -> Owner | None:
        owners = self._log_owners(service, instance_id)
        if owners is None or len(owners) == 1:
            return None if owners is None else owners[0]
        assert self._remote_logs is not None
        return next((o for o in owners if instance_id in self._remote_logs.known(o, service)), None)

    def log_info(self, service: str, instance_id: int) -> LogInfo | None:
        owner = self._log_where(service, instance_id)
        if owner is None:
            return logfiles.info(self._logs(service, instance_id))
        assert self._remote_logs is not None
        try:
            return self._remote_logs.info(owner, service, instance_id)
        except Unreachable as e:
            raise Error(Kind.UNAVAILABLE, e.message) from None

    async def log_fresh(self, service: str, instance_id: int) -> None:
        owners = self._log_owners(service, instance_id)
        if owners is not None:
            assert self._remote_logs is not None
            for owner in owners:
                await self._remote_logs.fresh(owner, service)

    async def log_read(self, service: str, instance_id: int, off: int, size: int) -> bytes:
        owner = self._log_where(service, instance_id)
        if owner is None:
            return logfiles.read(self._logs(service, instance_id), off, size)
        assert self._remote_logs is not None
        try:
            return await self._remote_logs.read(owner, service, instance_id, off, size)
        except Unreachable as e:
            raise Error(Kind.UNAVAILABLE, e.message) from None

    def metrics_text(self) -> bytes:
        return self._metrics()

    # -- commands ---------------------------------------------------------------------------------

    async def command(self, service: str, verb: str, arg: str | None, who: str) -> str:
        reply = self.commands.command(service, verb, arg, who)
        return reply if isinstance(reply, str) else await reply

    def refused(self, service: str | None, who: str, reason: str) -> None:
        self.commands.refused(service, who, reason)


def _alive(i: InstanceRecord) -> bool:
    return i.pid is not None and i.state in ALIVE
