"""protocol http through a real router process: its control socket, its drain."""

import http.client
import http.server
import threading
import time

import pytest

from tests.traffic.test_router_limits import control, router  # noqa: F401  (the fixture)

PORT = 20601


class Named(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like every real app server

    def do_GET(self) -> None:
        body = str(self.server.server_port).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backends():
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Named) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [["127.0.0.1", s.server_port] for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.mark.parametrize("protocol", ["http", "tcp"])
def test_a_leaving_instance_drains_at_once_while_keepalive_clients_stay(router, backends, protocol):  # noqa: F811
    state, _ = router
    a, b = backends
    assert control(state, {"op": "set", "service": "web", "port": PORT, "backends": [a, b],
                           "protocol": protocol}) == {"ok": True}
    clients = [http.client.HTTPConnection("127.0.0.1", PORT, timeout=5) for _ in range(4)]
    for c in clients:  # each kept-alive connection has been served, and stays open
        c.request("GET", "/")
        c.getresponse().read()
    assert control(state, {"op": "set", "service": "web", "port": PORT, "backends": [b],
                           "protocol": protocol}) == {"ok": True}
    t0 = time.monotonic()
    reply = control(state, {"op": "drain", "service": "web", "backend": a, "timeout": 1.5})
    took = time.monotonic() - t0
    if protocol == "tcp":
        # bytes: the router cannot tell an idle connection from a busy one; the drain runs out
        assert reply["left"] > 0 and took >= 1.4
        return
    assert reply == {"ok": True, "left": 0} and took < 0.5  # our idle connections to it: closed at once
    for c in clients:  # and every client's next request is served, by the instance that stays
        c.request("GET", "/")
        assert c.getresponse().read() == str(b[1]).encode()
    stats = control(state, {"op": "stats"})["routes"]["web"]
    assert stats["protocol"] == "http" and stats["requests"] == 8 and stats["retried"] == 0


def test_unknown_protocol_is_refused_and_changes_nothing(router):  # noqa: F811
    state, _ = router
    reply = control(state, {"op": "set", "service": "web", "port": PORT, "backends": [], "protocol": "udp"})
    assert "unknown protocol" in reply["error"]
    assert control(state, {"op": "stats"})["routes"] == {}
