"""The event log's segments as the filesystem sees them (no copy per stat)."""

from types import SimpleNamespace

from deployfs.state.events import EventLog
from deployfs.state.store import SqliteStore
from deployfs.view.access import Who
from deployfs.view.files import EventsFile, OpenMode


class Source:
    """The three calls an events file makes of the view's source, straight to the log."""

    def __init__(self, ev: EventLog) -> None:
        self.ev = ev

    def events_bytes(self, service, segment):
        return self.ev.raw(service, segment)

    def events_segment(self, service):
        return self.ev.segment(service)

    def events_mtime(self, service, segment):
        return self.ev.mtime(service)


async def test_size_and_reads_of_a_segment_copy_nothing_but_the_slice(tmp_path):
    ev = EventLog(SqliteStore(str(tmp_path)), segment_bytes=64 * 1024)
    for i in range(2000):  # two segments and a bit
        ev.emit("web", f"event {i} " + "x" * 40)
    ns = SimpleNamespace(source=Source(ev), started=0.0)
    current, previous = EventsFile(ns, "web", None), EventsFile(ns, "web", -1)
    # every stat asks for the size: it must be the segment itself, measured, not a copy of it
    assert ev.raw("web", None) is ev.raw("web", None)
    assert current.stat().size == len(ev.current("web")) and previous.stat().size == len(ev.raw("web", -1))
    assert await current.open(Who(0, 0), OpenMode()).read(0, 30) == ev.current("web")[:30]
    assert EventsFile(ns, "web", ev.segment("web")).stat().size == current.stat().size  # events@N of the current one
    assert EventsFile(ns, "web", ev.segment("web") - 5).stat().size == 0  # dropped long ago
