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
from typing import Callable


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
