"""The engine as the view sees it: snapshots, files, events, logs and commands.

This is the only door between the view and the engine (view/source.py is the
protocol it satisfies): services come out as frozen
:class:`~deployfs.model.status.ServiceStatus` snapshots, never as the
engine's live objects, and a full state disk comes out as an error kind.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import trio

from ..model.errors import Error, Kind
from ..model.status import Derived, InstanceStatus, ServiceStatus
from ..state.store import ManifestFile, StoreFull
from ..node.usage import Usage
from .engine import Engine, Instance, Service
from .metrics import Metrics, instance_state


@contextlib.contextmanager
def _room() -> Iterator[None]:
    try:
        yield
    except StoreFull as e:  # refused whole: nothing changed
        raise Error(Kind.NO_SPACE, str(e)) from None


class EngineFacade:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.metrics = Metrics(engine)  # cli/serve.py serves the same text at --metrics
        self._appended: dict[str, trio.Event] = {}  # followers of a service's events, woken by the next one
        engine.events.listeners.append(self._on_event)

    def _on_event(self, service: str) -> None:
        woken = self._appended.pop(service, None)
        if woken is not None:
            woken.set()

    # -- services ---------------------------------------------------------------------------

    def service_names(self) -> list[str]:
        return sorted(self._engine.services)

    def service(self, name: str) -> ServiceStatus | None:
        s = self._engine.services.get(name)
        return None if s is None else snapshot(s, self.metrics.usage)

    def has_service(self, name: str) -> bool:
        return name in self._engine.services

    async def changed(self, name: str) -> None:
        s = self._engine.services.get(name)
        if s is not None:
            await s.wait_change()

    def subscribe(self, on_change: Callable[[str], None], on_event: Callable[[str], None]) -> None:
        self._engine.listeners.append(on_change)
        self._engine.events.listeners.append(on_event)

    # -- manifests --------------------------------------------------------------------------

    def manifest_names(self) -> list[str]:
        return self._engine.store.list_files()

    def manifest_file(self, name: str) -> ManifestFile | None:
        return self._engine.store.get_file(name)

    def put_manifest(self, name: str, data: bytes) -> None:
        with _room():
            self._engine.store.put_file(name, data)

    def delete_manifest(self, name: str) -> None:
        with _room():
            self._engine.store.delete_file(name)

    def rename_manifest(self, old: str, new: str) -> None:
        store = self._engine.store
        f = store.get_file(old)
        if f is None:
            raise Error(Kind.NOT_FOUND, f"no manifests/{old}")
        with _room(), store.transaction():
            store.put_file(new, f.data)
            store.delete_file(old)

    # -- events and logs ----------------------------------------------------------------------

    def events_segment(self, service: str) -> int:
        return self._engine.events.segment(service)

    def events_bytes(self, service: str, segment: int | None) -> bytes | bytearray:
        return self._engine.events.raw(service, segment)

    def events_mtime(self, service: str, segment: int | None) -> float:
        ev = self._engine.events
        if segment is None:
            return ev.mtime(service)
        return ev.segment_mtime(service, ev.segment(service) - 1 if segment == -1 else segment)

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    async def events_appended(self, service: str) -> None:
        await self._appended.setdefault(service, trio.Event()).wait()

    def log_parts(self, service: str, instance_id: int) -> list[str]:
        return self._engine.runtime.log_parts(service, instance_id)

    # -- commands -----------------------------------------------------------------------------

    def command(self, service: str, verb: str, arg: str | None, who: str) -> str:
        return self._engine.command(service, verb, arg, who)

    def refused(self, service: str | None, who: str, reason: str) -> None:
        self._engine.refused(service, who, reason)


def snapshot(s: Service, usage: Usage) -> ServiceStatus:
    rec = s.rec

    def instance(i: Instance) -> InstanceStatus:
        def cost() -> tuple[float, int] | None:  # from the metrics' pass over /proc, None unless running
            c = usage.of(i.rec.pid) if i.proc is not None and not i.proc.exited else None
            return None if c is None else (c.cpu, c.rss)
        alive = i.proc is not None and not i.proc.exited
        pid = i.rec.pid if alive else None  # a dead process's pid may be another's by now
        return InstanceStatus(id=i.rec.id, slot=i.rec.slot, version=i.rec.version, state=instance_state(i),
                              health=i.rec.health, pid=pid, port=i.rec.port, restarts=i.rec.restarts,
                              started=i.rec.started, node=i.rec.node or s.engine.node, cost=cost,
                              oom_kills=i.rec.oom_kills)

    def derive() -> Derived:
        instances = tuple(instance(i) for i in s.by_slot())
        return Derived(progress=s.progress(), health=s.health(), endpoints=tuple(s.endpoints()),
                       running=sum(1 for i in s.instances.values() if i.proc and not i.proc.exited),
                       instances=instances, outcome=s.outcome())

    return ServiceStatus(
        name=s.name, version=rec.version or "", previous_version=rec.previous_version or "",
        update_status=rec.update_status, replicas=rec.replicas, manifest=rec.manifest,
        previous_manifest=rec.previous_manifest, failure=rec.failure, mtime=s.mtime,
        kept_logs=dict(rec.kept_logs), protocol=s.manifest.traffic_protocol, derive=derive)
