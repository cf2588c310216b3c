"""One machine: its controller and node agent on one store, and the view's source over them.

What ``deployfs serve`` wires between the layers (and what tests use to build the same).
:class:`LocalNode` builds the engine (the controller) and this node's agent, each with its
own objects, and runs them side by side: they meet only in the store's records
(docs/architecture.md, "Controller and node agent").  :func:`local_source` is the cache of the
records (fed by the store's watch, shown the writes a full disk keeps in memory), and the
narrow calls the view has besides the records -- commands to the engine, events from its log,
instances' output from the runtime's files, CPU and memory from ``/proc``, the metrics.
The cache must be running (``await nursery.start(cache.run)``) before the view is read.
"""

from __future__ import annotations

from typing import Any

import trio

from ..control.engine import Engine
from ..control.metrics import Metrics
from ..model.manifest import Manifest
from ..node.agent import NodeAgent
from ..node.cgroups import Limits
from ..node.health import Prober
from ..node.identity import UserPolicy
from ..node.runtime import Runtime
from ..state.cache import Cache
from ..state.logclient import RemoteLogs
from ..state.records import INSTANCES
from ..state.store import SqliteStore
from ..view.cached import CachedSource


class LocalNode:
    """The controller and this machine's node agent, as ``deployfs serve`` runs them.

    ``engine_kw`` go to :class:`Engine` (router, events, limits, node, address); the agent
    gets the runtime, the prober and where stray processes are looked for.  The engine is
    told what this host cannot enforce of a manifest's limits (it refuses those at apply)
    as a function of the manifest, not the runtime.
    """

    def __init__(self, store: SqliteStore, runtime: Runtime, prober: Prober | None = None, *,
                 state_dir: str | None = None, log_check_every: float = 0.05,
                 users: UserPolicy | None = None, **engine_kw: Any) -> None:
        def limit_problem(m: Manifest) -> tuple[str, str] | None:
            return runtime.limit_problem(Limits(m.memory, m.cpus, m.pids), m.nofile)

        self.store, self.runtime = store, runtime
        self.engine = Engine(store, users=users, limit_problem=limit_problem, **engine_kw)
        self.agent = NodeAgent(store.records, runtime, self.engine.node, prober=prober, users=users,
                               events=self.engine.events, state_dir=state_dir, log_check_every=log_check_every,
                               cache=store.cache(INSTANCES))
        self._scope: trio.CancelScope | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Old records get their intent, the agent adopts what runs, then the engine plans."""
        self.engine.prepare()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.agent.run)
                await nursery.start(self.engine.run)
                task_status.started()

    async def shutdown(self, *, keep_instances: bool = False) -> None:
        """The engine drains and stops every instance (unless kept), then both stop."""
        await self.engine.shutdown(keep_instances=keep_instances)
        if self._scope is not None:
            self._scope.cancel()

    def metrics(self) -> Metrics:
        """The engine's families, with the probes as this node's agent counts them."""
        return Metrics(self.engine, probes=self.agent.probes_of)


def local_source(node: LocalNode, metrics: Metrics | None = None,
                 remote_logs: RemoteLogs | None = None) -> tuple[CachedSource, Cache]:
    """``remote_logs``: how instances' output on other nodes is read (cluster mode; the caller closes it)."""
    store, engine = node.store, node.engine
    metrics = metrics or node.metrics()
    cache = store.cache()
    kv = store.kv
    source = CachedSource(cache, store, engine.events, engine, revision=lambda: kv.revision,
                          logs=node.runtime.log_parts, metrics=metrics.render, cost=metrics.cost, node=engine.node,
                          remote_logs=remote_logs)
    return source, cache
