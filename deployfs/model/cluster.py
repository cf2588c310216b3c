"""What a node and the cluster look like from outside: plain data, and the one rule
that turns a node's record and liveness into its state.  Pure.

``/deploy/nodes/<name>`` and ``/deploy/cluster`` (docs/cluster.md) render these;
placement (:mod:`.placement`) and the engine read :func:`node_state` too, so
the file and the decision never disagree about which nodes can take work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol, Sequence

# A node's name is a file name under /deploy/nodes/ and a key in etcd: a host-name-like label.
NODE_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")

READY, CORDONED, DRAINING, DOWN = "ready", "cordoned", "draining", "down"


def valid_node_name(name: str) -> bool:
    return NODE_NAME_RE.fullmatch(name) is not None


def node_state(*, alive: bool, cordoned: bool, draining: bool, instances: int) -> str:
    """down (no live server holds it) | draining (a drain with instances still to move) |
    cordoned (no new instances; a finished drain stays cordoned) | ready."""
    if not alive:
        return DOWN
    if draining and instances:
        return DRAINING
    return CORDONED if cordoned or draining else READY


@dataclass(frozen=True)
class NodeStatus:
    name: str
    address: str
    state: str  # ready | cordoned | draining | down
    instances: int  # of every service, leaving ones included: what runs there
    leads: tuple[str, ...]  # the services whose rollouts this node drives
    seen: float  # wall clock: when it was last known alive (now, for a live node)


@dataclass(frozen=True)
class ClusterStatus:
    store: str  # ok | unreachable
    leader: str  # the node that leads the cluster (declares nodes down); "" when none is known
    nodes: tuple[NodeStatus, ...] = ()  # by name
    leaders: dict[str, str] = field(default_factory=dict)  # service -> the node that leads it

    def node(self, name: str) -> NodeStatus | None:
        return next((n for n in self.nodes if n.name == name), None)

    @property
    def ready(self) -> int:
        return sum(1 for n in self.nodes if n.state == READY)


class NodeFacts(Protocol):
    """What a node's record holds (state/records.py NodeRecord)."""
    name: str
    address: str
    cordoned: bool
    draining: bool
    joined: float


def cluster_status(nodes: Iterable[NodeFacts], instances: Mapping[str, int], services: Sequence[str], *,
                   alive: Callable[[str], bool], leader: str, now: float, store: str = "ok") -> ClusterStatus:
    """The nodes as the files show them.  ``instances``: per node, every instance there (leaving ones
    too); ``leader`` leads the cluster and, until each service elects its own, every service."""
    leads = tuple(sorted(services))
    shown = tuple(NodeStatus(r.name, r.address,
                             node_state(alive=alive(r.name), cordoned=r.cordoned, draining=r.draining,
                                        instances=instances.get(r.name, 0)),
                             instances.get(r.name, 0), leads if r.name == leader else (),
                             now if alive(r.name) else r.joined)
                  for r in sorted(nodes, key=lambda r: r.name))
    return ClusterStatus(store=store, leader=leader, nodes=shown, leaders={s: leader for s in leads})
