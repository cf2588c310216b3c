"""A drain that runs out its drain_timeout says so, with the connections it left open, on
both traffic paths: those connections are cut by the stop signal unless the app ends them."""

import socket

import pytest

from tests import mount as _mount
from tests.traffic.test_zero_downtime import PORT as _OLD_PORT, manifest

PORT = 20641


@pytest.mark.parametrize("mode", [(), ("--router", "haproxy")], ids=["builtin", "haproxy"])
def test_a_drain_that_times_out_is_reported(tmp_path, mode):
    with _mount.running(str(tmp_path), *mode) as m:
        # protocol tcp: an open connection is held as it is, whatever HTTP it carries
        m.write_manifest("web", manifest(replicas=1).replace(f"port {_OLD_PORT}", f"port {PORT}")
                         + "protocol tcp\n")
        assert m.ctl("apply web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        m.until(lambda: _connects(), timeout=10, what="the frontend")
        held = socket.create_connection(("127.0.0.1", PORT), timeout=5)
        try:
            held.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert held.recv(65536).startswith(b"HTTP/1.")  # it reached the instance, and stays open
            assert m.ctl("restart web").returncode == 0
            assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
            m.until(lambda: "drain timed out" in m.read("active/web/events"), timeout=15, what="the event")
            assert "instance 0 drain timed out after 1s: 1 connection still open" in m.read("active/web/events")
        finally:
            held.close()
        # A drain that ends in time says nothing of the kind.
        assert m.ctl("restart web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        m.until(lambda: m.read("active/web/events").count(" stopped") >= 2, timeout=15, what="the second stop")
        assert m.read("active/web/events").count("drain timed out") == 1


def _connects():
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=0.5).close()
        return True
    except OSError:
        return False
