"""kill -9 of `deployfs serve` during an update_pause: the server started on the same state
finds the pause boundary in the records (wall clock) and waits out the same pause, where a
server that kept it only in memory started the next batch at once."""

import json
import sqlite3

from tests import mount as _mount

PAUSE = 4.0


def manifest(version: str, pause: float = 0) -> str:
    return (f"image sleep\nargs {version}\nreplicas 2\nhealth_interval 0.2\nupdate_batch 1\n"
            f"update_pause {pause}\n")


def record(state: str, key: str) -> dict | None:
    db = sqlite3.connect(f"{state}/deployfs.db")
    try:
        row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()
    return json.loads(row[0]) if row else None


def starts(state: str) -> list[float]:
    """Wall-clock start times of the service's instances, from the records."""
    db = sqlite3.connect(f"{state}/deployfs.db")
    try:
        rows = [json.loads(v) for (v,) in db.execute("SELECT value FROM kv WHERE key LIKE 'instances/web/%'")]
    finally:
        db.close()
    return [r["started"] for r in rows]


def test_a_pause_survives_kill_9(tmp_path):
    m = _mount.start(str(tmp_path))
    try:
        m.write_manifest("web", manifest("3601"))
        m.ctl("apply web")
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        m.write_manifest("web", manifest("3602", pause=PAUSE))
        m.ctl("apply", "web")
        # The first batch is in, the old instance it replaces retired: the pause runs.
        m.until(lambda: (record(m.state, "services/web") or {}).get("batch_ended") not in (None, 0.0),
                timeout=30, what="the first batch to end")
        ended = record(m.state, "services/web")["batch_ended"]
        _mount.kill9(m)
        m2 = _mount.start(str(tmp_path), state=m.state, mnt=m.path)
        m.proc, m.log = m2.proc, m2.log
        assert m.sh("cat active/web/wait", timeout=60).stdout.startswith("done")
        # Only the new version's two instances are left; the later one is the second batch.
        second = max(starts(m.state))
        assert second >= ended + PAUSE - 0.1, f"the second batch started {second - ended:.2f}s after the first ended"
    finally:
        _mount.stop(m)
