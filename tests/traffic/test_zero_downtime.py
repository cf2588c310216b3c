"""The seed's "no traffic interruption", proven with wrk through the built-in router."""

import os
import signal
import sys
import time

import pytest

from tests import mount as _mount
from tests.load import Load
from tests.mount import SERVICE

PORT = 18300


def manifest(version="v1", extra="", replicas=3, update="rolling"):
    return (f"image {sys.executable}\nargs {SERVICE} --port $PORT --version {version} {extra}\n"
            f"replicas {replicas}\nport {PORT}\nhealth http://127.0.0.1:$PORT/healthz\n"
            "health_interval 0.2\nhealth_timeout 0.5\nhealth_retries 2\nupdate_deadline 5\n"
            f"drain_timeout 1\nstop_timeout 5\nupdate {update}\n")


@pytest.fixture
def served(tmp_path):
    with _mount.running(str(tmp_path)) as m:
        m.write_manifest("web", manifest())
        assert m.ctl("apply web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        yield m


def under_load(m, action):
    load = Load(f"http://127.0.0.1:{PORT}/")
    time.sleep(0.5)
    outcome = action(m)
    time.sleep(0.5)
    result = load.stop()
    print(f"\n{action.__name__}: {result}; outcome {outcome!r}")
    return result, outcome


def rolling_update(m):
    m.write_manifest("web", manifest("v2"))
    assert m.ctl("apply", "web").returncode == 0
    return m.sh("cat active/web/wait", timeout=60).stdout


def rollback(m):
    rolling_update(m)
    assert m.ctl("rollback", "web").returncode == 0
    return m.sh("cat active/web/wait", timeout=60).stdout


def rolling_restart(m):
    assert m.ctl("restart", "web").returncode == 0
    return m.sh("cat active/web/wait", timeout=60).stdout


def failed_rollout(m):
    m.write_manifest("web", manifest("v3", "--fail-health-after 0"))
    assert m.ctl("apply", "web").returncode == 0
    return m.sh("cat active/web/wait", timeout=60).stdout


def scale_down(m):
    assert m.ctl("scale 1", "web").returncode == 0
    m.until(lambda: os.listdir(m.p("active/web/instances")) == ["0"])
    return m.read("active/web/endpoints")


@pytest.mark.parametrize("action", [rolling_update, rollback, rolling_restart, failed_rollout, scale_down],
                         ids=lambda f: f.__name__)
def test_no_request_fails(served, action):
    result, outcome = under_load(served, action)
    assert result.requests > 200
    assert result.failed == 0, result.output
    if action is failed_rollout:
        assert outcome.startswith("failed: instance 3")
        assert served.read("active/web/health") == "healthy\n"
    elif action is not scale_down:
        assert outcome.startswith("done")


def test_killed_instance_costs_at_most_its_requests_in_flight(served):
    victim = int(served.read("active/web/instances/0").split("pid=")[1].split()[0])

    def kill(m):
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        m.until(lambda: len(m.read("active/web/endpoints").split()) == 2, timeout=5)
        return time.monotonic() - t0

    result, out_of_routing_after = under_load(served, kill)
    assert out_of_routing_after < 0.2 + 0.1  # one health_interval: the pidfd sees the exit at once
    assert result.failed <= 8  # at most one in-flight request per wrk connection


def test_replace_strategy_downtime_is_measured(served):
    def replace(m):
        m.write_manifest("web", manifest("v2", update="replace"))
        assert m.ctl("apply", "web").returncode == 0
        return m.sh("cat active/web/wait", timeout=60).stdout

    result, outcome = under_load(served, replace)
    assert outcome.startswith("done")
    # replace stops everything first: failures are expected, and measured
    print(f"replace strategy: {result.failed} of {result.requests} requests failed")


def test_server_sigkill_drops_no_request(tmp_path, served):
    m = served
    pids_before = sorted(int(m.read(f"active/web/instances/{s}").split("pid=")[1].split()[0]) for s in "012")

    def crash_and_restart(m):
        _mount.kill9(m)
        time.sleep(2)  # traffic flows with no control process at all
        m2 = _mount.start(str(tmp_path), state=m.state, mnt=m.path)
        m.proc, m.log = m2.proc, m2.log
        m.until(lambda: m.read("active/web/health") == "healthy\n")
        return sorted(int(m.read(f"active/web/instances/{s}").split("pid=")[1].split()[0]) for s in "012")

    result, pids_after = under_load(m, crash_and_restart)
    assert result.failed == 0, result.output
    assert pids_after == pids_before  # adopted, not restarted
    assert "adopted the running router" in m.server_log()
