"""The /deploy namespace, declared once: which files exist and what each is.

A path resolves to a file (view/files.py: one class per kind of file); the
tables below say which file each name is.  Everything is read through the
:class:`~deployfs.view.source.Source` (snapshots of services, manifests,
events, logs) and every command goes through it: the view never touches the
engine or the store.

To add a file to every service, add one line to :data:`SERVICE_FILES`.
"""

from __future__ import annotations

import time
from typing import Callable

from ..model.errors import Error, Kind
from ..model.cluster import ClusterStatus, NodeStatus
from ..model.status import InstanceStatus, ServiceStatus
from ..state.events import CLUSTER, rfc3339
from .access import Access, Caller
from .files import (FILE_NAME_RE, LOG_BY_ID_RE, RETIRED_EVENTS_RE, CtlFile, Dir, EventsFile, File, LogFile,
                    ManifestEntry, ManifestsDir, Path, StateFile, WaitFile)
from .source import Source

__all__ = ["FILE_NAME_RE", "LOG_BY_ID_RE", "RETIRED_EVENTS_RE", "Namespace", "Path", "events_dir"]

# Each blocked `wait` read holds one of the front end's tasks (pyfuse3 has
# 1,000: cli/serve.py): together they must leave most of them to everyone
# else, and a user who may only read (another uid with --allow-other) must
# not take all of them.  Those who may write answer to the total only.
MAX_WAITERS = 512
MAX_WAITERS_PER_UID = 64


def events_dir(service: str) -> Path:
    """The directory that holds a service's events (the root for the cluster-wide log)."""
    return () if service == CLUSTER else ("active", service)


def _line(fn: Callable[[ServiceStatus], object]) -> Callable[["Namespace", ServiceStatus], File]:
    return lambda ns, s: StateFile(ns, lambda: f"{fn(s)}\n".encode(), lambda: s.mtime)


def _text(fn: Callable[[ServiceStatus], str]) -> Callable[["Namespace", ServiceStatus], File]:
    def render(s: ServiceStatus) -> bytes:
        out = fn(s)
        return (out if not out or out.endswith("\n") else out + "\n").encode()
    return lambda ns, s: StateFile(ns, lambda: render(s), lambda: s.mtime)


def render_instance(i: InstanceStatus) -> str:
    c = i.cost()
    cost = "cpu=- rss=-" if c is None else f"cpu={c[0]:.2f} rss={c[1]}"  # `-` when not running
    return (f"node={i.node} address={i.address} slot={i.slot} version={i.version} state={i.state} health={i.health} "
            f"pid={i.pid or '-'} port={i.port or '-'} restarts={i.restarts} started={rfc3339(i.started)} {cost} id={i.id}"
            + (f" oom_kills={i.oom_kills}" if i.oom_kills else "") + "\n")


def render_node(n: NodeStatus) -> str:
    return (f"address={n.address} state={n.state} instances={n.instances} leads={','.join(n.leads)} "
            f"seen={rfc3339(n.seen)}\n")


def render_cluster(c: ClusterStatus) -> str:
    """One ``key=value`` a line, as docs/cluster.md names them: a script reads the one it wants."""
    return f"store={c.store}\nnodes={len(c.nodes)}\nready={c.ready}\nleader={c.leader}\n"


def render_status(s: ServiceStatus) -> str:
    up, want = s.progress
    rows = [
        ("service", s.name), ("version", s.version), ("previous_version", s.previous_version),
        ("update_status", s.update_status), ("update_progress", f"{up}/{want}"),
        ("replicas", s.replicas), ("running", s.running),
        ("health", s.health), ("endpoints", " ".join(f"{h}:{p}" for h, p in s.endpoints)),
        ("protocol", s.protocol),  # its default hangs on the health check's form: show what is in effect
    ]
    if s.update_status == "failed":
        rows.append(("failure", s.failure))
    return "".join(f"{k} {v}".rstrip() + "\n" for k, v in rows)


SERVICE_FILES: dict[str, Callable[["Namespace", ServiceStatus], File]] = {
    "ctl": lambda ns, s: CtlFile(ns, s.name),
    "manifest": _text(lambda s: s.manifest),
    "previous_manifest": _text(lambda s: s.previous_manifest),
    "version": _line(lambda s: s.version),
    "previous_version": _line(lambda s: s.previous_version),
    "update_status": _line(lambda s: s.update_status),
    "update_progress": _line(lambda s: "%d/%d" % s.progress),
    "replicas": _line(lambda s: s.replicas),
    "health": _line(lambda s: s.health),
    "status": _text(render_status),
    "endpoints": _text(lambda s: "".join(f"{h}:{p}\n" for h, p in s.endpoints)),
    "instances": lambda ns, s: ns.instances_dir(s),
    "logs": lambda ns, s: ns.logs_dir(s),
    "events": lambda ns, s: EventsFile(ns, s.name, None),
    "events.1": lambda ns, s: EventsFile(ns, s.name, -1),
    "wait": lambda ns, s: WaitFile(ns, s.name),
    "leader": lambda ns, s: StateFile(ns, lambda: f"{ns.source.cluster().leaders.get(s.name, '')}\n".encode(), time.time),
}

