"""A node that dies, and one that comes back, on the fake runtime under MockClock.

A second node here is a record with a node agent of its own on the same store, alive while
the test says so (a cluster's liveness is its ``alive/`` key); each change of liveness is
told to the engine as serve tells it (``Engine.liveness_changed``).  Its death is its agent
cancelled (and, for a machine's death, its processes gone); its return is a new agent on
the same runtime, as a restarted ``deployfs serve`` on that machine would be."""

from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import trio

from deployfs.node.agent import NodeAgent
from deployfs.state.records import INSTANCES
from deployfs.state.store import NodeRecord
from tests.control.harness import Harness, deploy_v1, manifest, watch
from tests.control.test_nodes import HERE, h, spread  # noqa: F401 (h: the fixture, one engine on n1)


class Node2:
    """Node n2 beside the engine's n1: its record, its agent, its liveness."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.up = {HERE, "n2"}
        h.engine.nodes.put(NodeRecord("n2", "127.0.1.2"))
        h.engine.nodes.alive = lambda n: n in self.up
        self.scope = trio.CancelScope()
        self.start()
        h.engine.liveness_changed()

    def start(self) -> None:
        h = self.h
        agent = NodeAgent(h.store.records, h.rt, "n2", prober=h.prober, events=h.engine.events,
                          cache=h.store.cache(INSTANCES))
        self.scope = scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await agent.run()
        h.nursery.start_soon(run)

    def pids(self) -> list[int]:
        return [r.pid for r in self.h.store.list_instances("web") if r.node == "n2" and r.pid]

    def die(self, *, machine: bool = True) -> None:
        """Silent past its TTL: its agent is gone; with the machine, its processes too (else a
        partition or a SIGSTOP: they run on, unseen)."""
        self.scope.cancel()
        if machine:
            for pid in self.pids():
                self.h.rt.procs[pid].exit(137)
        self.up.discard("n2")
        self.h.engine.liveness_changed()

    def back(self) -> None:
        self.start()
        self.up.add("n2")
        self.h.engine.liveness_changed()


@asynccontextmanager
async def serving_two_nodes(tmp_path) -> AsyncIterator[tuple[Harness, trio.Nursery, "Node2"]]:
    """An engine on n1 and a second node's agent, a service of two instances over both."""
    h = Harness(tmp_path)
    h.local(node=HERE, address="127.0.1.1")
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        h.nursery = n
        n2 = Node2(h)
        await deploy_v1(h, replicas=2)
        yield h, n, n2


async def new_controller(h: Harness, n: trio.Nursery, alive: Callable[[str], bool]) -> None:
    """Another controller over the same records, as a cluster's next leader starts
    (one machine's join would take a silent node's records as its own: cluster mode)."""
    h.local(node=HERE, address="127.0.1.1")
    h.engine.nodes.cluster = True
    h.engine.nodes.alive = alive
    await n.start(h.node.run)


def cluster_events(h: Harness) -> list[str]:
    return [l.split(" ", 1)[1] for l in h.engine.events.current("").decode().splitlines()]


def lost_records(h: Harness) -> list[tuple[int, str, str]]:
    return sorted((r.slot, r.node, r.desired) for r in h.store.list_instances("web") if r.lost)


async def test_a_dead_nodes_instances_are_replaced_at_once_and_its_return_stops_them(h, autojump_clock):
    n2 = Node2(h)
    v1 = await deploy_v1(h, replicas=4)
    assert spread(h) == {"n1": [0, 2], "n2": [1, 3]}
    seen = watch(h, replicas=4)
    n2.die()
    await trio.sleep(0.01)  # one pass of the loop: the replacements are asked for at once
    assert spread(h) == {"n1": [0, 1, 2, 3]}
    assert h.engine.nodes.status().node("n2").state == "down"
    ev = h.events()
    assert "node n2 down: instances 1, 3 lost, replaced on other nodes" in ev
    assert "instance 1 replaces 1 (node n2 down)" in ev and "instance 3 replaces 3 (node n2 down)" in ev
    assert "node n2 down: its instances are lost and replaced on other nodes (web 1, 3)" in cluster_events(h)
    assert await h.settle() == f"done {v1}"
    assert seen["max_running"] <= 5 and len(h.rt.running("web")) == 4
    # The lost records stay, for n2 to stop what it runs if it comes back; they are no instances of web.
    assert lost_records(h) == [(1, "n2", "stop"), (3, "n2", "stop")]
    assert len(h.svc.instances) == 4 and h.svc.health() == "healthy"

    n2.back()  # the machine restarted: its processes died with it, its agent finds their records
    with trio.fail_after(10):
        while lost_records(h):
            await trio.sleep(0.05)
    assert len(h.store.list_instances("web")) == 4 and not h.svc.lost
    assert "instance 1 of node n2 (replaced while it was down): its node came back and stopped it; " \
           "its record goes" in h.events()
    assert "node n2 is back: it stops the instances replaced while it was down, and takes new ones" \
        in cluster_events(h)
    assert h.engine.nodes.status().node("n2").state == "ready"
    h.cmd("scale", "6")  # it rejoined: placement uses it again
    await h.settle()
    assert spread(h)["n2"] == [4, 5]


async def test_a_node_cut_off_stops_its_replaced_processes_when_it_returns(h, autojump_clock):
    n2 = Node2(h)
    await deploy_v1(h, replicas=2)
    stale = n2.pids()
    assert len(stale) == 1
    n2.die(machine=False)  # cut off (a partition, SIGSTOP): its process runs on, unseen
    await h.settle()
    assert spread(h) == {"n1": [0, 1]} and len(h.rt.running("web")) == 3
    n2.back()
    with trio.fail_after(10):
        while lost_records(h):
            await trio.sleep(0.05)
    proc = h.rt.procs[stale[0]]
    assert proc.exited and proc.signals == [15]  # stopped as any stop is (no routing to drain: it is lost)
    assert len(h.rt.running("web")) == 2 and len(h.store.list_instances("web")) == 2


