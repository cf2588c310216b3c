"""The metrics (docs/operations.md): the engine, the router and /proc as Prometheus families.

One collector builds every family at scrape time from what is already in
memory: the engine's services and instances with their counters
(control/stats.py), the router's counters from its last liveness answer
(no extra round trip per scrape) and each instance's CPU and memory from
node/usage.py (one pass over /proc per ``max_age``, however often scraped).
``prometheus_client`` writes the text, so the format is the reference one.

Two ways out, the same text: ``/deploy/metrics`` (rendered in the FUSE loop's
thread) and ``--metrics HOST:PORT`` (prometheus_client's HTTP server, in its
own threads: they ask the trio thread for the families and format them
themselves).  docs/operations.md lists every name and what it means.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Iterable, TypeVar

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..node.usage import Usage
from .engine import Engine, Instance
from ..model.histogram import Histogram

F = TypeVar("F", bound=Metric)
RENDER_REUSE = 0.5  # seconds the file's text is reused (getattr, then open, of one read)


def instance_state(i: Instance) -> str:
    return "draining" if i.leaving else i.rec.state


def _histogram(name: str, doc: str, service: str, h: Histogram) -> HistogramMetricFamily:
    f = HistogramMetricFamily(name, doc, labels=["service"])
    f.add_metric([service], h.cumulative(), h.sum)
    return f


# Per service: its probes' failures and durations, as the node agent counts them (None: none yet).
ProbeCounts = Callable[[str], "tuple[int, Histogram] | None"]


def families(engine: Engine, usage: Usage, router_stats: dict | None,
             probes: ProbeCounts = lambda name: None) -> list[Metric]:
    """Every deployfs family, now.  Runs in the trio thread: it reads the engine's live objects."""
    def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=labels)

    def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=labels)

    svc_l, inst_l = ["service"], ["service", "slot"]
    out: dict[str, Metric] = {}

    def fam(f: F) -> F:
        out[f.name] = f
        return f

    services = fam(gauge("deployfs_services", "Services deployed (listed under active/).", []))
    services.add_metric([], len(engine.services))
    info = fam(gauge("deployfs_service_info", "1 per service: the version in force and the previous one.",
                     ["service", "version", "previous_version"]))
    replicas = fam(gauge("deployfs_service_replicas", "Desired instance count (the replicas file).", svc_l))
    # Only the value in force, and only the states some instance is in: every line is paid
    # for in every scrape (a thousand instances), and an absent series reads as none.
    status = fam(gauge("deployfs_update_status", "1, labelled with the service's update_status.",
                       ["service", "status"]))
    health = fam(gauge("deployfs_service_health", "1, labelled with the service's aggregate health.",
                       ["service", "health"]))
    p_up = fam(gauge("deployfs_update_progress_ready",
                     "Instances of the target version that are up (update_progress, before the slash).", svc_l))
    p_want = fam(gauge("deployfs_update_progress_desired",
                       "The desired count update_progress compares with (after the slash).", svc_l))
    by_state = fam(gauge("deployfs_instances", "Instances by state (as in instances/N); absent: none.",
                         ["service", "state"]))
    by_health = fam(gauge("deployfs_instances_health", "Instances by health (as in instances/N); absent: none.",
                          ["service", "health"]))
    started = fam(counter("deployfs_rollouts_started", "Rollouts started (deploy, apply of a new version, "
                          "rollback, restart) since this server started.", svc_l))
    completed = fam(counter("deployfs_rollouts_completed", "Rollouts that completed since this server started.",
                            svc_l))
    failed = fam(counter("deployfs_rollouts_failed", "Rollouts that failed since this server started.", svc_l))
    restarts = fam(counter("deployfs_restarts", "Instance restarts (by the restart policy) since this server "
                           "started.", svc_l))
    probe_failures = fam(counter("deployfs_probe_failures", "Health checks that failed since this server "
                                 "started.", svc_l))
    i_info = fam(gauge("deployfs_instance_info", "1 per instance: its version, state and health.",
                       ["service", "slot", "version", "state", "health"]))
    i_restarts = fam(counter("deployfs_instance_restarts", "Restarts of this instance (restarts= in instances/N).",
                             inst_l))
    i_cpu = fam(counter("deployfs_instance_cpu_seconds", "CPU seconds (user+system) of the instance's processes "
                        "(its session), cpu= in instances/N.", inst_l))
    i_rss = fam(gauge("deployfs_instance_resident_memory_bytes", "Resident memory of the instance's processes "
                      "(its session), rss= in instances/N.", inst_l))
    histograms: list[Metric] = []

    for name, s in sorted(engine.services.items()):
        rec = s.rec
        info.add_metric([name, rec.version or "", rec.previous_version or ""], 1)
        replicas.add_metric([name], rec.replicas)
        status.add_metric([name, rec.update_status], 1)
        health.add_metric([name, s.health()], 1)
        up, want = s.progress()
        p_up.add_metric([name], up)
        p_want.add_metric([name], want)
        insts = s.by_slot()
        for st, n in sorted(Counter(instance_state(i) for i in insts).items()):
            by_state.add_metric([name, st], n)
        for st, n in sorted(Counter(i.rec.health for i in insts).items()):
            by_health.add_metric([name, st], n)
        stats = s.stats
        started.add_metric([name], stats.rollouts_started)
        completed.add_metric([name], stats.rollouts_completed)
        failed.add_metric([name], stats.rollouts_failed)
        restarts.add_metric([name], stats.restarts)
        failures, seconds = probes(name) or (0, Histogram(()))
        probe_failures.add_metric([name], failures)
        histograms.append(_histogram("deployfs_rollout_duration_seconds",
                                     "How long completed rollouts took, apply to done.", name, stats.rollout_seconds))
        histograms.append(_histogram("deployfs_probe_duration_seconds", "How long health checks took.", name,
                                     seconds))
        for i in insts:
            slot = str(i.rec.slot)
            i_info.add_metric([name, slot, i.rec.version, instance_state(i), i.rec.health], 1)
            i_restarts.add_metric([name, slot], i.rec.restarts)
            running = i.running
            cost = usage.of(i.rec.pid) if running else None
            if cost is not None:
                i_cpu.add_metric([name, slot], cost.cpu)
                i_rss.add_metric([name, slot], cost.rss)

    merged = _merge(histograms)
    return [*out.values(), *merged, *router_families(router_stats)]


