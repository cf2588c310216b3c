"""The event log's segments as the filesystem sees them (issue 12.6: no copy per stat)."""

from deployfs.state.events import EventLog
from deployfs.view.namespace import Events
from deployfs.state.store import SqliteStore


def test_size_and_reads_of_a_segment_copy_nothing_but_the_slice(tmp_path):
    ev = EventLog(SqliteStore(str(tmp_path)), segment_bytes=64 * 1024)
    for i in range(2000):  # two segments and a bit
        ev.emit("web", f"event {i} " + "x" * 40)
    current, previous = Events("web", None), Events("web", -1)
    # every stat asks for the size: it must be the segment itself, measured, not a copy of it
    assert ev.raw("web", None) is ev.raw("web", None)
    assert current.size(ev) == len(ev.current("web")) and previous.size(ev) == len(ev.raw("web", -1))
    assert current.read(ev, 0, 30) == ev.current("web")[:30]
    assert Events("web", ev.segment("web")).size(ev) == current.size(ev)  # events@N of the current one
    assert Events("web", ev.segment("web") - 5).size(ev) == 0  # dropped long ago
