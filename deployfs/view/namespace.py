"""The /deploy namespace, declared once: which files exist and what each is.

This module knows the engine and the store but not FUSE.  A path resolves to
a node; the node says what kind of file it is (a rendered state file, the
event log, a ctl file, the blocking wait file, an editable manifest, a
directory) and how to render it.  ``fs.py`` turns nodes into FUSE replies.

To add a file to every service, add one line to :data:`SERVICE_FILES`.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Callable

from ..control.engine import NODE, Engine, Instance, Service
from ..state import statedir
from ..node.usage import Cost
from ..state.events import CLUSTER, EventLog, rfc3339
from .metrics import Metrics, render_cost

Path = tuple[str, ...]
# Names a manifests/ entry may have: editors' temp and swap files included
# (vim's .web.swp, sed's sedXXXXXX); only service names can ever be applied.
FILE_NAME_RE = re.compile(r"[^/\x00-\x1f\x7f]{1,255}")
RETIRED_EVENTS_RE = re.compile(r"events@([0-9]{1,9})")
# logs/@<id>: an instance's log by its id, the name its inode is kept under so
# that a descriptor (and `fstat` from tail -f) stays with the instance when
# slots renumber.  Never listed, never looked up.
LOG_BY_ID_RE = re.compile(r"@([0-9]{1,12})")


@dataclass(frozen=True)
class Dir:
    list: Callable[[], list[str]]
    child: Callable[[str], "Node | None"]
    writable: bool = False  # manifests/: create, unlink, rename
    # Names change behind the kernel's back (slots renumber): never cache them.
    # Elsewhere names only appear (services), or change through the kernel
    # itself (manifests/), so the kernel's own dentry cache stays right.
    volatile: bool = False


@dataclass(frozen=True)
class Text:
    """A small state file: rendered whole at open, served with direct_io."""
    render: Callable[[], bytes]
    mtime: Callable[[], float]


@dataclass(frozen=True)
class Events:
    service: str
    segment: int | None  # None: the current one; -1: the one before (events.1); n: segment n

    def size(self, ev: "EventLog") -> int:
        return len(ev.raw(self.service, self.segment))  # every stat asks: never copy a segment for it

    def read(self, ev: "EventLog", off: int, size: int) -> bytes:
        return bytes(ev.raw(self.service, self.segment)[off: off + size])

    def mtime(self, ev: "EventLog") -> float:
        """A rotated segment never changes again, and must not look as if it did."""
        if self.segment is None:
            return ev.mtime(self.service)
        return ev.segment_mtime(self.service, ev.segment(self.service) - 1 if self.segment == -1 else self.segment)


@dataclass(frozen=True)
class Log:
    """An instance's output, read live from the files the runtime keeps.

    Not a snapshot: between two rotations it only grows, so its true size and
    a read at any offset are all `tail -f` needs.  Only the bytes asked for
    are read, however large the files.
    """
    service: str
    instance: int
    parts: Callable[[], list[str]]  # oldest first

    def _sizes(self) -> list[tuple[str, int, float]]:
        out = []
        for p in self.parts():
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):  # a planted link is neither followed here nor read
                out.append((p, st.st_size, st.st_mtime))
        return out

    def exists(self) -> bool:
        return bool(self._sizes())

    def size(self) -> int:
        return sum(size for _, size, _ in self._sizes())

    def mtime(self) -> float:
        return max((m for _, _, m in self._sizes()), default=0.0)

    def read(self, off: int, size: int) -> bytes:
        out = bytearray()
        for path, length, _ in self._sizes():
            if off >= length:
                off -= length
                continue
            try:
                with statedir.open_file(path, "rb") as f:  # never a planted link's target
                    out += os.pread(f.fileno(), min(size - len(out), length - off), off)
            except OSError:
                pass
            off = 0
            if len(out) >= size:
                break
        return bytes(out)


@dataclass(frozen=True)
class Ctl:
    service: str | None  # None: the top ctl, "<verb> <service> [arg]"


@dataclass(frozen=True)
class Wait:
    service: str


@dataclass(frozen=True)
class ManifestFile:
    name: str


Node = Dir | Text | Events | Ctl | Wait | ManifestFile | Log


def events_dir(service: str) -> Path:
    """The directory that holds a service's events (the root for the cluster-wide log)."""
    return () if service == CLUSTER else ("active", service)


def _line(fn: Callable[[Service], object]) -> Callable[["Namespace", Service], Node]:
    return lambda ns, s: Text(lambda: f"{fn(s)}\n".encode(), lambda: s.mtime)


def _text(fn: Callable[[Service], str]) -> Callable[["Namespace", Service], Node]:
    def render(s: Service) -> bytes:
        out = fn(s)
        return (out if not out or out.endswith("\n") else out + "\n").encode()
    return lambda ns, s: Text(lambda: render(s), lambda: s.mtime)


def render_instance(i: Instance, cost: Cost | None = None) -> str:
    r = i.rec
    state = "draining" if i.leaving else r.state
    return (f"node={NODE} slot={r.slot} version={r.version} state={state} health={r.health} "
            f"pid={r.pid or '-'} port={r.port or '-'} restarts={r.restarts} started={rfc3339(r.started)} "
            f"{render_cost(cost)}\n")


def render_status(s: Service) -> str:
    up, want = s.progress()
    rows = [
        ("service", s.name), ("version", s.rec.version or ""), ("previous_version", s.rec.previous_version or ""),
        ("update_status", s.rec.update_status), ("update_progress", f"{up}/{want}"),
        ("replicas", s.rec.replicas), ("running", sum(1 for i in s.instances.values() if i.proc and not i.proc.exited)),
        ("health", s.health()), ("endpoints", " ".join(f"{h}:{p}" for h, p in s.endpoints())),
    ]
    if s.rec.update_status == "failed":
        rows.append(("failure", s.rec.failure))
    return "".join(f"{k} {v}".rstrip() + "\n" for k, v in rows)


