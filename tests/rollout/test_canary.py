"""Canary releases with real processes and real traffic: the canary's share of
requests under canary_weight (built-in router and haproxy), promote and abort under wrk
with no failed request, and a bad canary that rolls itself back."""

import http.client
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import mount as _mount
from tests.load import Load
from tests.mount import SERVICE

PORT = 20700
REQUESTS = 2100  # (a multiple of 4: the keep-alive clients share it)


def manifest(version: str = "v1", extra: str = "", canary: str = "") -> str:
    return (f"image {sys.executable}\nargs {SERVICE} --port $PORT --version {version} {extra}\n"
            f"replicas 3\nport {PORT}\nhealth http://127.0.0.1:$PORT/healthz\n"
            "health_interval 0.2\nhealth_timeout 0.5\nhealth_retries 2\nupdate_deadline 5\n"
            f"drain_timeout 1\nstop_timeout 5\n{canary}")


CANARY = "update canary\ncanary 1\n"
DEPLOY = [sys.executable, "-c", "from deployfs.cli.deploy import main; main()"]


def deploy(m, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DEPLOY, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, DEPLOYFS_MOUNT=m.path))


def serve(tmp_path, *extra: str):
    m = _mount.start(str(tmp_path), *extra)
    try:
        m.write_manifest("web", manifest())
        assert m.ctl("apply web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=30).stdout.startswith("done")
        m.until(lambda: len(m.read("active/web/endpoints").split()) == 3, what="three endpoints")
    except BaseException:
        _mount.stop(m)
        raise
    return m


@pytest.fixture
def served(tmp_path):
    m = serve(tmp_path)
    yield m
    _mount.stop(m)


def instances(m) -> dict[str, tuple[str, str]]:
    """slot -> (version, pid)."""
    out = {}
    for line in m.sh("cd active/web/instances && for f in *; do echo \"$f $(cat $f)\"; done", check=True).stdout.splitlines():
        slot, version, pid = line.split()[0], re.search(r"version=(\S+)", line), re.search(r"pid=(\S+)", line)
        if version is None or pid is None:  # it left between the listing and its cat (a scale down)
            continue
        out[slot] = (version.group(1), pid.group(1))
    return out


def start_canary(m, version: str = "v2", extra: str = "", canary: str = CANARY) -> None:
    m.write_manifest("web", manifest(version, extra, canary))
    r = m.sh("echo apply > active/web/ctl && cat active/web/wait", timeout=30)
    assert r.stdout == "canary\n", (r.stdout, r.stderr, m.read("active/web/events"))
    assert m.read("active/web/update_status") == "canary\n"


def get_one(_: int) -> str:
    """One request on a connection of its own: the router picks per connection (tcp) or request."""
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
    try:
        c.request("GET", "/", headers={"Connection": "close"})
        return c.getresponse().read().decode().split()[0]
    finally:
        c.close()


def get_many(n: int) -> list[str]:
    """``n`` requests on one kept-alive connection: with protocol http the router picks per request."""
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
    try:
        out = []
        for _ in range(n):
            c.request("GET", "/")
            out.append(c.getresponse().read().decode().split()[0])
        return out
    finally:
        c.close()


@pytest.mark.parametrize("router, protocol", [("builtin", "tcp"), ("builtin", "http"), ("haproxy", "http")])
def test_canary_weight_gives_the_canary_its_percent(tmp_path, router, protocol):
    m = serve(tmp_path, *(("--router", "haproxy") if router == "haproxy" else ()))
    try:
        start_canary(m, canary=CANARY + f"canary_weight 10\nprotocol {protocol}\n")
        m.until(lambda: len(m.read("active/web/endpoints").split()) == 4, what="the canary routed")
        time.sleep(0.3)  # haproxy: the weights follow the server add on the same admin socket, in order
        with ThreadPoolExecutor(4) as pool:
            if protocol == "tcp":  # per connection: a connection each
                answers = list(pool.map(get_one, range(REQUESTS)))
            else:  # per request: four kept-alive connections
                answers = [a for part in pool.map(get_many, [REQUESTS // 4] * 4) for a in part]
        share = answers.count("v2") / len(answers)
        print(f"\n{router} {protocol}: canary share {share:.1%} of {len(answers)} requests (canary_weight 10)")
        assert answers.count("v1") + answers.count("v2") == len(answers) >= 2000
        assert 0.07 <= share <= 0.13
    finally:
        _mount.stop(m)


def test_promote_under_load_fails_nothing(served):
    m = served
    m.write_manifest("web", manifest("v2", "", CANARY + "canary_weight 20\n"))
    r = deploy(m, "apply", "web")  # shows the canary and the two ways on
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert "web: canary" in r.stdout and out[out.index("canary") + 1].startswith("canary: 1 instance of "), r.stdout
    assert "getting 20% of requests" in r.stdout
    assert "deploy promote web" in r.stdout and "deploy rollback web" in r.stdout
    load = Load(f"http://127.0.0.1:{PORT}/")
    time.sleep(0.5)
    r = deploy(m, "promote", "web")
    time.sleep(0.5)
    result = load.stop()
    print(f"\npromote: {result}; deploy promote said {r.stdout!r}")
    assert r.returncode == 0, r.stderr
    assert m.read("active/web/wait") == f"done {m.read('active/web/version').strip()}\n"
    assert result.requests > 200 and result.failed == 0, result.output
    assert {v for v, _ in instances(m).values()} == {m.read("active/web/version").strip()}
    assert sorted(instances(m)) == ["0", "1", "2"]


def test_abort_under_load_fails_nothing_and_keeps_the_old_set(served):
    m = served
    before = instances(m)
    start_canary(m)
    assert len(instances(m)) == 4
    load = Load(f"http://127.0.0.1:{PORT}/")
    time.sleep(0.5)
    assert m.ctl("abort", "web").returncode == 0
    out = m.sh("cat active/web/wait", timeout=30).stdout
    time.sleep(0.5)
    result = load.stop()
    print(f"\nabort: {result}; wait said {out!r}")
    assert out.startswith("done")
    assert result.requests > 200 and result.failed == 0, result.output
    assert instances(m) == before  # the same processes on the same slots


def test_bad_canary_with_auto_rollback_rolls_back_by_itself(served):
    m = served
    before = instances(m)
    v1 = m.read("active/web/version").strip()
    m.write_manifest("web", manifest("v3", "--fail-health-after 0.5", CANARY + "auto_rollback yes\n"))
    r = m.sh("echo apply > active/web/ctl && cat active/web/wait", timeout=30)
    assert r.stdout == "canary\n", r.stdout  # healthy at first: it goes bad half a second in
    m.until(lambda: m.read("active/web/update_status") != "canary\n", what="the canary to fail")
    r = m.sh("cat active/web/wait", timeout=30)
    assert r.stdout.startswith("failed: instance 3 (") and r.stdout.endswith(f"(rolled back to {v1})\n"), r.stdout
    assert m.read("active/web/version") == f"{v1}\n" and m.read("active/web/update_status") == "none\n"
    assert instances(m) == before  # untouched: the same processes on the same slots
    events = m.read("active/web/events")
    assert "automatic rollback started" in events and "by deployfs (auto_rollback)" in events
    # Why it failed stays readable: the automatic rollback is not a rollout a person started.
    assert "failed-3" in os.listdir(m.p("active/web/logs")), os.listdir(m.p("active/web/logs"))
    m.read("active/web/logs/failed-3")  # (and readable)


def haproxy_weights(m) -> dict[str, int]:
    """server name -> its weight now, from haproxy's own stats (through the admin socket)."""
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(m.state, "haproxy.sock"))
    s.sendall(b"show stat\n")
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    rows = [r.split(",") for r in out.decode().splitlines()]
    col = rows[0].index("weight")
    return {r[1]: int(r[col]) for r in rows[1:] if len(r) > col and r[0] == "be_web" and r[1] not in ("BACKEND", "")}


def test_a_restart_of_deployfs_mid_canary_carries_on_through_haproxy(tmp_path):
    # Killed mid-canary and started again, deployfs adopts haproxy with the canary's weights
    # in force and holds the canary; a promote then puts every server back to the same weight.
    # (What haproxy.py reads back from its configuration on adoption: tests/traffic/test_weights.py.)
    m = serve(tmp_path, "--router", "haproxy")
    try:
        start_canary(m, canary=CANARY + "canary_weight 10\n")
        m.until(lambda: sorted(haproxy_weights(m).values()) == [10, 30, 30, 30], what="canary weights in haproxy")
        _mount.kill9(m)
        m2 = _mount.start(str(tmp_path), "--router", "haproxy", state=m.state, mnt=m.path)
        m.proc, m.log = m2.proc, m2.log
        assert m.read("active/web/update_status") == "canary\n"
        assert m.ctl("promote", "web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=60).stdout.startswith("done")
        m.until(lambda: set(haproxy_weights(m).values()) == {1} and len(haproxy_weights(m)) >= 3,
                what="every server back to weight 1")
    finally:
        _mount.stop(m)


def versions_while(m, until) -> list[list[str]]:
    """Every distinct list of instance versions (by slot) seen until ``until()``: what started when."""
    seen: list[list[str]] = []
    deadline = time.monotonic() + 60
    while not until():
        assert time.monotonic() < deadline, (seen, m.read("active/web/events"))
        try:
            now = [v for _, (v, _) in sorted(instances(m).items(), key=lambda kv: int(kv[0]))]
        except (AttributeError, subprocess.TimeoutExpired):  # (an instance file between two states)
            continue
        if not seen or seen[-1] != now:
            seen.append(now)
        time.sleep(0.05)
    return seen


def restart_server(m) -> None:
    """A clean stop (SIGTERM: Ctrl-C on `make run`), which takes every instance with it, then start again."""
    _mount.stop(m)
    m2 = _mount.start(str(m.path).rsplit("/", 1)[0], state=m.state, mnt=m.path)
    m.proc, m.log = m2.proc, m2.log


def test_a_clean_restart_mid_canary_brings_the_old_set_back_then_the_canary(served):
    # Issue 20 (newcomer 1): the server came back with every replica on the canary, "complete".
    m = served
    v1 = m.read("active/web/version").strip()
    start_canary(m)
    v2 = m.read("active/web/version").strip()
    previous = m.read("active/web/previous_version")
    restart_server(m)
    seen = versions_while(m, lambda: m.read("active/web/wait") == "canary\n")
    assert m.read("active/web/update_status") == "canary\n", m.read("active/web/events")
    assert sorted(v for v, _ in instances(m).values()) == sorted([v1] * 3 + [v2])
    # The good version's strength first: no canary before three of the old version.
    first_canary = next((n for n, s in enumerate(seen) if v2 in s), len(seen))
    assert first_canary == len(seen) or seen[first_canary - 1].count(v1) == 3, seen
    assert m.read("active/web/version").strip() == v2 and m.read("active/web/previous_version") == previous
    assert "complete" not in m.read("active/web/events").split("deployfs is shutting down")[-1]


def test_a_clean_restart_mid_rolling_update_keeps_its_batches(served):
    # ...and a rolling update: all three new ones started at once, skipping batches and pauses.
    m = served
    v1 = m.read("active/web/version").strip()
    m.write_manifest("web", manifest("v2", "", "update_pause 1\n"))
    assert m.ctl("apply web").returncode == 0
    v2 = m.read("active/web/version").strip()
    m.until(lambda: sorted(v for v, _ in instances(m).values()) == sorted([v1, v1, v2]), what="batch 1 done")
    restart_server(m)
    seen = versions_while(m, lambda: m.read("active/web/update_status") == "none\n")
    assert m.read("active/web/wait") == f"done {v2}\n"
    first_new = next(n for n, s in enumerate(seen) if v2 in s)
    assert seen[first_new - 1].count(v1) == 3, seen  # the good version's strength first
    assert seen[first_new].count(v2) == 1, seen  # then one batch at a time, not all three at once
    assert all(len(s) <= 4 for s in seen), seen  # never more than replicas + update_batch


@pytest.mark.parametrize("router", ["builtin", "haproxy"])
def test_a_new_canary_weight_reaches_the_router_at_once(tmp_path, router):
    # Issue 20 (newcomer 3): the reply said "getting 100%" while the router kept 99/1.
    m = serve(tmp_path, *(("--router", "haproxy") if router == "haproxy" else ()))
    try:
        start_canary(m, canary=CANARY + "canary_weight 10\n")
        m.write_manifest("web", manifest("v2", "", CANARY + "canary_weight 50\n"))  # the same version
        r = deploy(m, "apply", "web")
        assert r.returncode == 0 and "getting 50% of requests" in r.stdout, (r.stdout, r.stderr)
        assert m.read("active/web/update_status") == "canary\n"
        if router == "haproxy":
            m.until(lambda: sorted(haproxy_weights(m).values()) == [16, 17, 17, 50], timeout=5,
                    what="the new weights in haproxy")
        else:  # per request, smooth weighted round-robin: exactly half over any 100 picks
            m.until(lambda: get_many(100).count("v2") == 50, timeout=5, what="half the requests to the canary")
        assert "(canary_weight 10% -> 50%)" in m.read("active/web/events")
    finally:
        _mount.stop(m)


def test_scale_mid_canary_grows_and_shrinks_the_old_set(served):
    # Issue 20 (newcomer 5): scale 5 started nothing until promote; scale down said "superseded".
    m = served
    v1 = m.read("active/web/version").strip()
    start_canary(m)
    v2 = m.read("active/web/version").strip()
    assert m.ctl("scale 5", "web").returncode == 0
    m.until(lambda: sorted(v for v, _ in instances(m).values()) == sorted([v1] * 5 + [v2]), what="five old, one canary")
    m.until(lambda: m.read("active/web/health") == "healthy\n", what="healthy at five")
    assert m.ctl("scale 2", "web").returncode == 0
    m.until(lambda: sorted(v for v, _ in instances(m).values()) == sorted([v1] * 2 + [v2]), what="two old, one canary")
    events = m.read("active/web/events")
    assert "draining (scaled down)" in events and "superseded" not in events, events
    assert m.read("active/web/update_status") == "canary\n"


def test_pause_holds_auto_promote_through_a_real_mount(served):
    # Issue 20 (newcomer 6): the pause did not stop the auto_promote clock (unit test:
    # tests/control/test_canary.py times the rest of it under a mock clock).
    m = served
    start_canary(m, canary=CANARY + "auto_promote 2\n")
    assert m.ctl("pause", "web").returncode == 0
    time.sleep(2.5)
    assert m.read("active/web/update_status") == "paused\n"
    assert m.ctl("resume", "web").returncode == 0
    assert m.read("active/web/update_status") == "canary\n"  # not promoted at once: time is left on the clock
    m.until(lambda: "canary promoted by deployfs (auto_promote" in m.read("active/web/events"), what="auto_promote")
    assert m.sh("cat active/web/wait", timeout=30).stdout == f"done {m.read('active/web/version').strip()}\n"


def test_canaries_get_exactly_their_percent_when_it_does_not_split_evenly(served):
    # Issue 20 (newcomer 7): 3 canaries at canary_weight 50 got 49 of every 100 requests.
    m = served
    start_canary(m, canary="update canary\ncanary 3\ncanary_weight 50\n")
    m.until(lambda: len(m.read("active/web/endpoints").split()) == 6, what="the canaries routed")
    answers = get_many(300)  # per request, smooth weighted round-robin: exact over every 100 picks
    assert [answers[k:k + 100].count("v2") for k in (0, 100, 200)] == [50, 50, 50]


def test_update_rolling_applied_mid_canary_says_it_supersedes_the_canary(served):
    # Issue 20 (newcomer 8): everything rolled out with only "applied ... replicas=3" in events.
    m = served
    start_canary(m)
    m.write_manifest("web", manifest("v2"))  # the same version, `update rolling` (the default)
    assert m.ctl("apply web").returncode == 0
    assert m.sh("cat active/web/wait", timeout=30).stdout == f"done {m.read('active/web/version').strip()}\n"
    assert "canary superseded by update rolling (apply by uid=" in m.read("active/web/events")


def test_more_canaries_than_replicas_is_said_in_events(served):
    # Issue 20 (newcomer 9): `canary 4` with `replicas 3` was capped silently.
    m = served
    start_canary(m, canary="update canary\ncanary 4\n")
    assert "canary 4 is more than replicas 3: 3 canaries run" in m.read("active/web/events")
