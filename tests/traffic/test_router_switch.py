"""A server restarted in the other --router mode after a crash stops the old mode's router
(it held the ports, so every apply failed) and says so in the events."""

import os
import signal

import pytest

from tests import mount as _mount
from tests.traffic.test_haproxy import listening
from tests.traffic.test_zero_downtime import PORT as _OLD_PORT, manifest

PORT = 20640


def alive(pid):
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def web(version):
    return manifest(version, replicas=1).replace(f"port {_OLD_PORT}", f"port {PORT}")


@pytest.mark.parametrize("first,then,pidfile,name", [
    (("--router", "haproxy"), (), "haproxy.pid", "HAProxy router"),
    ((), ("--router", "haproxy"), "router.pid", "built-in router"),
])
def test_a_restart_in_the_other_mode_stops_the_old_router(tmp_path, first, then, pidfile, name):
    m = _mount.start(str(tmp_path), *first)
    try:
        m.write_manifest("web", web("v1"))
        assert m.ctl("apply web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        m.until(lambda: listening(PORT), timeout=10, what="the first router to listen")
        old = int(open(os.path.join(m.state, pidfile)).read())
        _mount.kill9(m)
        assert alive(old) and listening(PORT)  # the old router outlives the server, as designed
        m2 = _mount.start(str(tmp_path), *then, state=m.state, mnt=m.path)
        m.proc, m.log = m2.proc, m2.log
        assert not alive(old)
        events = m.read("events")
        assert f"router: stopped the {name} (pid {old}) that an earlier server on this state directory" in events
        m.write_manifest("web", web("v2"))
        assert m.ctl("apply web").returncode == 0, m.read("events")
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done"), m.read("events")
        m.until(lambda: listening(PORT), timeout=10, what="the new router to listen")
    finally:
        _mount.stop(m)  # asserts nothing is left: not the old router, not the new one
