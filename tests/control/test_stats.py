"""What the engine counts for the metrics (rollouts, their durations, restarts), and the node agent (probes)."""

import trio

from deployfs.model.histogram import Histogram
from tests.control.harness import deploy_v1, manifest


def test_histogram_is_cumulative_with_inf():
    h = Histogram((1.0, 5.0))
    for v in (0.5, 1.0, 3.0, 9.0):
        h.observe(v)
    assert h.cumulative() == [("1.0", 2), ("5.0", 3), ("+Inf", 4)]
    assert h.sum == 13.5


async def test_rollouts_counted_with_their_outcome(h, autojump_clock):
    await deploy_v1(h)
    s = h.svc.stats
    assert (s.rollouts_started, s.rollouts_completed, s.rollouts_failed) == (1, 1, 0)
    h.write(manifest(image="/bin/v2"))
    h.cmd("apply")
    await h.settle()
    h.prober.behaviour[h.write(manifest(image="/bin/v3"))] = "fail"
    h.cmd("apply")
    assert (await h.settle()).startswith("failed:")
    assert (s.rollouts_started, s.rollouts_completed, s.rollouts_failed) == (3, 2, 1)
    assert sum(s.rollout_seconds.counts) == 2 and s.rollout_seconds.sum > 0  # completed ones only
    # Probes are the node agent's to count; the metrics read them from it, never through the engine.
    p = h.node.agent.probe_stats["web"]
    assert p.failures > 0 and sum(p.seconds.counts) > p.failures
    text = h.node.metrics().render().decode()
    assert f'deployfs_probe_failures_total{{service="web"}} {float(p.failures)}' in text
    assert f'deployfs_probe_duration_seconds_count{{service="web"}} {float(sum(p.seconds.counts))}' in text


async def test_restarts_counted(h, autojump_clock):
    await deploy_v1(h, replicas=1)
    [victim] = h.svc.by_slot()
    h.rt.procs[victim.rec.pid].exit(1)
    await trio.sleep(1)
    assert victim.rec.restarts == 1 and h.svc.stats.restarts == 1


async def test_the_exposition_passes_promtool(h, autojump_clock):
    """Every family from an engine with a rollout behind it, and the router's counters, is valid text."""
    import shutil
    import subprocess

    import pytest

    from deployfs.control.metrics import Metrics
    if not shutil.which("promtool"):
        pytest.skip("promtool (Debian: prometheus) not installed")
    await deploy_v1(h)
    h.engine.router.last_stats = {"started": 1.0, "routes": {"web": {  # type: ignore[attr-defined]
        "port": 8080, "backends": [["127.0.0.1", 24001]], "open": 1, "refused": 2, "rejected": 0,
        "active": {"127.0.0.1:24001": 1}, "total": {"127.0.0.1:24001": 7, "127.0.0.1:24000": 3},
        "failed": {"127.0.0.1:24000": 1}}}}
    text = h.node.metrics().render().decode()
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stdout + r.stderr + text
    assert 'deployfs_rollouts_completed_total{service="web"} 1.0' in text
    assert 'deployfs_instances{service="web",state="running"} 3.0' in text
    # A backend leaving routing keeps its counters until the router drops them.
    assert 'deployfs_router_connections_total{backend="127.0.0.1:24000",service="web"} 3.0' in text
    assert 'deployfs_router_connections_failed_total{backend="127.0.0.1:24001",service="web"} 0.0' in text
    assert "deployfs_router_up 1.0" in text and "process_cpu_seconds_total" in text
    # What the docs list, the dashboard draws and deployfs writes are the same names.
    import json
    import re
    root = __file__.rsplit("/tests/", 1)[0]
    typed = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    documented = set(re.findall(r"^\| `(deployfs_\w+)`", open(f"{root}/docs/operations.md").read(), re.M))
    assert documented == {n for n in typed if n.startswith("deployfs_")}
    dashboard = json.load(open(f"{root}/contrib/grafana-dashboard.json"))
    drawn = {re.sub(r"_bucket$", "", n) for p in dashboard["panels"] for t in p["targets"]
             for n in re.findall(r"deployfs_\w+", t["expr"])}
    assert drawn <= typed, drawn - typed
    r = subprocess.run(["promtool", "check", "config", f"{root}/contrib/prometheus.yml"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_router_series_without_an_answering_router():
    from deployfs.control.metrics import router_families
    [down] = router_families(None)  # not answering its ping: only the up gauge, at 0
    assert down.name == "deployfs_router_up" and down.samples[0].value == 0
    [up] = router_families({})  # answering, with nothing routed yet
    assert up.samples[0].value == 1
