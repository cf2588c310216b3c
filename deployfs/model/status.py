"""What a service and its instances look like from outside: plain data, no behaviour.

A front end (through the view) sees services only as these snapshots:
whatever keeps the records (the engine today, a cache fed by the store's
watch later) builds them, so the view cannot reach into whoever supervises
the instances.  A snapshot lives for one request.  What is derived from the
instances (progress, health, endpoints, the outcome `wait` answers) is
worked out the first time that request asks for it: `cat version` pays
for none of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

from .rollout import Phase


@dataclass(frozen=True)
class InstanceStatus:
    id: int
    slot: int
    version: str
    state: str  # starting | running | draining | stopped | exited | failed
    health: str
    pid: int | None
    port: int | None
    restarts: int
    started: float  # wall clock
    node: str
    oom_kills: int = 0  # times the kernel killed it for its memory limit
    address: str = "127.0.0.1"  # where it listens: the address of its node
    # (CPU seconds, resident bytes) while running, else None; asked only by who shows it
    # (instances/N): the figures come from a pass over /proc
    cost: Callable[[], tuple[float, int] | None] = field(default=lambda: None, repr=False, compare=False)


@dataclass(frozen=True)
class Derived:
    progress: tuple[int, int]  # instances of the target up, of the desired count
    health: str  # healthy | degraded | unhealthy | stopped
    endpoints: tuple[tuple[str, int], ...]
    running: int  # instances whose process is alive
    instances: tuple[InstanceStatus, ...]  # by slot
    outcome: str | None  # what `wait` answers; None while a rollout is in flight


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    version: str
    previous_version: str
    update_status: str
    replicas: int
    manifest: str
    previous_manifest: str
    failure: str
    mtime: float  # wall clock of the last change
    # logs/<name> -> instance id: the output of instances gone that is kept readable
    kept_logs: dict[str, int]
    protocol: str  # how the router forwards: http | tcp (the manifest's, or the health check's default)
    derive: Callable[[], Derived] = field(repr=False, compare=False)

    @cached_property
    def derived(self) -> Derived:
        return self.derive()

    @property
    def progress(self) -> tuple[int, int]:
        return self.derived.progress

    @property
    def health(self) -> str:
        return self.derived.health

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        return self.derived.endpoints

    @property
    def running(self) -> int:
        return self.derived.running

    @property
    def instances(self) -> tuple[InstanceStatus, ...]:
        return self.derived.instances

    @property
    def outcome(self) -> str | None:
        return self.derived.outcome

    def instance_at(self, slot: str) -> InstanceStatus | None:
        return next((i for i in self.instances if str(i.slot) == slot), None)


# -- what is derived from the instances: one rule for the engine and the view ---------------------
#
# The engine asks these of its instances in memory, the view of the records it reads from the
# store's cache: the same functions, so `health`, `update_progress`, `endpoints` and what `wait`
# answers cannot drift apart between the supervisor and what a shell sees.


@dataclass(frozen=True)
class Member:
    """One instance as the derivations see it."""
    key: tuple[str, int]  # (version, generation)
    slot: int
    phase: Phase  # as last observed: starting | ready | unhealthy | exited | failed
    leaving: bool = False  # draining and being stopped
    busy: bool = False  # a restart is in flight
    backend: tuple[str, int] | None = None  # (address, port) it listens on


@dataclass(frozen=True)
class Standing:
    """A service's side of the derivations: its record, and what its manifest says of canaries."""
    version: str
    key: tuple[str, int]  # the target's (version, generation)
    replicas: int
    update_status: str
    stopped: bool = False
    deleting: bool = False
    canary_phase: bool = False
    canaries: int = 0  # how many canaries run beside the old set now (0 outside a canary phase)
    steps: int = 0
    failure: str = ""
    rolled_back: str = ""
    rolling_back: bool = False  # failed with auto_rollback and a good version to return to


def serving(i: Member) -> bool:
    # (a restart in flight is not routed: its process is the one its node agent is about to kill)
    return i.phase is Phase.READY and not i.leaving and not i.busy


def health(stopped: bool, replicas: int, insts: Sequence[Member]) -> str:
    if stopped or (replicas == 0 and not insts):
        return "stopped"
    ready = sum(1 for i in insts if serving(i))
    # One already on its way out (the failed release's instance a failed rollout stops) is out of
    # routing and no longer the service's trouble: the moment `wait` says `failed`, the old set serving
    # whole is `healthy`, however long that instance takes to stop.
    troubled = any(i.phase in (Phase.UNHEALTHY, Phase.EXITED, Phase.FAILED) and not i.leaving for i in insts)
    if ready == 0:
        return "unhealthy"
    return "healthy" if ready >= replicas and not troubled else "degraded"


def endpoints(insts: Sequence[Member]) -> list[tuple[str, int]]:
    """Where the ready instances listen, by slot: what the router is given."""
    return [i.backend for i in sorted(insts, key=lambda i: i.slot) if serving(i) and i.backend]


def progress(s: Standing, insts: Sequence[Member]) -> tuple[int, int]:
    """Instances of the target that are up, of the desired count (update_progress)."""
    up = sum(1 for i in insts if i.key == s.key and i.phase is Phase.READY and not i.leaving and not i.busy)
    return up, 0 if s.stopped else s.replicas


def outcome(s: Standing, insts: Sequence[Member]) -> str | None:
    """What `wait` answers, or None while a rollout is in flight (a deleted service: "deleted",
    which whoever no longer finds its record says)."""
    if s.deleting:
        return None
    status = s.update_status
    if status == "rolling":
        return None
    mine = [i for i in insts if i.key == s.key]
    ready = sum(1 for i in mine if serving(i))
    if status == "canary" or (status == "paused" and s.canary_phase):
        # The canary phase holds once every canary is up (or, paused, once nothing moves).
        moving = s.steps > 0 or any(i.leaving or i.busy for i in insts) or any(
            i.phase is Phase.STARTING for i in mine)
        if moving or (status == "canary" and ready < s.canaries):
            return None
        return status
    if status == "paused":
        # Paused takes effect at the batch boundary: until the batch in hand
        # has finished (or a `step` has run), the rollout is still moving.
        # A batch ends once its old instances are retired too: until then (a ready batch
        # beside the old ones it replaces, or a last batch not yet completed) it is still
        # moving, so `deploy step` through the last batch ends `done`, not `paused`.
        finishing = ready > 0 and len(insts) > s.replicas
        completing = len(mine) == len(insts) and ready >= s.replicas
        moving = finishing or completing or s.steps > 0 or any(
            i.leaving or i.busy or (i.key == s.key and i.phase is Phase.STARTING) for i in insts)
        return None if moving else "paused"
    if status == "failed":
        return None if s.rolling_back else f"failed: {s.failure}"
    if s.rolled_back:
        return f"failed: {s.rolled_back} (rolled back to {s.version})"
    return f"done {s.version}"
