"""The records deployfs keeps, and where each lives in the store.

Every record is a JSON value under a key (docs/architecture.md): a store of any kind --
SQLite here, etcd in a cluster -- holds them the same way, and a reader of
the store's watch (:mod:`.cache`) decodes them with the functions below.

=====================================  ==========================================
``services/<svc>``                     :class:`ServiceRecord`
``instances/<svc>/<id, 12 digits>``    :class:`InstanceRecord` (ids sort as numbers)
``versions/<svc>/<version>``           the manifest text of every version applied
``manifests/<name>``                   a file under ``manifests/``: ``{"mtime", "data"}``
                                       (data in base64: a file may hold any bytes)
``events/<svc>/<segment>/<seq>``       ``{"ts", "text"}``, both numbers zero-padded;
                                       the cluster's own log is the service ``""``
``meta/next-instance-id``              the next instance id: ids are never reused
``nodes/<name>``                       :class:`NodeRecord` (node/membership.py writes it in a
                                       cluster, the engine on one machine)
``routes/<svc>``                       :class:`RouteRecord`: the routing table every node's
                                       router follows (traffic/published.py, follower.py)
``routed/<svc>/<node>``                :class:`RouteAck`: what that node's router has applied
=====================================  ==========================================
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")

@dataclass
class ServiceRecord:
    name: str
    version: str | None = None  # the version in force (the rollout target)
    previous_version: str | None = None  # the rollback target (see Service.set_previous)
    manifest: str = ""  # the manifest text in force
    previous_manifest: str = ""  # kept for rollback
    # The last version that completed a rollout, and the one that completed before it:
    # only these may become a rollback target, never a release that failed or was abandoned.
    good_version: str | None = None
    good_manifest: str = ""
    good_generation: int = 0
    before_good_version: str | None = None
    before_good_manifest: str = ""
    generation: int = 0  # bumped by `restart`: same version, fresh instances
    replicas: int = 0
    update_status: str = "none"  # none | rolling | paused | canary | failed
    steps: int = 0  # batches `step` may still start while paused
    failure: str = ""
    stopped: bool = False
    rollout_from: str | None = None
    deleting: bool = False  # `delete`: stopping everything, then the records go
    # logs/<name> -> instance id: the output of instances gone that is worth
    # reading (`failed-3` of the last failed rollout, `stopped-0` after stop)
    kept_logs: dict[str, int] = field(default_factory=dict)
    rollout_started: float | None = None  # wall clock: a rollout's duration survives a restart of deployfs
    canary_phase: bool = False  # an `update canary` rollout not yet promoted (or rolled back)
    rolled_back: str = ""  # auto_rollback: why the last rollout failed, once it rolled back by itself
    # When the last batch of the rollout ended (wall clock; the update_pause runs from it):
    # None mid-batch, 0 long ago.
    batch_ended: float | None = 0.0
    # When `pause` held a canary phase (wall clock): auto_promote counts no paused time, across a restart too.
    paused_at: float | None = None


@dataclass
class InstanceRecord:
    service: str
    id: int
    slot: int
    version: str
    generation: int = 0
    pid: int | None = None
    start_time: int | None = None  # /proc/<pid>/stat field 22: tells a reused pid apart
    port: int | None = None
    node: str = ""  # the node that runs it ("" in a record from before nodes were recorded)
    address: str = "127.0.0.1"  # where it listens, with ``port``
    state: str = "starting"  # starting | running | draining | stopped | exited | failed
    health: str = "starting"  # starting | healthy | unhealthy | stopped | failed
    restarts: int = 0
    started: float = field(default_factory=time.time)
    # What the supervisor saw last, so a server started on the same state carries on
    # (times are wall clock): the planner's phase, why, how it last exited, its recent restarts.
    phase: str = "starting"
    why: str = ""
    exit_ok: bool = False
    last_exit: float | None = None
    restart_times: list[float] = field(default_factory=list)
    oom_kills: int = 0  # times the kernel killed it for its memory limit
    first_bad: float | None = None  # unhealthy: when its failing streak began (wall clock)
    # The controller's intent for the node agent (node/agent.py): run | stop; "" the engine
    # supervises it in-process. ``incarnation``: the ``restarts`` its process was started for,
    # written by the agent (bumping ``restarts`` past it asks for a fresh process).
    desired: str = ""
    incarnation: int = -1
    # Its node went down and the controller replaced it (docs/cluster.md): no longer one of the
    # service's instances; kept, ``desired stop``, so that node stops it if it comes back.
    lost: bool = False


@dataclass
class NodeRecord:
    """A node the cluster knows, kept after it dies (whether it is alive is another key's
    business: ``alive/<name>`` under its lease in a cluster; on one machine, this server)."""
    name: str
    address: str = "127.0.0.1"  # where its instances listen and its router is reached
    cordoned: bool = False  # no new instance is placed there
    draining: bool = False  # `drain`: its instances move elsewhere (set with cordoned)
    joined: float = 0.0  # wall clock of its last join (a server's start)
    # Where its log server answers, on ``address`` (node/logserver.py): other nodes read its
    # instances' output there. 0: it serves none (one machine, --log-port 0, an older version).
    log_port: int = 0


@dataclass
class RouteRecord:
    """A service's routing table as the controller publishes it: every node's follower
    (traffic/follower.py) feeds it to that node's router, so a client may use any node."""
    service: str
    port: int | None = None
    protocol: str = "tcp"  # tcp | http (docs/traffic.md)
    # [address, port, node] of each backend: a follower drops those of a node it sees down at
    # once, without waiting for the controller to write a new table.
    backends: list[list[Any]] = field(default_factory=list)
    weights: list[int] | None = None  # one per backend (None: even)


