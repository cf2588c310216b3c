"""The router counts connections per backend, for the metrics (a real router process, real sockets)."""

import socket
import time

from tests.traffic.test_router_limits import ThreadBackend as Backend, control, get, router  # noqa: F401  (the fixture)

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


def until(pred, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_backend_series_ends_with_its_last_connection(router):  # noqa: F811
    """Out of routing with a connection still open (a drain), then that connection ends: its series go,
    in tcp and in http, although no `set` follows (after 3 rollouts: 9 series for 3 instances)."""
    state, _ = router
    silent, good = Backend(None), Backend(b"HTTP/1.0 200 OK\r\n\r\nok")
    port = PORT + 2

    def route() -> dict:
        return control(state, {"op": "stats"})["routes"]["web"]
    try:
        one = [["127.0.0.1", silent.port]]
        assert control(state, {"op": "set", "service": "web", "port": port, "backends": one}) == {"ok": True}
        held = socket.create_connection(("127.0.0.1", port), timeout=3)  # the backend holds it, silent
        until(lambda: route()["total"] == {f"127.0.0.1:{silent.port}": 1}, "the held connection counted")
        assert control(state, {"op": "set", "service": "web", "port": port, "backends": []}) == {"ok": True}
        assert route()["total"] == {f"127.0.0.1:{silent.port}": 1}  # draining: still counted
        held.close()
        silent.close()
        until(lambda: route()["total"] == {} and route()["active"] == {}, "the series to end")

        http = [["127.0.0.1", good.port]]
        assert control(state, {"op": "set", "service": "web", "port": port, "backends": http,
                               "protocol": "http"}) == {"ok": True}
        assert get(port).startswith(b"HTTP/1.0 200 OK")
        until(lambda: route()["total"] == {f"127.0.0.1:{good.port}": 1}, "the request counted")
        assert control(state, {"op": "set", "service": "web", "port": port, "backends": [],
                               "protocol": "http"}) == {"ok": True}
        until(lambda: route()["total"] == {}, "the http series to end")
        # no instance: a 503, counted as refused like tcp's reset
        assert get(port).startswith(b"HTTP/1.1 503")
        assert route()["refused"] == 1
    finally:
        silent.close()
        good.close()


def test_haproxy_counts_per_backend_too(tmp_path):
    """With --router haproxy the same series come from its `show stat` (scur, stot, econ)."""
    import sys
    import urllib.request

    from tests import mount as _mount
    from tests.mount import SERVICE
    from tests.serve.test_metrics import series
    port = PORT + 1
    with _mount.running(str(tmp_path), "--router", "haproxy") as m:
        m.write_manifest("web", f"image {sys.executable}\nargs {SERVICE} --port $PORT\nreplicas 2\nport {port}\n"
                                "health http://127.0.0.1:$PORT/healthz\nhealth_interval 0.2\n")
        assert m.ctl("apply web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        def served() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        m.until(served, timeout=10, what="haproxy frontend")
        for _ in range(5):
            assert served()
        def total() -> float:
            return sum(v for l, v in series(m.read("metrics"), "deployfs_router_connections_total")
                       if l["service"] == "web")
        m.until(lambda: total() >= 6, timeout=10, what="haproxy's counters in metrics")
        text = m.read("metrics")
        backends = {l["backend"] for l, _ in series(text, "deployfs_router_connections_total")}
        assert backends == {e for e in m.read("active/web/endpoints").split()}
        assert series(text, "deployfs_router_connections_failed_total") and series(text, "deployfs_router_up")[0][1] == 1
