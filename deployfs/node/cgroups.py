"""One cgroup per instance: its limits, a clean stop, and how it died.

Why it looks like this:

* Layout: ``<hierarchy>/deployfs/<state key>/<service>@<id>`` in every
  hierarchy used, where the key is a hash of the state directory (two servers
  on one host never share a cgroup) and the name is fixed by the instance, so
  a server restarted after a crash finds its instances' cgroups again.
* Each controller (memory, cpu, pids) is taken from cgroup v2 where the host
  enables it there, else from its v1 hierarchy; a hybrid host (v1 controllers
  and an empty v2 tree) gets v1 limits, and the v2 tree still groups the
  processes (``cgroup.kill``).  The hierarchy roots are used, like Docker and
  Nomad do with cgroupfs, not the server's own cgroup: instances must outlive
  the server, and under systemd ``KillMode=process`` keeps them alive.
* A limit that cannot be applied (no such controller, a write refused) is a
  :class:`CgroupError` that fails the start with the reason: an instance is
  never silently run unlimited.  With no limit asked for, a host without
  usable cgroups only loses the clean stop (the marker sweep remains).
* The child enters its cgroups itself, between fork and exec, by writing
  ``0`` to ``cgroup.procs`` descriptors the server opened (the kernel checks
  the opener's credentials): whatever it forks is inside from the start.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass

from ..model.manifest import format_size

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD = 100_000  # microseconds: the kernel's default CFS period


class CgroupError(Exception):
    pass


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    cpus: float | None = None
    pids: int | None = None

    def asked(self) -> list[str]:
        return [c for c in CONTROLLERS if self.value(c) is not None]

    def value(self, controller: str) -> int | float | None:
        return {"memory": self.memory, "cpu": self.cpus, "pids": self.pids}[controller]

    def describe(self, controller: str) -> str:
        v = self.value(controller)
        if controller == "memory" and isinstance(v, int):
            return f"memory {format_size(v)}"
        return f"{'cpus' if controller == 'cpu' else controller} {v:g}" if v is not None else controller


@dataclass(frozen=True)
class Layout:
    """Where each controller lives on this host: (mount point, 1 or 2), and the v2 mount."""

    controllers: dict[str, tuple[str, int]]
    v2: str | None

    @property
    def bases(self) -> list[str]:
        """Every hierarchy an instance gets a cgroup in: the v2 tree first (it can kill), then v1 ones."""
        out = [self.v2] if self.v2 else []
        out += sorted({mnt for mnt, v in self.controllers.values() if v == 1})
        return out

    def describe(self) -> str:
        parts = [f"{c}: v{v} ({mnt})" for c, (mnt, v) in sorted(self.controllers.items())]
        missing = [c for c in CONTROLLERS if c not in self.controllers]
        return "; ".join(parts + [f"{c}: none" for c in missing]) or "no cgroup controllers"


def detect(mountinfo: str = "/proc/self/mountinfo") -> Layout:
    v1: dict[str, str] = {}
    v2: str | None = None
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, rest = pre.split(), post.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        mnt, fstype, options = fields[4].replace("\\040", " "), rest[0], rest[2].split(",")
        if fstype == "cgroup2" and v2 is None:
            v2 = mnt
        elif fstype == "cgroup":
            for c in CONTROLLERS:
                if c in options and c not in v1:
                    v1[c] = mnt
    controllers: dict[str, tuple[str, int]] = {c: (m, 1) for c, m in v1.items()}
    if v2 is not None:
        try:
            with open(os.path.join(v2, "cgroup.controllers")) as f:
                enabled = f.read().split()
        except OSError:
            enabled = []
        controllers.update({c: (v2, 2) for c in CONTROLLERS if c in enabled})
    return Layout(controllers, v2)


def state_key(state_dir: str) -> str:
    return hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:12]


class InstanceCgroup:
    """The cgroups of one instance (one directory per hierarchy)."""

    def __init__(self, layout: Layout, paths: dict[str, str]) -> None:
        self.layout = layout
        self.paths = paths  # hierarchy mount -> this instance's directory in it

    def dir_for(self, controller: str) -> str | None:
        where = self.layout.controllers.get(controller)
        return None if where is None else self.paths.get(where[0])

    @property
    def tracking(self) -> str:
        """The directory whose cgroup.procs lists every process of the instance."""
        return next(iter(self.paths.values()))

    def open_procs(self) -> list[int]:
        """Descriptors of every cgroup.procs, for the child to write itself into."""
        fds: list[int] = []
        try:
            for d in self.paths.values():
                fds.append(os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise CgroupError(f"cannot open {d}/cgroup.procs: {e.strerror}") from None
        return fds

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.tracking, "cgroup.procs")) as f:
                return [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            return []

    def kill_all(self, deadline: float = 5.0) -> int:
        """SIGKILL every process in the instance's cgroup until none is left; how many were seen.

        ``cgroup.kill`` (v2, Linux 5.14) kills atomically; otherwise the list is
        read and killed until empty, which converges because what forks is killed
        on the next pass (and ``pids`` bounds a fork bomb)."""
        seen: set[int] = set()
        kill_file = os.path.join(self.tracking, "cgroup.kill")
        if os.path.exists(kill_file):
            try:
                with open(kill_file, "w") as f:
                    f.write("1")
            except OSError:
                pass
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                seen.add(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                except OSError as e:
                    log.warning("could not kill pid %d of %s: %s", pid, self.tracking, e)
            time.sleep(0.005)  # a killed process leaves its cgroup once it has exited
        return len(seen)

    def oom_kills(self) -> int:
        """How many processes the kernel killed for going over the memory limit."""
        d = self.dir_for("memory")
        if d is None:
            return 0
        name = "memory.events" if self.layout.controllers["memory"][1] == 2 else "memory.oom_control"
        try:
            with open(os.path.join(d, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self, patient: bool = True) -> None:
        """Remove the directories once empty (a process that is still exiting holds one a
        moment: ``patient`` waits up to half a second for it, else one try each)."""
        for d in self.paths.values():
            for attempt in range(50 if patient else 1):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        log.warning("cannot remove cgroup %s: %s", d, e.strerror)
                        break
                    if patient:
                        time.sleep(0.01)
            try:  # the state dir's own cgroup too, once its last instance is gone (tests make many)
                os.rmdir(os.path.dirname(d))
            except OSError:
                pass


class Cgroups:
    """The cgroups of every instance of one state directory."""

    def __init__(self, state_dir: str, layout: Layout | None = None) -> None:
        self.layout = layout if layout is not None else detect()
        self.key = state_key(state_dir)

    def group_dir(self, base: str) -> str:
        return os.path.join(base, "deployfs", self.key)

    def instance_paths(self, service: str, instance_id: int) -> dict[str, str]:
        return {b: os.path.join(self.group_dir(b), f"{service}@{instance_id}") for b in self.layout.bases}

    def find(self, service: str, instance_id: int) -> InstanceCgroup | None:
        """The cgroups of an instance that already has them (adoption after a restart)."""
        paths = {b: p for b, p in self.instance_paths(service, instance_id).items() if os.path.isdir(p)}
        return InstanceCgroup(self.layout, paths) if paths else None

    def instances(self) -> set[tuple[str, int]]:
        """Every instance that has a cgroup of this state directory, in any hierarchy."""
        found = set()
        for base in self.layout.bases:
            try:
                names = os.listdir(self.group_dir(base))
            except OSError:
                continue
            for name in names:
                service, at, ident = name.rpartition("@")
                if at and ident.isdigit():
                    found.add((service, int(ident)))
        return found

    def missing(self, limits: Limits) -> tuple[str, str] | None:
        """(controller, reason) for the first limit asked for that this host has no controller for."""
        for c in limits.asked():
            if c not in self.layout.controllers:
                return c, (f"{limits.describe(c)} cannot be applied: this host has no {c} cgroup "
                           f"controller ({self.layout.describe()})")
        return None

    def create(self, service: str, instance_id: int, limits: Limits) -> InstanceCgroup | None:
        """Make the instance's cgroups and set its limits; None if the host gives deployfs
        none and no limit is asked for.  A limit that cannot be set raises CgroupError."""
        if (missing := self.missing(limits)) is not None:
            raise CgroupError(missing[1])
        paths: dict[str, str] = {}
        failures: dict[str, str] = {}
        for base, path in self.instance_paths(service, instance_id).items():
            try:
                os.makedirs(path, exist_ok=True)  # first: a stop's rmdir of an empty parent cannot race it
                self._delegate(base)
                paths[base] = path
            except OSError as e:
                failures[base] = f"cannot create {path}: {e.strerror or e}"
        cg = InstanceCgroup(self.layout, paths)
        try:
            for c, (mnt, version) in self.layout.controllers.items():
                if mnt in failures:
                    if limits.value(c) is not None:
                        raise CgroupError(f"{limits.describe(c)} cannot be applied: {failures[mnt]}")
                    continue
                self._set_limit(paths[mnt], c, version, limits)
        except CgroupError:
            cg.remove()
            raise
        if not paths:
            return None
        return cg

    def _delegate(self, base: str) -> None:
        """In v2, hand the controllers down to the instance's directory.  Done at every
        start, not once: the last instance's stop removes ``deployfs/<key>``."""
        d = self.group_dir(base)
        if base == self.layout.v2:
            wanted = [c for c, (mnt, v) in self.layout.controllers.items() if v == 2]
            for parent in (base, os.path.dirname(d), d):
                if wanted:
                    _write(os.path.join(parent, "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))

    def _set_limit(self, d: str, controller: str, version: int, limits: Limits) -> None:
        """Set one controller's limit, or lift it (a directory left by a crashed server may hold an old one)."""
        v = limits.value(controller)
        writes: list[tuple[str, str, bool]] = []  # file, value, required
        if controller == "memory":
            value = "max" if v is None and version == 2 else "-1" if v is None else str(v)
            if version == 2:
                writes += [("memory.max", value, True), ("memory.swap.max", "0" if v else "max", False),
                           ("memory.oom.group", "1", False)]
            else:
                # memsw (memory + swap) makes the limit hard where swap is on; it may never be below
                # memory's, so it goes first when the limit grows and again after when it shrinks.
                memsw = ("memory.memsw.limit_in_bytes", value, False)
                writes += [memsw, ("memory.limit_in_bytes", value, True), memsw]
        elif controller == "cpu":
            quota = "max" if v is None else str(max(1000, round(float(v) * CPU_PERIOD)))
            if version == 2:
                writes.append(("cpu.max", f"{quota} {CPU_PERIOD}", True))
            else:
                writes += [("cpu.cfs_period_us", str(CPU_PERIOD), True),
                           ("cpu.cfs_quota_us", "-1" if v is None else quota, True)]
        elif controller == "pids":
            writes.append(("pids.max", "max" if v is None else str(v), True))
        for name, value, required in writes:
            try:
                _write(os.path.join(d, name), value)
            except OSError as e:
                if required and v is not None:
                    raise CgroupError(f"{limits.describe(controller)} cannot be applied: writing {value} to "
                                      f"{d}/{name}: {e.strerror or e}") from None


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
