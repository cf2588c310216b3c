"""Nodes in the engine, on the fake runtime: placement over the records, cordon, uncordon,
drain (moving instances the way a rollout does), the `nodes` directive.

One machine has one live node; a second node here is a record the test marks alive, as a
cluster's liveness will, with a node agent of its own on the same store (the engine's agent
runs only its own node's instances; the fake runtime runs them all)."""

import pytest
import trio

from deployfs.model.errors import CommandError, Kind
from deployfs.node.agent import NodeAgent
from deployfs.state.records import INSTANCES
from deployfs.state.store import NodeRecord
from tests.control.harness import Harness, deploy_v1, manifest, watch

HERE = "n1"


@pytest.fixture
async def h(tmp_path):
    h = Harness(tmp_path)
    h.local(node=HERE, address="127.0.1.1")
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        h.nursery = n
        yield h
        n.cancel_scope.cancel()


def add_node(h: Harness, name: str, address: str, alive: bool = True) -> None:
    nodes = h.engine.nodes
    nodes.put(NodeRecord(name, address))
    if alive:
        was = nodes.alive
        nodes.alive = lambda n: n == name or was(n)
        agent = NodeAgent(h.store.records, h.rt, name, prober=h.prober, events=h.engine.events,
                          cache=h.store.cache(INSTANCES))
        h.nursery.start_soon(agent.run)


def spread(h: Harness) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in h.svc.by_slot():
        out.setdefault(i.rec.node, []).append(i.rec.slot)
    return out


def node_cmd(h: Harness, verb: str, node: str) -> str:
    return h.engine.command(node, verb, None, "uid=0")


async def test_this_node_is_recorded_and_instances_carry_it(h, autojump_clock):
    assert [(r.name, r.address) for r in h.store.list_nodes()] == [(HERE, "127.0.1.1")]
    await deploy_v1(h)
    assert {(i.rec.node, i.rec.address) for i in h.svc.instances.values()} == {(HERE, "127.0.1.1")}
    c = h.engine.nodes.status()
    assert (c.store, c.leader, c.leaders, c.ready) == ("ok", HERE, {"web": HERE}, 1)
    n = c.node(HERE)
    assert (n.state, n.instances, n.leads, n.address) == ("ready", 3, ("web",), "127.0.1.1")


async def test_instances_spread_over_ready_nodes(h, autojump_clock):
    add_node(h, "n2", "127.0.1.2")
    await deploy_v1(h, replicas=4)
    assert spread(h) == {"n1": [0, 2], "n2": [1, 3]}
    assert {i.rec.address for i in h.svc.instances.values() if i.rec.node == "n2"} == {"127.0.1.2"}


async def test_a_rolling_update_keeps_the_spread(h, autojump_clock):
    add_node(h, "n2", "127.0.1.2")
    add_node(h, "n3", "127.0.1.3")
    await deploy_v1(h, replicas=3, update_batch=1)
    assert sorted(spread(h)) == ["n1", "n2", "n3"]
    v2 = h.write(manifest(image="/bin/v2", replicas=3, update_batch=1))
    assert h.cmd("apply").startswith("ok rolling")
    assert await h.settle() == f"done {v2}"
    # The old instances counted as well made the new ones pile up on the first nodes by name.
    assert sorted(len(slots) for slots in spread(h).values()) == [1, 1, 1], spread(h)


async def test_cordon_keeps_new_instances_off_and_a_start_waits_with_one_event(h, autojump_clock):
    await deploy_v1(h, replicas=2)
    assert node_cmd(h, "cordon", HERE) == "ok cordoned"
    assert node_cmd(h, "cordon", HERE) == "ok already cordoned"
    assert h.engine.nodes.status().node(HERE).state == "cordoned"
    h.cmd("scale", "3")
    await trio.sleep(5)
    assert len(h.svc.instances) == 2  # running ones stay; the third waits
    said = [e for e in h.events() if e.startswith("cannot start instance 2")]
    assert said == ["cannot start instance 2: no ready node in the cluster (n1 cordoned)"]
    assert node_cmd(h, "uncordon", HERE) == "ok uncordoned"
    await h.settle()
    assert len(h.svc.instances) == 3
    cluster = h.engine.events.current("").decode()
    assert "node n1 cordoned by uid=0: no new instances there" in cluster and "node n1 uncordoned by uid=0" in cluster


async def test_unknown_node_is_refused_and_nothing_changes(h, autojump_clock):
    with pytest.raises(CommandError) as e:
        node_cmd(h, "cordon", "n9")
    assert e.value.kind is Kind.NOT_FOUND and e.value.message == "no node 'n9' (known: n1)"
    assert not h.store.list_nodes()[0].cordoned


async def test_drain_of_the_only_node_is_refused_with_the_reason(h, autojump_clock):
    await deploy_v1(h, replicas=2)
    with pytest.raises(CommandError) as e:
        node_cmd(h, "drain", HERE)
    assert e.value.kind is Kind.BUSY
    assert e.value.message == ("drain n1: its instances have nowhere to move (web: no ready node in the cluster "
                               "(n1 cordoned)); nothing changed (cordon n1 keeps new instances off it)")
    rec = h.store.list_nodes()[0]
    assert not rec.cordoned and not rec.draining


async def test_drain_of_a_node_without_instances_cordons_it(h, autojump_clock):
    add_node(h, "n2", "127.0.1.2")
    assert node_cmd(h, "drain", "n2") == "ok drained (no instances there)"
    assert h.engine.nodes.status().node("n2").state == "cordoned"


async def test_drain_moves_instances_like_a_rollout_never_below_replicas(h, autojump_clock):
    add_node(h, "n2", "127.0.1.2")
    v1 = await deploy_v1(h, replicas=4)
    assert spread(h) == {"n1": [0, 2], "n2": [1, 3]}
    seen = watch(h, replicas=4)
    assert node_cmd(h, "drain", "n2") == "ok draining 2 instances"
    assert h.engine.nodes.status().node("n2").state == "draining"
    assert await h.settle() == f"done {v1}"
    assert set(spread(h)) == {"n1"} and len(h.svc.instances) == 4
    assert seen["min_ready"] >= 4 and seen["max_running"] == 5  # one moves at a time, replacement first
    assert h.svc.rec.version == v1 and h.svc.rec.update_status == "none"
    ev = h.events()
    assert "node n2 draining (by uid=0): instances 1, 3 move to other nodes" in ev
    assert any(e.startswith(f"move off node n2 complete: {v1}") for e in ev)
    cluster = h.engine.events.current("").decode()
    assert "node n2 draining by uid=0: 2 instances of web move to other nodes" in cluster
    assert "node n2 drained: no instances left there; it stays cordoned" in cluster
    n2 = h.engine.nodes.status().node("n2")
    assert (n2.state, n2.instances) == ("cordoned", 0)
    assert node_cmd(h, "uncordon", "n2") == "ok uncordoned"
    assert h.engine.nodes.status().node("n2").state == "ready"


async def test_the_nodes_directive_restricts_placement(h, autojump_clock):
    add_node(h, "n2", "127.0.1.2")
    await deploy_v1(h, replicas=3, nodes="n2")
    assert spread(h) == {"n2": [0, 1, 2]}
    h.write(manifest(replicas=3, nodes="n2 n3"))
    assert h.cmd("apply").startswith("ok")  # no part of the version: no rollout
    h.cmd("scale", "4")
    node_cmd(h, "cordon", "n2")
    await trio.sleep(3)
    assert "cannot start instance 3: no ready node in nodes n2 n3 (n2 cordoned, n3 unknown)" in h.events()
