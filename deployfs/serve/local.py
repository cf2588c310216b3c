"""The view's source for one machine: the records of an engine's SQLite store, through a cache.

What ``deployfs serve`` wires between the layers (and what tests use to build the same): the
cache of the records (fed by the store's watch, shown the writes a full disk keeps in memory),
and the narrow calls the view has besides the records -- commands to the engine, events from its
log, instances' output from the runtime's files, CPU and memory from ``/proc``, the metrics.
The cache must be running (``await nursery.start(cache.run)``) before the view is read.
"""

from __future__ import annotations

from ..control.engine import Engine
from ..control.metrics import Metrics
from ..state.cache import Cache
from ..state.store import SqliteStore
from ..view.cached import CachedSource


def local_source(engine: Engine, metrics: Metrics | None = None) -> tuple[CachedSource, Cache]:
    store = engine.store
    if not isinstance(store, SqliteStore):
        raise TypeError(f"the view of one machine reads a SQLite store, not {type(store).__name__}")
    metrics = metrics or Metrics(engine)
    usage = metrics.usage
    cache = store.cache()
    kv = store.kv

    def cost(pid: int) -> tuple[float, int] | None:  # from the metrics' pass over /proc
        c = usage.of(pid)
        return None if c is None else (c.cpu, c.rss)

    source = CachedSource(cache, store, engine.events, engine, revision=lambda: kv.revision,
                          logs=engine.runtime.log_parts, metrics=metrics.render, cost=cost, node=engine.node)
    return source, cache
