"""The same zero-downtime guarantees with --router haproxy (Debian's haproxy 2.6)."""

import os
import socket
import time

import pytest

from tests import mount as _mount
from tests.load import Load
from tests.traffic.test_zero_downtime import manifest

PORT = 18300  # manifest()'s port


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def served(tmp_path):
    with _mount.running(str(tmp_path), "--router", "haproxy") as m:
        m.write_manifest("web", manifest())
        assert m.ctl("apply web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        m.until(lambda: listening(PORT), timeout=10, what="haproxy frontend")
        yield m


def test_every_operation_under_load_drops_nothing(served):
    m = served
    load = Load(f"http://127.0.0.1:{PORT}/")
    time.sleep(0.5)
    outcomes = {}
    m.write_manifest("web", manifest("v2"))
    m.ctl("apply", "web")
    outcomes["rolling update"] = m.sh("cat active/web/wait", timeout=60).stdout
    m.ctl("rollback", "web")
    outcomes["rollback"] = m.sh("cat active/web/wait", timeout=60).stdout
    m.ctl("restart", "web")
    outcomes["restart"] = m.sh("cat active/web/wait", timeout=60).stdout
    m.write_manifest("web", manifest("v3", "--fail-health-after 0"))
    m.ctl("apply", "web")
    outcomes["failed rollout"] = m.sh("cat active/web/wait", timeout=60).stdout
    assert m.ctl("scale 1", "web").returncode == 1  # a failed service needs a person first
    m.ctl("rollback", "web")
    outcomes["rollback after failure"] = m.sh("cat active/web/wait", timeout=60).stdout
    assert m.ctl("scale 1", "web").returncode == 0
    m.until(lambda: os.listdir(m.p("active/web/instances")) == ["0"])
    time.sleep(1)
    result = load.stop()
    print(f"\nhaproxy mode, five operations: {result}")
    assert result.failed == 0, result.output
    assert all(outcomes[k].startswith("done") for k in ("rolling update", "rollback", "restart", "rollback after failure"))
    assert outcomes["failed rollout"].startswith("failed: instance 3")
    cfg = open(os.path.join(m.state, "haproxy.cfg")).read()
    assert cfg.count("    server ") == 1 and "pool-max-conn -1 pool-purge-delay 5s" in cfg


def test_server_sigkill_keeps_haproxy_serving_and_it_is_adopted(tmp_path, served):
    m = served
    load = Load(f"http://127.0.0.1:{PORT}/")
    time.sleep(0.5)
    _mount.kill9(m)
    time.sleep(2)
    m2 = _mount.start(str(tmp_path), "--router", "haproxy", state=m.state, mnt=m.path)
    m.proc, m.log = m2.proc, m2.log
    m.write_manifest("web", manifest("v2"))
    m.ctl("apply", "web")
    assert m.sh("cat active/web/wait", timeout=60).stdout.startswith("done")
    result = load.stop()
    print(f"\nhaproxy mode, server SIGKILL + restart + rollout: {result}")
    assert result.failed == 0, result.output
    assert "adopted the running haproxy" in m.server_log()


async def test_a_reload_that_never_yields_a_worker_is_a_router_error(tmp_path, autojump_clock):
    # The feeder survives RouterErrors only: a stuck haproxy must be one, not a timeout
    # that would end table delivery for every service.
    import trio

    from deployfs.traffic.haproxy import HAProxyRouter
    from deployfs.traffic.router_client import RouterError

    class Stuck(HAProxyRouter):
        async def cmd(self, line, *, master=False, timeout=5):
            return "#<PID> <type>\n# workers\n"  # answers, but no worker ever appears

    h = Stuck(str(tmp_path))
    h.live["web"] = (PORT, {})
    with trio.fail_after(60):
        with pytest.raises(RouterError, match="started no new worker after a reload within 20 s"):
            await h._reload()


def test_delete_takes_the_frontend_out_and_frees_the_port(served):
    m = served
    m.write_manifest("other", manifest("B").replace(f"port {PORT}", f"port {PORT + 1}"))
    assert m.ctl("apply other").returncode == 0
    assert m.sh("cat active/other/wait", timeout=30).stdout.startswith("done")
    assert m.ctl("delete web").returncode == 0
    m.until(lambda: not os.path.exists(m.p("active/web")), timeout=30, what="web to be deleted")
    cfg = open(os.path.join(m.state, "haproxy.cfg")).read()
    assert "fe_web" not in cfg and "fe_other" in cfg
    m.until(lambda: not listening(PORT), timeout=10, what="the port to close")
    assert listening(PORT + 1)  # the other service's frontend is kept
    m.write_manifest("again", manifest("C"))  # the freed port can be applied at once
    assert m.ctl("apply again").returncode == 0, m.read("events")
    assert m.sh("cat active/again/wait", timeout=30).stdout.startswith("done")
