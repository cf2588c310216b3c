"""SIGTERM drains and stops everything; --keep-instances is a zero-downtime upgrade of deployfs."""

import os
import signal
import socket
import sys
import time

from tests import mount as _mount
from tests.load import Load
from tests.mount import SERVICE

PORT = 18600
MANIFEST = (f"image {sys.executable}\nargs {SERVICE} --port $PORT\nreplicas 2\nport {PORT}\n"
            "health http://127.0.0.1:$PORT/healthz\nhealth_interval 0.2\ndrain_timeout 0.5\n")


def pids(m):
    return sorted(int(m.read(f"active/web/instances/{s}").split("pid=")[1].split()[0])
                  for s in m.sh("ls active/web/instances").stdout.split())


def test_sigterm_stops_instances_and_router_and_unmounts(tmp_path):
    m = _mount.start(str(tmp_path))
    m.write_manifest("web", MANIFEST)
    m.ctl("apply web")
    m.sh("cat active/web/wait", timeout=30)
    running = pids(m)
    assert _mount.stop(m) == 0  # asserts: unmounted, nothing left of this state dir
    assert not any(os.path.exists(f"/proc/{p}") for p in running)
    assert "draining and stopping instances" in m.server_log()


def test_a_second_sigterm_while_draining_does_not_cut_the_shutdown_short(tmp_path):
    # The signal receiver closes after the first signal; a second one (an impatient Ctrl-C, a
    # supervisor repeating itself) used to take the default action mid-drain: dead mount, strays.
    m = _mount.start(str(tmp_path))
    m.write_manifest("web", MANIFEST.replace("drain_timeout 0.5", "drain_timeout 2"))
    m.ctl("apply web")
    m.sh("cat active/web/wait", timeout=30)
    conn = socket.create_connection(("127.0.0.1", PORT))  # held open: the drain lasts its 2 s
    try:
        m.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "draining and stopping instances" not in m.server_log():
            assert time.monotonic() < deadline and m.proc.poll() is None, m.server_log()
            time.sleep(0.02)
        for _ in range(3):
            m.proc.send_signal(signal.SIGTERM)
            m.proc.send_signal(signal.SIGINT)
        assert m.proc.wait(timeout=30) == 0, m.server_log()
    finally:
        conn.close()
    assert _mount.stop(m) == 0  # asserts: unmounted, nothing left of this state dir


def test_keep_instances_upgrade_drops_nothing(tmp_path):
    m = _mount.start(str(tmp_path), "--keep-instances")
    try:
        m.write_manifest("web", MANIFEST)
        m.ctl("apply web")
        m.sh("cat active/web/wait", timeout=30)
        before = pids(m)
        load = Load(f"http://127.0.0.1:{PORT}/")
        time.sleep(0.5)
        m.proc.terminate()
        assert m.proc.wait(timeout=30) == 0
        assert not os.path.ismount(m.path)
        assert all(os.path.exists(f"/proc/{p}") for p in before)  # left running...
        time.sleep(1)  # ... and routed, with no deployfs at all
        m2 = _mount.start(str(tmp_path), state=m.state, mnt=m.path)
        m.proc, m.log = m2.proc, m2.log
        assert m.read("active/web/health") in ("healthy\n", "degraded\n")
        assert pids(m) == before  # adopted, not restarted
        assert f"deployfs stopping: {len(before)} instances kept running (--keep-instances)" in m.read("active/web/events")
        time.sleep(0.5)
        result = load.stop()
        print(f"\nkeep-instances upgrade: {result}")
        assert result.failed == 0 and result.requests > 100
    finally:
        _mount.stop(m)
