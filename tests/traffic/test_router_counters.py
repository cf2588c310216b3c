"""The router counts connections per backend, for the metrics (a real router process, real sockets)."""

import socket

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
