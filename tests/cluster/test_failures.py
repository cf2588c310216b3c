"""Issue 13's failure scenarios on a real cluster (three etcd members, three nodes): a node
killed with its instances (machine death), the leader killed mid-rollout, a node frozen past its
TTL then resumed, etcd quorum lost and regained.  One cluster for the module; each test puts
back what it broke (a node restarted, etcd members started again)."""

from __future__ import annotations

import threading
import time

from tests.cluster.harness import EVERY_ROUTER, Cluster, Hammer, Node, get, instances, manifest, placed

TTL = 2  # the harness's --node-ttl
DEAD, LEAD, FROZEN, QUORUM = 21310, 21311, 21312, 21313


def deployed(c: Cluster, name: str, text: str, on: Node) -> None:
    on.write_manifest(name, text)
    r = on.ctl(f"apply {name}")
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.stdout, r.stderr, c.logs())
    out = on.sh(f"cat active/{name}/wait", timeout=40).stdout
    assert out.startswith("done"), (out, c.logs())


class Sampler:
    """The most instances of a service seen running at once (any version, any node), as one
    node shows them, sampled until stopped."""

    def __init__(self, nodes: list[Node], service: str) -> None:
        self.nodes, self.service, self.most = nodes, service, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for n in self.nodes:
                if n.running():
                    self.most = max(self.most, sum(placed(n, self.service).values()))
                    break
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.most


def test_a_node_killed_with_its_instances_is_replaced_on_the_others(cluster: Cluster):
    leader = cluster[cluster.leader()]
    deployed(cluster, "dead", manifest(DEAD, replicas=3), on=leader)
    victim = cluster.other_than_leader()
    assert placed(leader, "dead").get(victim.name) == 1
    routers = [u for u in cluster.routers(DEAD) if victim.address not in u]
    for url in routers:
        cluster.until(lambda: get(url)[0], 10, f"{url} to answer")
    load = Hammer(routers)
    cluster.loads.append(load)
    t0 = time.monotonic()
    killed = victim.kill()  # the server, its router and its instance, as a machine dies
    assert killed
    survivors = [n.name for n in cluster.running()]
    took = cluster.until(lambda: sorted(placed(leader, "dead")) == sorted(survivors)
                         and sum(placed(leader, "dead").values()) == 3, TTL + 10, "replacements on the others")
    assert time.monotonic() - t0 < TTL + 3, took  # the lease runs out, then replacements start at once
    time.sleep(0.3)
    load.stop()
    # The surviving routers retry a request whose backend refuses the connection elsewhere: none fails.
    assert not load.failed and min(load.ok.values()) > 0, str(load)
    events = leader.read("active/dead/events")
    assert f"node {victim.name} down" in events and f"(node {victim.name} down)" in events, events
    assert f"state=down" in leader.read(f"nodes/{victim.name}")
    for n in cluster.running():  # routed to the living only, by every node
        assert victim.address not in n.read("active/dead/endpoints"), n.name
    # The machine comes back: it rejoins, takes instances again, and nothing of it is left over.
    victim.start()
    cluster.until(lambda: "state=ready" in leader.read(f"nodes/{victim.name}"), 10, f"{victim.name} ready again")
    cluster.until(lambda: len(instances(leader, "dead")) == 3, 10, "the lost record gone")
    for n in cluster.nodes:
        assert sum(placed(n, "dead").values()) == 3


def test_the_leader_killed_mid_rollout_is_replaced_within_ttl_and_the_rollout_goes_on(cluster: Cluster):
    first = cluster[cluster.leader()]
    writer = cluster.other_than_leader()
    deployed(cluster, "lead", manifest(LEAD, "v1", replicas=3, update_pause=1), on=writer)
    most = Sampler([n for n in cluster.nodes if n is not first], "lead")
    routers = [u for u in cluster.routers(LEAD) if first.address not in u]
    load = Hammer(routers)
    cluster.loads.append(load)
    try:
        writer.write_manifest("lead", manifest(LEAD, "v2", replicas=3, update_pause=1))
        assert writer.ctl("apply lead").returncode == 0
        cluster.until(lambda: writer.read("active/lead/update_progress").startswith("1/"), 20, "the first batch")
        assert writer.read("active/lead/update_status") == "rolling\n"
        t0 = time.monotonic()
        first.kill()
        cluster.until(lambda: cluster.leader() not in ("", first.name), TTL + 5, "another leader")
        takeover = time.monotonic() - t0
        assert takeover < TTL + 1, f"takeover took {takeover:.2f} s"
        out = writer.sh("cat active/lead/wait", timeout=40).stdout
        assert out.startswith("done"), (out, cluster.logs())
    finally:
        high = most.stop()
        load.stop()
    assert high <= 3 + 1, f"{high} instances at once (replicas 3, update_batch 1)"
    assert not load.failed and min(load.ok.values()) > 0, str(load)  # through the surviving routers
    version = writer.read("active/lead/version").strip()
    assert placed(writer, "lead", version) and sum(placed(writer, "lead", version).values()) == 3
    assert all(get(u)[1].startswith("v2") for u in cluster.routers(LEAD))