@dataclass
class RouteAck:
    """A node's answer to ``routes/<svc>``: the table it applied, and what it still drains."""
    node: str
    revision: int = 0  # the mod_revision of the route record its router has
    draining: list[list[Any]] = field(default_factory=list)  # [address, port]: removed, connections open here
    error: str = ""  # why its router could not take the table (it could not listen), else ""
    port_problem: str = ""  # the model.errors.Kind of that error, by name


@dataclass(frozen=True)
class Event:
    seq: int
    segment: int
    ts: float
    text: str


@dataclass(frozen=True)
class ManifestFile:
    name: str
    data: bytes
    mtime: float


# The controller's intents for an instance (``InstanceRecord.desired``): run it; drain it (out of the
# router, then stop); stop it. Read by the node agent, the engine and the view alike.
RUN, DRAIN, STOP = "run", "drain", "stop"
ALIVE = ("running", "draining")  # instance states with a process (pid shown, counted as running)


# -- where records live -------------------------------------------------------------------

SERVICES = "services/"
INSTANCES = "instances/"
VERSIONS = "versions/"
MANIFESTS = "manifests/"
EVENTS = "events/"
NEXT_INSTANCE_ID = "meta/next-instance-id"
NODES = "nodes/"  # the same keys as node/membership.py's
# A cluster's (docs/cluster.md): the controller's key, held under its node's lease; ctl
# writes on any node for it, its replies, and events said on any node for it to write.
LEADER = "leader"
ROUTES = "routes/"
ROUTED = "routed/"
COMMANDS = "commands/"
REPLIES = "replies/"
SAY = "say/"


def service_key(name: str) -> str:
    return SERVICES + name


def instances_prefix(service: str) -> str:
    return f"{INSTANCES}{service}/"


def instance_key(service: str, id: int) -> str:
    return f"{INSTANCES}{service}/{id:012d}"


def version_key(service: str, version: str) -> str:
    return f"{VERSIONS}{service}/{version}"


def node_key(name: str) -> str:
    return NODES + name


def route_key(service: str) -> str:
    return ROUTES + service


def routed_key(service: str, node: str) -> str:
    return f"{ROUTED}{service}/{node}"


def manifest_key(name: str) -> str:
    return MANIFESTS + name


def events_prefix(service: str, segment: int | None = None) -> str:
    return f"{EVENTS}{service}/" if segment is None else f"{EVENTS}{service}/{segment:010d}/"


def event_key(service: str, segment: int, seq: int) -> str:
    return f"{events_prefix(service, segment)}{seq:012d}"


# -- values ---------------------------------------------------------------------------------


def encode(rec: ServiceRecord | InstanceRecord | NodeRecord | RouteRecord | RouteAck) -> bytes:
    return json.dumps(asdict(rec)).encode()


def decode(cls: type[T], data: bytes | str) -> T:
    """A record from its JSON; keys this version does not know are ignored, so a
    field can be dropped (or added by a newer writer) without breaking a read."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in json.loads(data).items() if k in known})


def decode_node(key: str, value: bytes) -> NodeRecord:
    """``nodes/<name>``: the name is the key's (membership.py writes none in the value)."""
    d = json.loads(value)
    return decode(NodeRecord, json.dumps({**(d if isinstance(d, dict) else {}), "name": key[len(NODES):]}))


def encode_file(data: bytes, mtime: float) -> bytes:
    return json.dumps({"mtime": mtime, "data": base64.b64encode(data).decode()}).encode()


def decode_file(name: str, value: bytes) -> ManifestFile:
    d = json.loads(value)
    return ManifestFile(name, base64.b64decode(d["data"]), float(d["mtime"]))


def encode_event(ts: float, text: str) -> bytes:
    return json.dumps({"ts": ts, "text": text}).encode()


def decode_event(key: str, value: bytes) -> Event:
    segment, seq = key.rsplit("/", 2)[1:]
    d = json.loads(value)
    return Event(int(seq), int(segment), float(d["ts"]), d["text"])