def _merge(histograms: list[Metric]) -> list[Metric]:
    """One family per histogram name, the samples of every service in it."""
    by_name: dict[str, Metric] = {}
    for h in histograms:
        if h.name in by_name:
            by_name[h.name].samples.extend(h.samples)
        else:
            by_name[h.name] = h
    return list(by_name.values())


def router_families(stats: dict | None) -> list[Metric]:
    """The router's counters, per service and backend, as the router process keeps them.

    They live in the router, which outlives the server: a restarted server adopts it
    and reads the same counters on, so they do not reset.  They reset when the
    router itself is replaced (deployfs_router_start_time_seconds moves), and a
    backend's series ends once it is out of routing with no connection left.
    """
    up = GaugeMetricFamily("deployfs_router_up", "1 while the router answers its liveness ping.", labels=[])
    up.add_metric([], float(stats is not None))
    if not stats or "routes" not in stats:
        return [up]
    start = GaugeMetricFamily("deployfs_router_start_time_seconds",
                              "When the router process started (its counters count from here).", labels=[])
    if "started" in stats:  # the built-in router's; haproxy's counters restart with each worker
        start.add_metric([], float(stats["started"]))
    b_l = ["service", "backend"]
    active = GaugeMetricFamily("deployfs_router_connections_active", "Connections open to a backend now.",
                               labels=b_l)
    total = CounterMetricFamily("deployfs_router_connections", "Connections forwarded to a backend.", labels=b_l)
    failed = CounterMetricFamily("deployfs_router_connections_failed",
                                 "Connects to a backend that failed (refused or timed out; the next one was tried).",
                                 labels=b_l)
    refused = CounterMetricFamily("deployfs_router_connections_refused",
                                  "Client connections reset because no backend took them.", labels=["service"])
    rejected = CounterMetricFamily("deployfs_router_connections_rejected",
                                   "Client connections reset at the per-service cap (--max-conns).",
                                   labels=["service"])
    clients = GaugeMetricFamily("deployfs_router_client_connections", "Client connections held now.",
                                labels=["service"])
    for service, r in sorted(stats.get("routes", {}).items()):
        backends = {f"{h}:{p}" for h, p in r.get("backends", [])}
        for kind, fam in (("active", active), ("total", total), ("failed", failed)):
            counts = r.get(kind, {})
            for b in sorted(backends | counts.keys()):
                fam.add_metric([service, b], counts.get(b, 0))
        for key, f in (("refused", refused), ("rejected", rejected), ("open", clients)):
            if key in r:  # haproxy counts neither refusals nor the cap's resets this way
                f.add_metric([service], r[key])
    return [up, start, active, total, failed, refused, rejected, clients]