def test_a_leader_frozen_past_its_ttl_is_deposed_and_rejoins_when_resumed(cluster: Cluster):
    frozen = cluster[cluster.leader()]
    deployed(cluster, "frozen", manifest(FROZEN, replicas=3), on=frozen)
    watcher = cluster.other_than_leader()
    stale = [i["pid"] for i in instances(watcher, "frozen") if i["node"] == frozen.name]
    load = Hammer(cluster.routers(FROZEN)) if EVERY_ROUTER else None
    frozen.freeze()
    try:
        cluster.until(lambda: cluster.leader() not in ("", frozen.name), TTL + 5, "another leader")
        cluster.until(lambda: f"state=down" in watcher.read(f"nodes/{frozen.name}"), TTL + 5, "the node down")
        cluster.until(lambda: sum(n for k, n in placed(watcher, "frozen").items() if k != frozen.name) == 3,
                      15, "replacements on the others")
    finally:
        frozen.thaw()
    new = cluster.leader()
    cluster.until(lambda: "state=ready" in watcher.read(f"nodes/{frozen.name}"), 10, "the node back")
    # Its replaced instance is stopped on it, not adopted back; the deposed controller acted no more.
    cluster.until(lambda: len(instances(watcher, "frozen")) == 3, 15, "the replaced instance stopped")
    for pid in stale:
        cluster.until(lambda: not _alive(int(pid)), 10, f"pid {pid} stopped")
    for n in cluster.nodes:
        assert n.read("cluster").endswith(f"leader={new}\n") and sum(placed(n, "frozen").values()) == 3
    assert "another node leads" in frozen.mount.server_log() or "no longer leads" in frozen.mount.server_log()
    if load is not None:
        load.stop()
        assert not load.failed, str(load)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_etcd_quorum_lost_writes_fail_reads_and_traffic_go_on_then_resume(cluster: Cluster):
    n1, n2 = cluster["n1"], cluster["n2"]
    deployed(cluster, "quorum", manifest(QUORUM, replicas=2), on=n1)
    for url in cluster.routers(QUORUM):
        cluster.until(lambda: get(url)[0], 10, f"{url} to answer")
    status = n2.read("active/quorum/status")
    load = Hammer(cluster.routers(QUORUM))
    cluster.loads.append(load)
    lost = cluster.etcd.members[1:]
    try:
        for m in lost:
            m.stop(kill=True)
        for n in cluster.nodes:
            cluster.until(lambda: n.read("cluster").startswith("store=unreachable"), TTL + 3, f"{n.name}: unreachable")
        t0 = time.monotonic()
        r = n2.ctl("scale quorum 3")
        assert r.returncode != 0 and "Input/output error" in r.stderr, (r.stdout, r.stderr)
        assert "error: cluster store unreachable" in r.stdout, r.stdout
        assert time.monotonic() - t0 < 5
        r = n2.sh("echo '# edit' >> manifests/quorum")
        assert r.returncode != 0 and "Input/output error" in r.stderr, (r.stdout, r.stderr)
        assert n2.read("active/quorum/status") == status  # the last known state
        assert n1.read("active/quorum/replicas") == "2\n"
        time.sleep(TTL + 0.5)  # past every lease: nothing is declared down, traffic goes on
    finally:
        for m in lost:
            cluster.etcd.start(m)
        cluster.etcd.wait_healthy()
    load.stop()
    assert not load.failed and min(load.ok.values()) > 0, str(load)
    for n in cluster.nodes:
        cluster.until(lambda: n.read("cluster").startswith("store=ok"), TTL + 5, f"{n.name}: store ok")
    cluster.until(lambda: n2.ctl("scale quorum 3").returncode == 0, 10, "writes to go through again")
    assert n2.sh("cat active/quorum/wait", timeout=30).stdout.startswith("done")
    for n in cluster.nodes:
        cluster.until(lambda: sum(placed(n, "quorum").values()) == 3, 5, f"{n.name} sees 3 instances")
        assert "# edit" not in n.read("manifests/quorum")  # the refused write was never half done


def test_the_leaders_server_crashed_and_restarted_within_its_ttl_leads_again(cluster: Cluster):
    """Its restart takes its lease back (the name is its own), so the `leader` key under that
    lease never lapses: the restarted server must take it over, or no node ever leads again."""
    leader = cluster[cluster.leader()]
    leader.crash()
    leader.start()
    assert "is back in the cluster" in leader.mount.server_log()
    other = cluster.other_than_leader()
    t0 = time.monotonic()
    r = other.ctl(f"cordon {other.name}")  # carried out by the controller, wherever it runs
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.stdout, r.stderr)
    assert time.monotonic() - t0 < TTL + 1
    assert other.ctl(f"uncordon {other.name}").stdout.startswith("ok")
    assert cluster.leader() == leader.name
