"""events rotates like logrotate: events.1 takes the old file, tail -F follows across."""

import os
import sqlite3
import subprocess
import time

from tests import mount as _mount


def test_rotation_and_tail_F(tmp_path):
    m = _mount.start(str(tmp_path), "--events-max-bytes", "1000")
    try:
        m.write_manifest("web", "image sleep\nargs 60\nreplicas 1\nhealth_interval 0.2\n")
        assert m.ctl("apply web").returncode == 0
        m.sh("cat active/web/wait", timeout=30)
        follow_F = subprocess.Popen(["tail", "-n", "+1", "-F", "-s", "0.1", m.p("active/web/events")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        follow_f = subprocess.Popen(["tail", "-n", "+1", "-f", "-s", "0.1", m.p("active/web/events")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        # Each scale writes one ~40-byte event (plus an instance event or two):
        # a rotation every second or so, slower than tail -F's 0.5 s recheck.
        # (Rotations faster than that lose lines with logrotate + tail -F too.)
        for n in range(30):
            assert m.ctl(f"scale {1 + n % 2}", "web").returncode == 0
            time.sleep(0.1)
        assert m.ctl("scale 7", "web").returncode == 0
        m.until(lambda: "scaled to 7" in m.read("active/web/events.1", "active/web/events"))
        size = os.stat(m.p("active/web/events")).st_size
        assert 0 < size <= 1000 and 800 < os.stat(m.p("active/web/events.1")).st_size <= 1000
        time.sleep(1.0)
        follow_F.terminate()
        follow_f.terminate()
        out_F, err_F = follow_F.communicate(timeout=10)
        out_f, _ = follow_f.communicate(timeout=10)
        assert "scaled to 7" in out_F, err_F  # -F follows the name across rotations
        assert "\0" not in out_F and "\0" not in out_f  # never a zero-filled page in place of events
        assert out_F.count("scaled to") == 31  # and missed nothing
        assert "has been replaced" in err_F
        assert "scaled to 7" not in out_f  # -f keeps the old file, as with logrotate
        # the store keeps the whole history, beyond the two files
        db = sqlite3.connect(os.path.join(m.state, "deployfs.db"))
        assert db.execute("SELECT count(*) FROM kv WHERE key LIKE 'events/web/%' "
                          "AND json_extract(cast(value AS text), '$.text') LIKE 'scaled to%'").fetchone()[0] == 31
    finally:
        _mount.stop(m)
