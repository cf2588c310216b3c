"""kill -9 of `deployfs serve` at every interesting point, under load.

After a restart on the same state directory: every instance still running is
adopted (same pid, never restarted), the rollout converges to what an
uninterrupted run reaches, no event from before the crash is lost, and the
router kept every request flowing.
"""

import re
import sys
import time

import pytest

from deployfs.node.runtime import proc_start_time
from tests import mount as _mount
from tests.load import Load
from tests.mount import SERVICE

PORT = 18500


def manifest(version, extra="", drain=0.2, pause=0):
    return (f"image {sys.executable}\nargs {SERVICE} --port $PORT --version {version} {extra}\n"
            f"replicas 3\nport {PORT}\nhealth http://127.0.0.1:$PORT/healthz\nhealth_interval 0.2\n"
            f"health_timeout 0.5\nhealth_retries 2\nupdate_deadline 10\ndrain_timeout {drain}\n"
            f"update_pause {pause}\n")


def idle(m):
    return "done"


def mid_batch(m):
    m.write_manifest("web", manifest("v2", "--slow-start 1.5"))
    m.ctl("apply", "web")
    m.until(lambda: "instance 3 started" in m.read("active/web/events"))
    return "done"


def while_draining(m):
    m.write_manifest("web", manifest("v2", drain=3))
    m.ctl("apply", "web")
    m.until(lambda: "instance 0 draining" in m.read("active/web/events"))
    return "done"


def while_paused(m):
    m.write_manifest("web", manifest("v2", pause=0.5))
    m.ctl("apply", "web")
    m.until(lambda: "instance 3 healthy" in m.read("active/web/events"))
    m.ctl("pause", "web")
    m.until(lambda: m.sh("cat active/web/wait", timeout=30).stdout == "paused\n")
    return "paused"


def during_rollback(m):
    m.write_manifest("web", manifest("v2"))
    m.ctl("apply", "web")
    m.sh("cat active/web/wait", timeout=30)
    m.ctl("rollback", "web")
    m.until(lambda: "rollback started" in m.read("active/web/events") and
            re.search(r"rollback started.*\n(.*\n)*.* instance \d started", m.read("active/web/events")))
    return "done"


def instance_pids(m):
    out = {}
    for s in m.sh("ls active/web/instances").stdout.split():
        line = m.read(f"active/web/instances/{s}")
        pid = line.split("pid=")[1].split()[0]
        if pid != "-":  # an instance that is over has no process
            out[int(pid)] = line
    return out


@pytest.mark.parametrize("point", [idle, mid_batch, while_draining, while_paused, during_rollback],
                         ids=lambda f: f.__name__)
def test_crash_at(tmp_path, point):
    m = _mount.start(str(tmp_path))
    try:
        m.write_manifest("web", manifest("v1"))
        m.ctl("apply web")
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        load = Load(f"http://127.0.0.1:{PORT}/")
        time.sleep(0.3)
        expect = point(m)
        target = m.read("active/web/version").strip()
        history = m.read("active/web/events")
        running = {pid for pid in instance_pids(m) if proc_start_time(pid) is not None}
        _mount.kill9(m)
        time.sleep(0.5)
        m2 = _mount.start(str(tmp_path), state=m.state, mnt=m.path)
        m.proc, m.log = m2.proc, m2.log
        after = m.read("active/web/events")
        assert after.startswith(history), "events from before the crash were lost or reordered"
        adopted = {int(p) for p in re.findall(r"adopted pid=(\d+)", after[len(history):])}
        # An instance that exited at the crash is no longer running; with the server
        # dead and no reaping init here it lingers as a zombie, which is not "running".
        assert running <= adopted | {p for p in running if proc_start_time(p) is None}
        if expect == "paused":
            assert m.sh("cat active/web/wait", timeout=30).stdout == "paused\n"
            m.ctl("resume", "web")
        assert m.sh("cat active/web/wait", timeout=60).stdout == f"done {target}\n"
        final = instance_pids(m)
        assert sorted(int(l.split("slot=")[1].split()[0]) for l in final.values()) == [0, 1, 2]
        assert all(f"version={target}" in l for l in final.values())
        if point is idle:
            assert set(final) == running  # nothing was restarted
        result = load.stop()
        print(f"\ncrash {point.__name__}: {len(running)} running at the crash, {len(adopted)} adopted; {result}")
        assert result.failed == 0, result.output
    finally:
        _mount.stop(m)