SERVICE_FILES: dict[str, Callable[["Namespace", Service], Node]] = {
    "ctl": lambda ns, s: Ctl(s.name),
    "manifest": _text(lambda s: s.rec.manifest),
    "previous_manifest": _text(lambda s: s.rec.previous_manifest),
    "version": _line(lambda s: s.rec.version or ""),
    "previous_version": _line(lambda s: s.rec.previous_version or ""),
    "update_status": _line(lambda s: s.rec.update_status),
    "update_progress": _line(lambda s: "%d/%d" % s.progress()),
    "replicas": _line(lambda s: s.rec.replicas),
    "health": _line(lambda s: s.health()),
    "status": _text(render_status),
    "endpoints": _text(lambda s: "".join(f"{h}:{p}\n" for h, p in s.endpoints())),
    "instances": lambda ns, s: ns.slots_dir(s, lambda i: render_instance(i, ns.cost(i)).encode()),
    "logs": lambda ns, s: ns.logs_dir(s),
    "events": lambda ns, s: Events(s.name, None),
    "events.1": lambda ns, s: Events(s.name, -1),
    "wait": lambda ns, s: Wait(s.name),
}

ROOT_FILES: dict[str, Callable[["Namespace"], Node]] = {
    "ctl": lambda ns: Ctl(None),
    "events": lambda ns: Events(CLUSTER, None),  # cluster-wide: deletions, router trouble
    "events.1": lambda ns: Events(CLUSTER, -1),
    "manifests": lambda ns: Dir(ns.engine.store.list_files, ns.manifest_file, writable=True),
    "active": lambda ns: Dir(lambda: sorted(ns.engine.services), ns.service_dir),
    "metrics": lambda ns: Text(ns.metrics.render, time.time),  # Prometheus text (DESIGN §12)
}


class Namespace:
    def __init__(self, engine: Engine) -> None:
        self.engine: Engine = engine  # annotated: the module-level ROOT_FILES lambdas use it before inference
        self.metrics: Metrics = Metrics(engine)
        self.root = Dir(lambda: [f for f in ROOT_FILES if f != "events.1" or self._rotated(CLUSTER)], self.root_child)

    def cost(self, i: Instance) -> Cost | None:
        """An instance's CPU and memory (from the metrics' pass over /proc), None unless running."""
        return self.metrics.usage.of(i.rec.pid) if i.proc is not None and not i.proc.exited else None

    def _rotated(self, service: str) -> bool:  # `events.1` exists once a rotation happened, as with logrotate
        return self.engine.events.segment(service) > 0

    def root_child(self, name: str) -> Node | None:
        if name == "events.1" and not self._rotated(CLUSTER):
            return None
        if name in ROOT_FILES:
            return ROOT_FILES[name](self)
        m = RETIRED_EVENTS_RE.fullmatch(name)  # a rotated-away inode (not listed)
        return Events(CLUSTER, int(m.group(1))) if m else None

    def resolve(self, path: Path) -> Node | None:
        node: Node | None = self.root
        for name in path:
            if not isinstance(node, Dir):
                return None
            node = node.child(name)
        return node

    def manifest_file(self, name: str) -> Node | None:
        return ManifestFile(name) if self.engine.store.get_file(name) is not None else None

    def service_dir(self, name: str) -> Node | None:
        s = self.engine.services.get(name)
        if s is None:
            return None
        def rotated() -> bool:
            return self._rotated(s.name)

        def child(f: str) -> Node | None:
            if f == "events.1" and not rotated():
                return None
            if f in SERVICE_FILES:
                return SERVICE_FILES[f](self, s)
            m = RETIRED_EVENTS_RE.fullmatch(f)  # a rotated-away inode: reached by inode, never listed
            return Events(s.name, int(m.group(1))) if m else None
        return Dir(lambda: [f for f in SERVICE_FILES if f != "events.1" or rotated()], child)

    def log(self, s: Service, instance_id: int) -> Log:
        return Log(s.name, instance_id, lambda: self.engine.runtime.log_parts(s.name, instance_id))

    def logs_dir(self, s: Service) -> Dir:
        """One log per slot, and the logs the engine keeps for instances gone (``failed-3``, ``stopped-0``)."""
        def kept() -> dict[str, int]:
            return {name: id for name, id in s.rec.kept_logs.items() if self.log(s, id).exists()}

        def child(name: str) -> Node | None:
            inst = next((i for i in s.instances.values() if str(i.rec.slot) == name), None)
            if inst is not None:
                return self.log(s, inst.rec.id)
            m = LOG_BY_ID_RE.fullmatch(name)
            if m:  # an open descriptor outlives its slot, as a deleted file stays readable
                log = self.log(s, int(m.group(1)))
                return log if log.exists() else None
            id = kept().get(name)
            return None if id is None else self.log(s, id)
        return Dir(lambda: [str(i.rec.slot) for i in s.by_slot()] + sorted(kept()), child, volatile=True)

    def slots_dir(self, s: Service, render: Callable[[Instance], bytes]) -> Dir:
        def child(name: str) -> Node | None:
            inst = next((i for i in s.instances.values() if str(i.rec.slot) == name), None)
            return None if inst is None else Text(lambda: render(inst), lambda: s.mtime)
        return Dir(lambda: [str(i.rec.slot) for i in s.by_slot()], child, volatile=True)
