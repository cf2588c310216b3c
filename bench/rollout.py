"""Rollout speed: 20 replicas, batch 5, pause 0, health_interval 0.1, real processes.

The ideal, measured in the same run: ceil(N/b) x (start-to-ready of a batch
of b instances started together + stop of b old ones).  Target: total <= 1.05 x ideal.
Both are medians of ROUNDS samples: on a shared 2-core machine one sample
swings by +-20%.
Also: time from a bad instance's first failure to `failed`, against the bound
(health_retries x health_interval for an instance that turns unhealthy; the
exit itself for one that dies).
"""

import math
import os
import statistics
import sys
import tempfile

import trio

from common import ROOT, machine

from deployfs.serve.local import LocalNode
from deployfs.node.health import Probes
from deployfs.node.runtime import LocalRuntime
from deployfs.state.store import SqliteStore

SERVICE = os.path.join(ROOT, "examples", "web.py")
N, B, INTERVAL, RETRIES = 20, 5, 0.1, 3
ROUNDS = 3


def manifest(version: str, extra: str = "", replicas: int = N, port: int = 19000) -> bytes:
    return (f"image {sys.executable}\nargs {SERVICE} --port $PORT --version {version} {extra}\n"
            f"replicas {replicas}\nport {port}\nhealth http://127.0.0.1:$PORT/healthz\n"
            f"health_interval {INTERVAL}\nhealth_timeout 0.1\nhealth_retries {RETRIES}\nupdate_batch {B}\n"
            "update_pause 0\nupdate_deadline 10\ndrain_timeout 0\nstop_timeout 5\n").encode()


async def outcome(svc) -> str:
    while (out := svc.outcome()) is None:
        await svc.wait_change()
    return out


async def main() -> None:
    d = tempfile.mkdtemp(prefix="bench-rollout-")
    store, probes = SqliteStore(d), Probes()
    node = LocalNode(store, LocalRuntime(d), probes, state_dir=d)
    e = node.engine
    async with trio.open_nursery() as n:
        await n.start(node.run)

        # The ideal's parts, measured here: a batch of B instances started
        # together until all are ready, and B old instances stopped together.
        ready_times, stop_times = [], []
        for i in range(ROUNDS):
            store.put_file("one", manifest(f"p{i}", replicas=B, port=19001))  # a service's port is its own
            t0 = trio.current_time()
            e.command("one", "apply", None, "bench")
            await outcome(e.services["one"])
            ready_times.append(trio.current_time() - t0)
            t0 = trio.current_time()
            e.command("one", "stop", None, "bench")
            while e.services["one"].instances:
                await e.services["one"].wait_change()
            stop_times.append(trio.current_time() - t0)
        start_to_ready, stop = statistics.median(ready_times), statistics.median(stop_times)
        ideal = math.ceil(N / B) * (start_to_ready + stop)

        store.put_file("web", manifest("v1"))
        e.command("web", "apply", None, "bench")
        svc = e.services["web"]
        await outcome(svc)
        totals = []
        for i in range(ROUNDS):
            store.put_file("web", manifest(f"v{i + 2}"))
            t0 = trio.current_time()
            e.command("web", "apply", None, "bench")
            await outcome(svc)
            totals.append(trio.current_time() - t0)
        total = statistics.median(totals)

        # Time to detect: a version that dies at once, and one that turns unhealthy.
        detect = {}
        for name, extra in [("exits at start", "--exit-at-start 1"), ("turns unhealthy", "--fail-health-after 0.4")]:
            store.put_file("web", manifest(f"bad-{name[:4]}", extra))
            e.command("web", "apply", None, "bench")
            out = await outcome(svc)
            assert out.startswith("failed"), out
            detect[name] = float(out.rsplit("detected ", 1)[1].split("s", 1)[0])
            e.command("web", "rollback", None, "bench")
            await outcome(svc)
        await node.shutdown()
    await probes.aclose()
    print(f"bench/rollout.py on {machine()}")
    print(f"{N} replicas, batch {B}, pause 0, health_interval {INTERVAL}s")
    print(f"measured per batch of {B}: start-to-ready {start_to_ready * 1000:.0f} ms, stop {stop * 1000:.0f} ms")
    print(f"rollout {total:.2f} s vs ideal {ideal:.2f} s = {total / ideal:.2f}x (target <= 1.05x; medians of {ROUNDS}: "
          f"rollouts {min(totals):.2f}-{max(totals):.2f} s, batch start-to-ready "
          f"{min(ready_times) * 1000:.0f}-{max(ready_times) * 1000:.0f} ms)")
    bound = RETRIES * INTERVAL
    for name, t in detect.items():
        print(f"bad release that {name}: failed {t:.2f} s after its first failure "
              f"(bound {bound:.1f} s = health_retries x health_interval)")


if __name__ == "__main__":
    trio.run(main)