ROOT_FILES: dict[str, Callable[["Namespace"], File]] = {
    "ctl": lambda ns: CtlFile(ns, None),
    "events": lambda ns: EventsFile(ns, CLUSTER, None),  # cluster-wide: deletions, router trouble
    "events.1": lambda ns: EventsFile(ns, CLUSTER, -1),
    "manifests": lambda ns: ManifestsDir(ns, ns.source.manifest_names, ns.manifest_entry),
    "active": lambda ns: Dir(ns, ns.source.service_names, ns.service_dir),
    "metrics": lambda ns: StateFile(ns, ns.source.metrics_text, time.time),  # Prometheus text (docs/operations.md)
    "cluster": lambda ns: StateFile(ns, lambda: render_cluster(ns.source.cluster()).encode(), time.time),
    "nodes": lambda ns: ns.nodes_dir(),
}


class WaitSlots:
    """`wait` readers, counted from open to release, per uid and overall."""

    def __init__(self, access: Access) -> None:
        self.access = access
        self.total = 0
        self.by_uid: dict[int, int] = {}

    def acquire(self, caller: Caller) -> None:
        mine = self.by_uid.get(caller.uid, 0)
        if self.total >= MAX_WAITERS or (mine >= MAX_WAITERS_PER_UID and not self.access.may_write(caller)):
            raise Error(Kind.BUSY, "too many readers of wait")
        self.total += 1
        self.by_uid[caller.uid] = mine + 1

    def release(self, uid: int) -> None:
        self.total -= 1
        left = self.by_uid.pop(uid, 1) - 1
        if left:
            self.by_uid[uid] = left


class Namespace:
    def __init__(self, source: Source, access: Access | None = None) -> None:
        self.source: Source = source  # annotated: the module-level ROOT_FILES lambdas use it before inference
        self.access = access or Access()
        self.group_write = 0o020 if self.access.group is not None else 0
        self.started = time.time()
        self.waits = WaitSlots(self.access)
        self.root = Dir(self, lambda: [f for f in ROOT_FILES if f != "events.1" or self._rotated(CLUSTER)],
                        self.root_child)

    def _rotated(self, service: str) -> bool:  # `events.1` exists once a rotation happened, as with logrotate
        return self.source.events_segment(service) > 0

    def root_child(self, name: str) -> File | None:
        if name == "events.1" and not self._rotated(CLUSTER):
            return None
        if name in ROOT_FILES:
            return ROOT_FILES[name](self)
        m = RETIRED_EVENTS_RE.fullmatch(name)  # a rotated-away inode (not listed)
        return EventsFile(self, CLUSTER, int(m.group(1))) if m else None

    def resolve(self, path: Path) -> File | None:
        node: File | None = self.root
        for name in path:
            if node is None:
                return None
            node = node.child(name)
        return node

    def manifest_entry(self, name: str) -> File | None:
        return ManifestEntry(self, name) if self.source.manifest_file(name) is not None else None

    def service_dir(self, name: str) -> File | None:
        s = self.source.service(name)
        if s is None:
            return None

        def rotated() -> bool:
            return self._rotated(name)

        def child(f: str) -> File | None:
            if f == "events.1" and not rotated():
                return None
            if f in SERVICE_FILES:
                return SERVICE_FILES[f](self, s)
            m = RETIRED_EVENTS_RE.fullmatch(f)  # a rotated-away inode: reached by inode, never listed
            return EventsFile(self, name, int(m.group(1))) if m else None
        return Dir(self, lambda: [f for f in SERVICE_FILES if f != "events.1" or rotated()], child)

    def logs_dir(self, s: ServiceStatus) -> Dir:
        """One log per slot, and the logs kept for instances gone (``failed-3``, ``stopped-0``)."""
        def log(id: int) -> LogFile:
            return LogFile(self, s.name, id)

        def kept() -> dict[str, int]:
            return {name: id for name, id in s.kept_logs.items() if log(id).exists()}

        def child(name: str) -> File | None:
            inst = s.instance_at(name)
            if inst is not None:
                return log(inst.id)
            m = LOG_BY_ID_RE.fullmatch(name)
            if m:  # an open descriptor outlives its slot, as a deleted file stays readable
                found = log(int(m.group(1)))
                return found if found.exists() else None
            id = kept().get(name)
            return None if id is None else log(id)

        async def refresh() -> None:  # kept logs of instances gone may be on another node: asked there
            for id in sorted(set(s.kept_logs.values())):
                await self.source.log_fresh(s.name, id)
        return Dir(self, lambda: [str(i.slot) for i in s.instances] + sorted(kept()), child, volatile=True,
                   refresh=refresh)

    def nodes_dir(self) -> Dir:
        def child(name: str) -> File | None:
            n = self.source.cluster().node(name)
            if n is None:
                return None
            return StateFile(self, lambda: render_node(self.source.cluster().node(name) or n).encode(), time.time)
        return Dir(self, lambda: [n.name for n in self.source.cluster().nodes], child, volatile=True)

    def instances_dir(self, s: ServiceStatus) -> Dir:
        def child(name: str) -> File | None:
            inst = s.instance_at(name)
            return None if inst is None else StateFile(self, lambda: render_instance(inst).encode(), lambda: s.mtime)
        return Dir(self, lambda: [str(i.slot) for i in s.instances], child, volatile=True)
