"""Issue 13's scenarios on a real cluster that stays whole: three etcd members, three
`deployfs serve --cluster` nodes (127.0.1.1-3), real instances, real requests through every
node's router.  One cluster for the module (tests/cluster/conftest.py); each test its service."""

from __future__ import annotations

import subprocess
import threading
import time

from tests.cluster.harness import Cluster, Hammer, get, manifest, placed

WEB, ROLL, DRAIN = 21300, 21301, 21302


def deployed(c: Cluster, name: str, text: str, on: str = "n2") -> None:
    """The manifest written on one node, applied there, and its rollout done (`wait` on another)."""
    c[on].write_manifest(name, text)
    r = c[on].ctl(f"apply {name}")
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.stdout, r.stderr, c.logs())
    other = c.nodes[(c.nodes.index(c[on]) + 1) % len(c.nodes)]
    out = other.sh(f"cat active/{name}/wait", timeout=40).stdout
    assert out.startswith("done"), (out, c.logs())


def test_a_service_spreads_over_the_nodes_and_every_node_shows_it(cluster: Cluster):
    deployed(cluster, "web", manifest(WEB), on="n2")
    for n in cluster.nodes:
        assert placed(n, "web") == {"n1": 1, "n2": 1, "n3": 1}, n.name
        endpoints = sorted(e.split(":")[0] for e in n.read("active/web/endpoints").split())
        assert endpoints == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
        assert n.read("active/web/leader") == f"{cluster.leader()}\n"
        assert f"instances=1" in n.read(f"nodes/{n.name}")
    for url in cluster.routers(WEB):  # every node's router reaches the instances, wherever they run
        cluster.until(lambda: get(url)[0], 10, f"{url} to answer")


def test_a_write_on_any_node_is_seen_on_every_node_within_a_second(cluster: Cluster):
    for writer in cluster.nodes:
        text = manifest(WEB + 90, version=f"from-{writer.name}", replicas=0)
        writer.write_manifest("seen", text)
        assert writer.read("manifests/seen") == text  # the writer sees its own write at once
        for n in cluster.nodes:
            took = cluster.until(lambda: n.try_read("manifests/seen") == text, 1.0, f"{n.name} to see the manifest")
            assert took < 1.0
    r = cluster["n3"].ctl("apply seen")
    assert r.returncode == 0, r.stdout + r.stderr
    for n in cluster.nodes:  # a ctl write's effect: on the writer at once, elsewhere within a second
        cluster.until(lambda: n.try_read("active/seen/replicas") == "0\n", 1.0, f"{n.name} to see the service")


def test_a_rolling_update_across_nodes_fails_no_request_through_any_router(cluster: Cluster):
    deployed(cluster, "roll", manifest(ROLL, "v1"), on="n1")
    for url in cluster.routers(ROLL):
        cluster.until(lambda: get(url)[0], 10, f"{url} to answer")
    load = Hammer(cluster.routers(ROLL))
    cluster.loads.append(load)
    try:
        time.sleep(0.3)
        cluster["n3"].write_manifest("roll", manifest(ROLL, "v2"))
        assert cluster["n3"].ctl("apply roll").returncode == 0
        assert cluster["n2"].sh("cat active/roll/wait", timeout=40).stdout.startswith("done")
        time.sleep(0.3)
    finally:
        load.stop()
    assert not load.failed and min(load.ok.values()) > 0, str(load)
    for n in cluster.nodes:
        assert sum(placed(n, "roll", n.read("active/roll/version").strip()).values()) == 3
    assert all(get(u)[1].startswith("v2") for u in cluster.routers(ROLL))


def test_drain_a_node_under_load_fails_no_request(cluster: Cluster):
    deployed(cluster, "drain", manifest(DRAIN, replicas=3), on="n3")
    for url in cluster.routers(DRAIN):
        cluster.until(lambda: get(url)[0], 10, f"{url} to answer")
    drained = cluster.other_than_leader().name  # the leader's router is the one fed (EVERY_ROUTER)
    load = Hammer(cluster.routers(DRAIN))
    cluster.loads.append(load)
    try:
        time.sleep(0.3)
        r = cluster["n1"].ctl(f"drain {drained}")
        assert r.returncode == 0 and r.stdout.startswith("ok draining"), r.stdout + r.stderr
        cluster.until(lambda: "state=cordoned" in cluster["n3"].read(f"nodes/{drained}"), 30,
                      f"{drained} drained")
        time.sleep(0.3)
    finally:
        load.stop()
        cluster["n1"].ctl(f"uncordon {drained}")
    assert not load.failed and min(load.ok.values()) > 0, str(load)
    for n in cluster.nodes:
        assert drained not in placed(n, "drain") and sum(placed(n, "drain").values()) == 3


def test_events_are_one_history_the_same_on_every_node_and_tail_f_follows_on_any(cluster: Cluster):
    follower = cluster["n3"]
    tail = subprocess.Popen(["tail", "-n", "0", "-f", follower.mount.p("events")], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # tail has opened the file and seeks to its end
        r = cluster["n1"].ctl("cordon n3")
        assert r.returncode == 0, r.stdout + r.stderr
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(tail.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=5)
        assert got and "cordon" in got[0] and "n3" in got[0], got
    finally:
        tail.kill()
        tail.wait()
        cluster["n1"].ctl("uncordon n3")
    cluster.until(lambda: len({n.read("events") for n in cluster.nodes}) == 1, 2, "the same events on every node")
    for svc in cluster["n1"].sh("ls active", check=True).stdout.split():
        cluster.until(lambda: len({n.read(f"active/{svc}/events") for n in cluster.nodes}) == 1, 2,
                      f"the same {svc} events on every node")
