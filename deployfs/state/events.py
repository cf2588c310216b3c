"""Per-service event history: durable lines, rotated like logrotate.

Every event is kept by the store (committed, or held in memory while the
state disk is full) before anyone can see it.  The text a reader sees as
``events`` is the current *segment* (``events.1`` the one before); a segment
closes once it reaches ``segment_bytes``.  Segments are cached in memory as
bytes, so a read at any offset and the file's true size cost nothing (no
copy: :meth:`EventLog.raw`): ``tail -f`` on FUSE depends on a fresh, true
``st_size``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .kv import Change
from .records import EVENTS, decode_event
from .store import RecordStore, Store

SEGMENT_BYTES = 1024 * 1024
# The cluster-wide log, /deploy/events (deletions, router trouble): kept like a
# service's, under a name no service can have.
CLUSTER = ""
MAX_EVENT_CHARS = 2000


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass
class _Log:
    segment: int = 0
    current: bytearray = field(default_factory=bytearray)
    previous: bytes = b""
    mtime: float = 0.0
    previous_mtime: float = 0.0


Listener = Callable[[str], None]


class EventLog:
    def __init__(self, store: Store, *, segment_bytes: int = SEGMENT_BYTES, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.segment_bytes = segment_bytes
        self.clock = clock
        self._logs: dict[str, _Log] = {}
        self.listeners: list[Listener] = []

    def _log(self, service: str) -> _Log:
        log = self._logs.get(service)
        if log is None:
            last = self.store.last_event(service)
            log = _Log()
            if last is not None:
                log.segment = last.segment
                log.current = bytearray(b"".join(_line(e.ts, e.text) for e in self.store.events(service, last.segment)))
                older = self.store.events(service, last.segment - 1)
                log.previous = b"".join(_line(e.ts, e.text) for e in older)
                log.mtime = last.ts
                log.previous_mtime = older[-1].ts if older else 0.0
            self._logs[service] = log
        return log

    def emit(self, service: str, text: str, ts: float | None = None) -> None:
        text = " ".join(text.split())[:MAX_EVENT_CHARS]  # one event, one line
        log = self._log(service)
        ts = self.clock() if ts is None else ts
        line = _line(ts, text)
        segment = log.segment
        if log.current and len(log.current) + len(line) > self.segment_bytes:
            segment += 1
        self.store.append_event(service, segment, ts, text)
        # Shown once kept (committed, or held for a full disk), never if rolled back.
        self.store.after_commit(lambda: self._show(service, segment, ts, line))

    def _show(self, service: str, segment: int, ts: float, line: bytes) -> None:
        log = self._logs[service]
        if segment != log.segment:
            log.segment, log.previous, log.current = segment, bytes(log.current), bytearray()
            log.previous_mtime = log.mtime
        log.current += line
        log.mtime = ts
        for listener in self.listeners:
            listener(service)

    def forget(self, service: str) -> None:
        """The service was deleted (its events with it): a new one of that name starts afresh."""
        self._logs.pop(service, None)

    def current(self, service: str) -> bytes:
        return bytes(self._log(service).current)

    def raw(self, service: str, segment: int | None) -> bytes | bytearray:
        """A segment without copying it (None: the current one; -1: the one before;
        b"" once dropped): slice or measure it at once, never keep it."""
        log = self._log(service)
        if segment is None or segment == log.segment:
            return log.current
        if segment in (-1, log.segment - 1):
            return log.previous
        return b""

    def segment(self, service: str) -> int:
        return self._log(service).segment

    def segment_mtime(self, service: str, segment: int) -> float:
        log = self._log(service)
        return log.mtime if segment == log.segment else log.previous_mtime

    def mtime(self, service: str) -> float:
        return self._log(service).mtime


class EventFollower(EventLog):
    """A cluster node's copy of every service's events, shown as the store's watch brings them
    (whoever wrote them: the controller is on one node); ``emit`` hands an event to ``say``,
    which gets it to the controller (control/mailbox.py) to be written in order there."""

    def __init__(self, store: "RecordStore", say: Callable[[str, float, str], None], *,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        super().__init__(store, segment_bytes=segment_bytes)  # type: ignore[arg-type]
        self.say = say

    def emit(self, service: str, text: str, ts: float | None = None) -> None:
        self.say(service, self.clock() if ts is None else ts, " ".join(text.split())[:MAX_EVENT_CHARS])

    def heard(self, changes: list[Change]) -> None:
        """The events cache's listener: each event committed anywhere, in the store's order."""
        for c in changes:
            if not c.kv.key.startswith(EVENTS):
                continue
            service, segment, _ = _parts(c.kv.key)
            if c.kind == "delete":  # old ones trimmed, or all of them: the service was deleted
                if self.store.last_event(service) is None:
                    self.forget(service)
                continue
            if service not in self._logs:  # loaded from the cache, which has this one already
                self._log(service)
                for listener in self.listeners:
                    listener(service)
                continue
            ev = decode_event(c.kv.key, c.kv.value)
            self._show(service, segment, ev.ts, _line(ev.ts, ev.text))


def _parts(key: str) -> tuple[str, int, int]:
    service, segment, seq = key[len(EVENTS):].split("/", 2)
    return service, int(segment), int(seq)


def _line(ts: float, text: str) -> bytes:
    return f"{rfc3339(ts)} {text}\n".encode()
