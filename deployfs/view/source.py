"""The one narrow interface the view reads and commands through.

The view knows services only as :class:`~deployfs.model.status.ServiceStatus`
snapshots, manifests as stored files, events as segments of bytes and logs as
files on disk, and acts only by :meth:`Source.command`.  ``view/cached.py``
satisfies it over the records, as a cache fed by the store's watch shows them.

A write (a command, a manifest change) returns before the records read here
need show it: a front end awaits :meth:`Source.settled` before it answers the
request that wrote, so the next request reads its own write.
"""

from __future__ import annotations

from typing import Callable, Protocol

from ..model.cluster import ClusterStatus
from ..model.status import ServiceStatus
from ..state.logfiles import LogInfo
from ..state.store import ManifestFile


class Source(Protocol):
    # -- services -------------------------------------------------------------------------
    def service_names(self) -> list[str]: ...
    def service(self, name: str) -> ServiceStatus | None: ...
    def has_service(self, name: str) -> bool: ...

    async def changed(self, name: str) -> None:
        """Return once anything about the service changed (at once if there is no such service)."""
        ...

    def subscribe(self, on_change: Callable[[str], None], on_event: Callable[[str], None]) -> None:
        """Call ``on_change(service)`` when a service changes (or goes), ``on_event(service)``
        once an event is committed and readable ("" is the cluster-wide log)."""
        ...

    # -- nodes ------------------------------------------------------------------------------
    def cluster(self) -> ClusterStatus:
        """The nodes, which services each leads, and whether the store answers (docs/cluster.md)."""
        ...

    # -- manifests/: the editable files -------------------------------------------------------
    def manifest_names(self) -> list[str]: ...
    def manifest_file(self, name: str) -> ManifestFile | None: ...
    def put_manifest(self, name: str, data: bytes) -> None: ...
    def edit_manifest(self, name: str, edit: Callable[[bytes], bytes]) -> None:
        """Replace a manifest with ``edit(its bytes)``, its bytes as the store has them now (a
        truncate by name), even before the records read here show the last commit."""
        ...
    def replace_manifest(self, name: str, data: bytes) -> bool:
        """Replace the bytes of a manifest that exists; False (nothing written) if it does not."""
        ...
    def check_room(self) -> None:
        """Refuse now (NO_SPACE) a manifest change the store is known to refuse: its disk is full."""
        ...
    def delete_manifest(self, name: str) -> None: ...
    def rename_manifest(self, old: str, new: str) -> None:
        """At once: the new name has the old one's bytes and the old name is gone."""
        ...

    # -- events: segments of an append-only log (segment None: the current one; -1: the one before)
    def events_segment(self, service: str) -> int: ...
    def events_bytes(self, service: str, segment: int | None) -> bytes | bytearray:
        """The segment without a copy: slice or measure it at once, never keep it."""
        ...
    def events_mtime(self, service: str, segment: int | None) -> float: ...

    async def events_appended(self, service: str) -> None:
        """Return once the next event of ``service`` is committed and readable."""
        ...

    # -- logs: an instance's output, kept by the node that runs it ---------------------------
    def log_info(self, service: str, instance_id: int) -> LogInfo | None:
        """Its size and mtime as last known (None: no output is kept); Error(UNAVAILABLE) with the
        reason if it is another node's and that node did not answer (docs/cluster.md)."""
        ...

    async def log_fresh(self, service: str, instance_id: int) -> None:
        """Bring ``log_info`` up to date: another node's log is asked of it (at most once per a
        short TTL, one request for all of a service's logs there); this node's is read at once."""
        ...

    async def log_read(self, service: str, instance_id: int, off: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``off``, from wherever the log is (Error(UNAVAILABLE) as above)."""
        ...

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition (docs/operations.md)."""
        ...

    async def settled(self) -> None:
        """Until what is read here shows every write made through this source."""
        ...

    # -- commands ----------------------------------------------------------------------------
    async def command(self, service: str, verb: str, arg: str | None, who: str) -> str:
        """Carry out a ctl verb; the reply, or CommandError."""
        ...

    def refused(self, service: str | None, who: str, reason: str) -> None:
        """Keep a refused command in the events log it belongs to."""
        ...