async def test_a_rollout_in_flight_when_a_node_dies_completes_within_the_surge(h, autojump_clock):
    n2 = Node2(h)
    await deploy_v1(h, replicas=4)
    seen = watch(h, replicas=4)
    v2 = h.write(manifest(image="/bin/v2", replicas=4, update_pause=1))
    assert h.cmd("apply").startswith("ok rolling")
    with trio.fail_after(10):  # the first batch is ready and an old one retired: mid-rollout
        while not any(i.rec.version == v2 and i.phase.value == "ready" for i in h.svc.instances.values()):
            await trio.sleep(0.05)
    n2.die()
    assert await h.settle() == f"done {v2}"
    assert {i.rec.version for i in h.svc.instances.values()} == {v2} and set(spread(h)) == {"n1"}
    assert len(h.svc.instances) == 4 and len(h.rt.running("web")) == 4
    assert seen["max_running"] <= 5  # replicas + update_batch, the lost ones not running anywhere
    assert any(e.startswith("instance ") and e.endswith("(node n2 down)") for e in h.events())


async def test_every_node_down_at_once_replaces_nothing_and_says_so_once(h, autojump_clock):
    n2 = Node2(h)
    await deploy_v1(h, replicas=4)
    n2.up.clear()  # every lease lapsed together: an outage of the store
    for _ in range(3):
        h.engine.liveness_changed()
    await trio.sleep(2)
    assert spread(h) == {"n1": [0, 2], "n2": [1, 3]} and not lost_records(h)
    said = [e for e in cluster_events(h) if e.startswith("every node looks down at once")]
    assert said == ["every node looks down at once (n1, n2): more likely the cluster store than the machines; "
                    "nothing is replaced until a node is seen alive"]
    n2.up.update({HERE, "n2"})  # the store is back, every node with it
    h.engine.liveness_changed()
    await trio.sleep(2)
    assert spread(h) == {"n1": [0, 2], "n2": [1, 3]} and not lost_records(h)
    assert not any("down:" in e for e in cluster_events(h) + h.events())


async def test_liveness_is_not_acted_on_before_serve_says_it_is_known(tmp_path, autojump_clock):
    async with serving_two_nodes(tmp_path) as (h, n, n2):
        await h.node.shutdown(keep_instances=True)
        n2.scope.cancel()
        # A controller starting over the same records, while n2's key is not seen yet (the view not loaded).
        await new_controller(h, n, alive=lambda name: name == HERE)
        await trio.sleep(2)
        assert spread(h) == {"n1": [0], "n2": [1]} and not lost_records(h)
        h.engine.liveness_changed()  # loaded: n2 really is silent
        await h.settle()
        assert spread(h) == {"n1": [0, 1]} and lost_records(h) == [(1, "n2", "stop")]
        n.cancel_scope.cancel()


async def test_a_removed_nodes_lost_records_go_at_once(h, autojump_clock):
    n2 = Node2(h)
    await deploy_v1(h, replicas=2)
    n2.die(machine=False)
    await h.settle()
    assert lost_records(h) == [(1, "n2", "stop")]
    h.store.delete_node("n2")
    h.engine.nodes.reload()
    h.engine.liveness_changed()
    await trio.sleep(0.01)
    assert not lost_records(h) and len(h.store.list_instances("web")) == 2
    assert "instance 1 of node n2 (replaced while it was down): node n2 is no longer known; its record goes" \
        in h.events()


async def test_a_new_controller_carries_on_with_the_lost_records_of_the_one_before(tmp_path, autojump_clock):
    async with serving_two_nodes(tmp_path) as (h, n, n2):
        n2.die(machine=False)
        await h.settle()
        assert lost_records(h) == [(1, "n2", "stop")]
        await h.node.shutdown(keep_instances=True)  # the controller moves (another node leads)
        await new_controller(h, n, alive=lambda name: name in n2.up)
        await trio.sleep(1)  # before liveness is known: the lost one is none of web's all the same
        assert spread(h) == {"n1": [0, 1]} and list(h.svc.lost)
        h.engine.liveness_changed()
        await h.settle()
        assert spread(h) == {"n1": [0, 1]} and list(h.svc.lost) and len(h.rt.running("web")) == 3
        n2.back()
        with trio.fail_after(10):
            while lost_records(h):
                await trio.sleep(0.05)
        assert not h.svc.lost and len(h.rt.running("web")) == 2 and spread(h) == {"n1": [0, 1]}
        n.cancel_scope.cancel()


async def test_a_start_long_after_a_loss_is_no_replacement(h, autojump_clock):
    n2 = Node2(h)
    await deploy_v1(h, replicas=2)
    h.engine.command(HERE, "cordon", None, "uid=0")
    n2.die()  # slot 1 lost, and nowhere to replace it
    await trio.sleep(2)
    assert "cannot start instance 1: no ready node in the cluster (n1 cordoned, n2 down)" in h.events()
    h.cmd("stop")
    await h.settle()
    h.engine.command(HERE, "uncordon", None, "uid=0")
    assert h.cmd("apply").startswith("ok")  # started again: new instances, no replacements
    await h.settle()
    assert len(h.svc.instances) == 2 and not [e for e in h.events() if "replaces" in e]
