"""The store (state/kv.py) on etcd vs SQLite, measured in the same run.

For each of SQLite (one machine), one etcd member and a 3-member etcd cluster
(real members on loopback, started as the tests start them: tests/etcd.py):
median get, put and conditional write (compare a revision, then put), the
delay from a write to a watcher holding it, and conditional writes per second
with 8 writers.  Then, on three members: from killing the member the client
talks to until a write succeeds, and from restarting two lost members (quorum
back) until a write succeeds.  Target: none yet (DESIGN §10 wants "a read on
other nodes within a second"); these are the foundation's numbers.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import AbstractAsyncContextManager
from typing import Callable

import trio

from common import machine  # noqa: F401  (also puts the repo on sys.path)
from deployfs.state.etcdkv import EtcdKV, Unavailable, open_etcd
from deployfs.state.kv import Compare, Conflict, KVStore, Put
from deployfs.state.sqlitekv import open_sqlite
from tests.etcd import Cluster, cluster

N = int(os.environ.get("N", 300))
WRITERS, SECONDS = 8, 2.0


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"{statistics.median(xs) * 1000:.2f} ms (p99 {xs[int(len(xs) * 0.99) - 1] * 1000:.2f})"


async def timed(op: Callable[[int], object]) -> list[float]:
    out = []
    for i in range(N):
        t = trio.current_time()
        await op(i)  # type: ignore[misc]
        out.append(trio.current_time() - t)
    return out


async def measure(name: str, opener: Callable[[], AbstractAsyncContextManager[KVStore]]) -> None:
    async with opener() as s:
        await s.put("bench/k", b"v" * 200)
        gets = await timed(lambda i: s.get("bench/k"))
        puts = await timed(lambda i: s.put(f"bench/p{i % 10}", b"v" * 200))

        async def cas(i: int) -> None:
            kv = (await s.get("bench/c")).kv
            await s.txn([Compare("bench/c", kv.mod_revision if kv else 0)], [Put("bench/c", str(i).encode())])
        t0 = trio.current_time()
        await timed(cas)
        cas_each = (trio.current_time() - t0) / N  # read + conditional write, as a writer does

        delays: list[float] = []
        async with s.watch("bench/w", 0) as revisions:
            for i in range(N // 3):
                t = trio.current_time()
                await s.put("bench/w", str(i).encode())
                await revisions.__anext__()
                delays.append(trio.current_time() - t)

        done = 0

        async def writer(w: int) -> None:
            nonlocal done
            key = f"bench/cw{w}"
            rev = 0
            end = trio.current_time() + SECONDS
            while trio.current_time() < end:
                try:
                    rev = await s.txn([Compare(key, rev)], [Put(key, b"x")])
                    done += 1
                except Conflict:
                    rev = (await s.get(key)).kv.mod_revision  # type: ignore[union-attr]
        async with trio.open_nursery() as n:
            for w in range(WRITERS):
                n.start_soon(writer, w)
        print(f"{name:>12}: get {ms(gets)}, put {ms(puts)}, read+conditional write {cas_each * 1000:.2f} ms, "
              f"write->watcher {ms(delays)}, {done / SECONDS:.0f} conditional writes/s with {WRITERS} writers")


async def until_writable(s: EtcdKV, key: str) -> float:
    t0 = trio.current_time()
    while True:
        try:
            await s.put(key, b"x")
            return trio.current_time() - t0
        except Unavailable:
            pass


async def outages(c: Cluster) -> None:
    async with open_etcd(c.urls, timeout=1.0) as s:
        await s.put("bench/o", b"x")
        victim = next(m for m in c.members if m.url == s.client.current_endpoint)
        t0 = time.monotonic()
        victim.stop(kill=True)
        killed = time.monotonic() - t0
        took = await until_writable(s, "bench/o")
        print(f"{'failover':>12}: the client's member SIGKILLed ({killed * 1000:.0f} ms to reap): "
              f"next write after {took * 1000:.0f} ms")
        c.start(victim)
        c.wait_healthy()
        lost = [m for m in c.members if m.url != s.client.current_endpoint][:2]
        for m in lost:
            m.stop(kill=True)
        t = trio.current_time()
        try:
            await s.put("bench/o", b"x")
        except Unavailable:
            print(f"{'quorum lost':>12}: a write is refused (Unavailable) after {trio.current_time() - t:.2f} s "
                  "(the client's timeout: 1 s)")
        for m in lost:
            c.start(m)
        took = await until_writable(s, "bench/o")
        print(f"{'quorum back':>12}: writes again {took * 1000:.0f} ms after the two members were restarted")


def main() -> None:
    print(machine())
    print(f"{N} operations each, values 200 bytes; etcd members on loopback with raft timings: heartbeat 25 ms, election 250 ms")
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        trio.run(measure, "sqlite", lambda: open_sqlite(os.path.join(tmp, "kv.db")))
    with cluster(1) as one:
        trio.run(measure, "etcd x1", lambda: open_etcd(one.urls))
    with cluster(3) as three:
        trio.run(measure, "etcd x3", lambda: open_etcd(three.urls))
        trio.run(outages, three)


if __name__ == "__main__":
    main()
