"""Metrics (docs/operations.md) from a real mount: promtool checks the text, a real Prometheus scrapes it.

One mount for the module: deploy, roll out a second version, send requests
through the router, and both tests read what that left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests import mount as _mount
from tests.mount import SERVICE

METRICS_PORT, SERVICE_PORT, PROMETHEUS_PORT = 20500, 20501, 20502
WEB = f"""image {sys.executable}
args {SERVICE} --port $PORT
env RELEASE={{release}}
replicas 2
port {SERVICE_PORT}
health http://127.0.0.1:$PORT/healthz
health_interval 0.2
"""
pytestmark = pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian: prometheus) not installed")


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def series(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name`` in exposition text: (labels, value)."""
    out = []
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name:
            out.append((dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"', m.group(2) or "")), float(m.group(3))))
    return out


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series, or None if absent."""
    return next((v for l, v in series(text, name) if l == labels), None)


@pytest.fixture(scope="module")
def rolled(tmp_path_factory):
    """A service deployed, rolled out once more, and served a few requests."""
    tmp = str(tmp_path_factory.mktemp("metrics"))
    with _mount.running(tmp, "--metrics", f"127.0.0.1:{METRICS_PORT}") as m:
        for release in (1, 2):
            m.write_manifest("web", WEB.format(release=release))
            assert m.ctl("apply web").returncode == 0
            assert m.read("active/web/wait").startswith("done"), m.server_log()
        for _ in range(5):
            assert get(f"http://127.0.0.1:{SERVICE_PORT}/")  # "<version> <slot>"
        yield m


def test_metrics_file_passes_promtool(rolled):
    m = rolled
    r = m.sh("promtool check metrics < metrics")
    assert r.returncode == 0, r.stdout + r.stderr
    # Router counters are the router's last liveness answer (once a second): wait for the requests.
    def forwarded() -> float:
        return sum(v for l, v in series(m.read("metrics"), "deployfs_router_connections_total") if l["service"] == "web")
    m.until(lambda: forwarded() >= 5, timeout=10, what="router counters in metrics")
    text = m.read("metrics")
    assert sample(text, "deployfs_rollouts_started_total", service="web") == 2
    assert sample(text, "deployfs_rollouts_completed_total", service="web") == 2
    assert sample(text, "deployfs_rollouts_failed_total", service="web") == 0
    assert sample(text, "deployfs_rollout_duration_seconds_count", service="web") == 2
    assert sample(text, "deployfs_update_status", service="web", status="none") == 1
    assert sample(text, "deployfs_instances", service="web", state="running") == 2
    assert sample(text, "deployfs_instances_health", service="web", health="healthy") == 2
    assert sample(text, "deployfs_update_progress_ready", service="web") == 2
    assert sample(text, "deployfs_probe_duration_seconds_count", service="web")  # probes were timed
    assert sample(text, "deployfs_router_up") == 1
    # Each instance's cost: the same numbers instances/N shows (one pass over /proc serves both).
    for slot in ("0", "1"):
        rss = sample(text, "deployfs_instance_resident_memory_bytes", service="web", slot=slot)
        assert rss is not None and rss > 1_000_000  # a Python process
        assert sample(text, "deployfs_instance_cpu_seconds_total", service="web", slot=slot) is not None
        line = m.read(f"active/web/instances/{slot}")
        fields = dict(kv.split("=", 1) for kv in line.split())
        assert float(fields["cpu"]) > 0 and int(fields["rss"]) > 1_000_000, line
    # The same text over HTTP (--metrics), which promtool also accepts.
    http = get(f"http://127.0.0.1:{METRICS_PORT}/metrics").decode()
    assert sample(http, "deployfs_rollouts_completed_total", service="web") == 2
    r = subprocess.run(["promtool", "check", "metrics"], input=http, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_and_answers(rolled, tmp_path):
    """A real Prometheus scrapes --metrics every 200 ms and answers a query for the rollout count."""
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""global:
  scrape_interval: 200ms
  scrape_timeout: 150ms
scrape_configs:
  - job_name: deployfs
    static_configs:
      - targets: ["127.0.0.1:{METRICS_PORT}"]
""")
    log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        query = urllib.parse.urlencode({"query": 'deployfs_rollouts_completed_total{service="web"}'})
        url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query?{query}"
        deadline, answer = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            assert prom.poll() is None, open(tmp_path / "prometheus.log").read()[-3000:]
            try:
                answer = json.loads(get(url, timeout=2))
                if answer["data"]["result"]:
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.1)
        assert answer and answer["status"] == "success", answer
        [series] = answer["data"]["result"]
        assert series["metric"]["job"] == "deployfs" and series["metric"]["service"] == "web"
        assert float(series["value"][1]) == 2
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        log.close()
    assert not os.path.exists(f"/proc/{prom.pid}")


def test_a_bad_or_taken_metrics_address_is_refused_and_leaves_nothing(tmp_path):
    from deployfs.node.runtime import marked_processes, marker_prefix
    serve = [sys.executable, "-m", "deployfs", "serve", str(tmp_path / "mnt"), "--state", str(tmp_path / "state")]
    (tmp_path / "mnt").mkdir()
    r = subprocess.run([*serve, "--metrics", "9464"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "argument --metrics: wants HOST:PORT (e.g. 127.0.0.1:9464), got '9464'" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", METRICS_PORT + 3))
        taken.listen(1)
        r = subprocess.run([*serve, "--metrics", f"127.0.0.1:{METRICS_PORT + 3}"], capture_output=True, text=True,
                           timeout=20)
    assert r.returncode == 2 and f"--metrics 127.0.0.1:{METRICS_PORT + 3}: Address already in use" in r.stderr, r.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    assert list(marked_processes(marker_prefix(str(tmp_path / "state")))) == []  # no router was started


def test_router_counters_survive_a_server_restart(tmp_path):
    """They live in the router process, which a restarted server adopts: kill -9 the server, and
    the connections counted before are still counted after (the engine's own counters restart)."""
    port = METRICS_PORT + 4

    def forwarded(m: _mount.Mount) -> float:
        return sum(v for l, v in series(m.read("metrics"), "deployfs_router_connections_total") if l["service"] == "web")

    m = _mount.start(str(tmp_path))
    try:
        m.write_manifest("web", WEB.format(release=1).replace(str(SERVICE_PORT), str(port)).replace("replicas 2", "replicas 1"))
        assert m.ctl("apply web").returncode == 0
        assert m.read("active/web/wait").startswith("done"), m.server_log()
        for _ in range(4):
            assert get(f"http://127.0.0.1:{port}/")
        m.until(lambda: forwarded(m) == 4, timeout=10, what="4 connections counted")
        before = sample(m.read("metrics"), "deployfs_router_start_time_seconds")
        _mount.kill9(m)
        assert get(f"http://127.0.0.1:{port}/")  # served while the server is down, and counted
        m = _mount.start(str(tmp_path), state=m.state, mnt=m.path)
        m.until(lambda: forwarded(m) == 5, timeout=10, what="the router's counters read by the new server")
        text = m.read("metrics")
        assert sample(text, "deployfs_router_start_time_seconds") == before  # the same router
        assert sample(text, "deployfs_rollouts_completed_total", service="web") == 0  # the server's own: from zero
    finally:
        _mount.stop(m)
