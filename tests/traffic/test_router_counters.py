"""The router counts connections per backend, for the metrics (a real router process, real sockets)."""

import socket

from tests.traffic.test_router_limits import Backend, control, get, router  # noqa: F401  (the fixture)

PORT = 20504


def test_connections_counted_per_backend_and_dropped_with_it(router):  # noqa: F811
    state, _ = router
    good = Backend(b"HTTP/1.0 200 OK\r\n\r\nok")
    with socket.socket() as s:  # a port nobody listens on: every connect to it is refused
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    try:
        both = [["127.0.0.1", good.port], ["127.0.0.1", dead]]
        assert control(state, {"op": "set", "service": "web", "port": PORT, "backends": both}) == {"ok": True}
        for _ in range(6):
            assert get(PORT) == b"HTTP/1.0 200 OK\r\n\r\nok"  # a refused connect goes on to the next backend
        r = control(state, {"op": "stats"})["routes"]["web"]
        assert r["total"] == {f"127.0.0.1:{good.port}": 6}
        assert r["failed"] == {f"127.0.0.1:{dead}": 3}  # round-robin: every other connection tried it first
        assert control(state, {"op": "stats"})["started"] > 0
        control(state, {"op": "set", "service": "web", "port": PORT, "backends": both[:1]})
        r = control(state, {"op": "stats"})["routes"]["web"]
        assert r["failed"] == {} and r["total"] == {f"127.0.0.1:{good.port}": 6}
    finally:
        good.close()
