"""SIGTERM drains and stops everything; --keep-instances is a zero-downtime upgrade of deployfs."""

import os
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
        time.sleep(0.5)
        result = load.stop()
        print(f"\nkeep-instances upgrade: {result}")
        assert result.failed == 0 and result.requests > 100
    finally:
        _mount.stop(m)