class _Collector(Collector):
    def __init__(self, get: Callable[[], list[Metric]]) -> None:
        self.get = get

    def collect(self) -> Iterable[Metric]:
        return self.get()


class Metrics:
    """The exposition of one engine: ``render()`` for the file, ``serve()`` for --metrics."""

    def __init__(self, engine: Engine | Callable[[], Engine | None], usage: Usage | None = None,
                 probes: ProbeCounts = lambda name: None, router: object = None) -> None:
        """``probes``: the node agent's probe counts (serve/local.py wires them: never through the engine).
        ``engine`` may be a function: a cluster node has the controller's families only while it leads
        (serve/cluster.py); its router's and its process's it always has."""
        self._engine = engine if callable(engine) and not isinstance(engine, Engine) else (lambda: engine)
        self.router = router if router is not None else engine.router if isinstance(engine, Engine) else None
        self.probes = probes
        self.usage = usage or Usage()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self._families))
        self._rendered: tuple[float, bytes] | None = None
        ProcessCollector(registry=self.registry)  # the server's own process_cpu_seconds_total, RSS, fds

    def cost(self, pid: int) -> tuple[float, int] | None:
        """A process's (CPU seconds, resident bytes), from the last pass over /proc; None if gone."""
        c = self.usage.of(pid)
        return None if c is None else (c.cpu, c.rss)

    @property
    def engine(self) -> Engine | None:
        return self._engine()

    def _router_stats(self) -> dict | None:  # a TableFeeder's; other routers have none
        return getattr(self.router, "last_stats", None)

    def _families(self) -> list[Metric]:
        engine = self.engine
        if engine is None:
            return router_families(self._router_stats())
        return families(engine, self.usage, self._router_stats(), self.probes)

    def render(self) -> bytes:
        """The text, from the trio thread (the /deploy/metrics file).

        One `cat` asks twice (the size at getattr, the text at open), and `ls -l` once
        more: within RENDER_REUSE seconds the same text serves them all.
        """
        now = time.monotonic()
        if self._rendered is None or now - self._rendered[0] >= RENDER_REUSE:
            self._rendered = (now, generate_latest(self.registry))
        return self._rendered[1]

    def serve(self, host: str, port: int) -> Callable[[], None]:
        """Serve the same text at http://HOST:PORT/metrics; returns the function that stops it.

        Call from the trio thread.  Scrapes run in the server's threads: they do the
        /proc pass there, then ask the trio thread for the families (it alone may
        read the engine), and format the text themselves.
        """
        token = trio.lowlevel.current_trio_token()

        def from_trio() -> list[Metric]:
            self.usage.costs()  # the pass over /proc, if due, here: not in the FUSE loop
            try:
                return trio.from_thread.run_sync(self._families, trio_token=token)
            except trio.RunFinishedError:
                return []  # shutting down

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(from_trio))
        ProcessCollector(registry=registry)
        server, thread = start_http_server(port, addr=host, registry=registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(5)
        return stop
