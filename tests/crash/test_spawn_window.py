"""kill -9 of `deployfs serve` in the middle of a large spawn batch.

A process started just before the kill, whose pid was not yet recorded, must
be adopted by the next start, not left running beside a second one for the
same instance. Whether a kill lands in that window is chance (the test prints
how many did); tests/control/test_supervise_real.py puts a record in the
window on purpose.
"""

import os
import sqlite3

from deployfs.node.runtime import marked_processes, marker_prefix, proc_start_time
from tests import mount as _mount


def listed(m) -> dict[int, int]:
    """slot -> pid, from instances/."""
    out = {}
    for slot in m.sh("ls active/sl/instances").stdout.split():
        pid = m.read(f"active/sl/instances/{slot}").split("pid=")[1].split()[0]
        out[int(slot)] = int(pid) if pid.isdigit() else 0
    return out


def running_marked(state: str) -> dict[int, str]:
    return {pid: v for pid, v in marked_processes(marker_prefix(state)).items()
            if proc_start_time(pid) is not None and not v.endswith(":router:0")}


def test_sigkill_inside_a_spawn_batch_leaves_one_process_per_instance(tmp_path):
    m = _mount.start(str(tmp_path))
    windows = 0
    try:
        m.write_manifest("sl", "image sleep\nargs infinity\nreplicas 0\nhealth_interval 0.2\n")
        m.ctl("apply sl")
        assert m.read("active/sl/wait").startswith("done")
        want = 0
        kills = int(os.environ.get("DEPLOYFS_SPAWN_KILLS", "3"))  # more, to measure how often a kill hits the window
        for kill_at in [20 + 30 * (k % 3) for k in range(kills)]:
            want += 100
            r = m.ctl(f"scale {want}", "sl")
            assert r.returncode == 0, (r.stderr, m.read("active/sl/events")[-2000:])
            m.until(lambda: len(m.sh("ls active/sl/instances").stdout.split()) >= want - 100 + kill_at,
                    timeout=30, what="spawning")
            _mount.kill9(m)
            db = sqlite3.connect(f"{m.state}/deployfs.db")
            windows += db.execute("select count(*) from kv where key like 'instances/%'"
                                  " and json_extract(cast(value as text), '$.pid') is null"
                                  " and json_extract(cast(value as text), '$.state') = 'starting'").fetchone()[0]
            db.close()
            m2 = _mount.start(str(tmp_path), state=m.state, mnt=m.path)
            m.proc, m.log = m2.proc, m2.log
            m.until(lambda: len(listed(m)) == want and all(listed(m).values()), timeout=60, what="converging")
            # Exactly one process per instance, each one listed, none unlisted.
            procs = running_marked(m.state)
            assert len(set(procs.values())) == len(procs) == want, "a duplicate or an orphan"
            assert set(procs) == set(listed(m).values())
            assert "gone while deployfs was down" not in m.read("active/sl/events")
        print(f"\n{windows} of {kills} kills landed between a start and its pid being recorded")
    finally:
        _mount.stop(m)
