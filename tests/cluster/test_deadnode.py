"""A node frozen (SIGSTOP) past its TTL, then resumed, on a real cluster (three etcd members, three
`deployfs serve --cluster` nodes): its instance is replaced on the others soon after its lease
lapses, requests through the other nodes' routers never fail, and once it is back it stops the
process that was replaced (which ran on, unseen, all along) and takes new instances again."""

from __future__ import annotations

import os
import time

from tests.cluster.harness import Cluster, Hammer, get, instances, manifest, placed
from tests.cluster.test_scenarios import deployed

PORT = 21210  # (this module's ports: 21200-21299)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_node_frozen_past_its_ttl_is_replaced_and_stops_its_instance_when_back(cluster: Cluster):
    deployed(cluster, "dn", manifest(PORT, replicas=3), on="n1")
    leader = cluster[cluster.leader()]
    victim = cluster.other_than_leader()
    others = [n for n in cluster.running() if n is not victim]
    stale = [int(i["pid"]) for i in instances(leader, "dn") if i["node"] == victim.name]
    assert len(stale) == 1
    urls = [f"http://{n.address}:{PORT}/" for n in others]
    for url in urls:
        cluster.until(lambda: get(url)[0], 10, f"{url} to answer")
    load = Hammer(urls)
    cluster.loads.append(load)
    try:
        time.sleep(0.3)
        victim.freeze()
        t0 = time.monotonic()
        took = cluster.until(lambda: placed(leader, "dn").get(victim.name) is None
                             and sum(placed(leader, "dn").values()) == 3
                             and len(leader.read("active/dn/endpoints").split()) == 3, victim.ttl + 15,
                             f"{victim.name}'s instance replaced")
        print(f"\n{victim.name} frozen: its instance replaced and ready {took:.2f} s later (TTL {victim.ttl} s)")
        assert alive(stale[0])  # it runs on, unseen
        assert f"node {victim.name} down" in leader.read("events")
        assert "(node %s down)" % victim.name in leader.read("active/dn/events")
        assert f"state=down" in leader.read(f"nodes/{victim.name}")

        victim.thaw()
        back = cluster.until(lambda: not alive(stale[0]), 30, f"{victim.name} to stop its replaced instance")
        print(f"{victim.name} thawed: its replaced instance stopped {back:.2f} s later "
              f"({time.monotonic() - t0:.1f} s after the freeze)")
        cluster.until(lambda: f"state=ready instances=0" in leader.read(f"nodes/{victim.name}"), 15,
                      f"{victim.name} ready again with no instance")
        time.sleep(0.3)
    finally:
        load.stop()
    assert not load.failed and min(load.ok.values()) > 0, str(load)
    for n in cluster.nodes:  # every node shows the same three, none of them the stopped one
        shown = instances(n, "dn")
        assert len(shown) == 3 and all(int(i["pid"]) != stale[0] for i in shown), (n.name, shown)
    r = leader.ctl("scale 4", "dn")  # it rejoined: placement uses it again
    assert r.returncode == 0, r.stdout + r.stderr
    cluster.until(lambda: placed(leader, "dn").get(victim.name) == 1, 20, f"a new instance on {victim.name}")
    assert os.path.exists(victim.mnt)


def test_a_machine_killed_is_replaced_and_its_records_go_when_it_starts_again(cluster: Cluster):
    deployed(cluster, "dk", manifest(PORT + 1, replicas=3), on="n2")
    leader = cluster[cluster.leader()]
    victim = cluster.other_than_leader()
    victim.kill()  # the server, its router and its instances at once
    took = cluster.until(lambda: placed(leader, "dk").get(victim.name) is None
                         and len(leader.read("active/dk/endpoints").split()) == 3, victim.ttl + 15,
                         f"{victim.name}'s instance replaced")
    print(f"\n{victim.name} killed: its instance replaced and ready {took:.2f} s later (TTL {victim.ttl} s)")
    down = leader.read(f"nodes/{victim.name}")
    assert "state=down" in down and "instances=0" not in down, down  # its lost records wait for it
    cluster.start([victim.name])  # the machine is back: deployfs starts on the same state dir
    cluster.until(lambda: "state=ready instances=0" in leader.read(f"nodes/{victim.name}"), 20,
                  f"{victim.name} back, its replaced instance's record gone")
    assert "its node came back and stopped it; its record goes" in leader.read("active/dk/events")
    assert sum(placed(leader, "dk").values()) == 3
