"""Which protocol is in effect is shown (its default hangs on the health check's form), and
an apply that changes it says so in its event."""

from tests import mount as _mount
from tests.traffic.test_zero_downtime import PORT as _OLD_PORT, manifest

PORT = 20642


def web(version, extra=""):
    return manifest(version, replicas=1).replace(f"port {_OLD_PORT}", f"port {PORT}") + extra


def status(m):
    return dict(line.split(" ", 1) if " " in line else (line, "") for line in m.read("active/web/status").splitlines())


def test_status_shows_the_protocol_and_the_apply_event_its_change(tmp_path):
    with _mount.running(str(tmp_path)) as m:
        m.write_manifest("web", web("v1"))  # an http:// health check: http by default
        assert m.ctl("apply web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        assert status(m)["protocol"] == "http"
        v1 = status(m)["version"]
        m.write_manifest("web", web("v1", "protocol tcp\n"))  # not a new version: no rollout
        assert m.ctl("apply web").returncode == 0
        assert status(m)["protocol"] == "tcp"
        assert status(m)["version"] == v1
        last = m.read("active/web/events").splitlines()[-1]
        assert f"applied {v1} replicas=1 by " in last and last.endswith("(protocol http -> tcp)")
        m.write_manifest("web", web("v2"))  # a new version that also goes back to the default
        assert m.ctl("apply web").returncode == 0
        started = [e for e in m.read("active/web/events").splitlines() if f"started {v1}→" in e]
        assert started and started[-1].endswith("(protocol tcp -> http)")
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        assert status(m)["protocol"] == "http"
