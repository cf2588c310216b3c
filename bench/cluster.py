"""Cluster mode (issue 13) against one machine, measured in the same run.

One machine: one `deployfs serve` on SQLite.  Cluster: three etcd members and three
`deployfs serve --cluster` nodes on 127.0.1.1-3 with --node-ttl 2, the tests' cluster
(tests/cluster/harness.py).  Everything through the real mounts, with real instances
(examples/web.py, health-checked over http every 0.1 s):

- ctl write to first instance started: from `echo apply` on the ctl until the instance's
  process exists; in the cluster the write is on n1 and the instance placed on n2 (`nodes n2`).
- a rollout of 6 replicas, batch 2: from `echo apply` until `cat wait` answers, on one
  machine and over three nodes.
- a dead node's instances replaced: a node SIGKILLed with its instances (machine death) until
  the service (3 replicas, one on each node) runs all of them healthy on the others again, against the TTL; on one machine, the
  nearest operation: an instance SIGKILLed until it is running again.
- etcd writes per rollout: etcd's revision before and after (one per committed write), and the
  same count of the SQLite store's revisions on one machine.
Medians of ROUNDS (env, default 3).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time

import httpx

from common import machine  # noqa: F401  (also puts the repo on sys.path)
from deployfs.node.runtime import marked_processes, marker_prefix
from deployfs.state.statedir import DB_NAME
from tests import mount as _mount
from tests.cluster import harness
from tests.cluster.harness import Node, instances, manifest, placed, running_cluster

ROUNDS = int(os.environ.get("ROUNDS", 3))
TTL = 2
PORT = 21480  # service ports 21480-21499 (the harness's share of the tests' range)
FAST = {"health_interval": 0.1, "health_timeout": 0.5, "drain_timeout": 0, "update_pause": 0}


def until(pred, timeout: float, what: str) -> float:
    return harness.until(pred, timeout, what, step=0.005)  # fine-grained: some figures are tens of ms


def ctl(where, command: str) -> None:
    r = where.sh(f"echo {command!r} > ctl")
    if r.returncode:
        raise SystemExit(f"{command}: {r.stderr}")


def processes(state: str) -> set[int]:
    return set(marked_processes(marker_prefix(state)))


def first_start(writer, state: str, name: str, text: str) -> float:
    """From the ctl write until a new process exists for `state` (the node the instance goes to)."""
    writer.write_manifest(name, text)
    before = processes(state)
    t0 = time.monotonic()
    ctl(writer, f"apply {name}")
    until(lambda: processes(state) - before, 20, f"{name}'s instance")
    took = time.monotonic() - t0
    writer.sh(f"cat active/{name}/wait", timeout=30)
    ctl(writer, f"stop {name}")
    return took


def rollout(writer, name: str, version: str) -> float:
    writer.write_manifest(name, manifest(PORT + 1, version, replicas=6, update_batch=2, **FAST))
    t0 = time.monotonic()
    ctl(writer, f"apply {name}")
    out = writer.sh(f"cat active/{name}/wait", timeout=60).stdout
    if not out.startswith("done"):
        raise SystemExit(f"rollout {version}: {out}")
    return time.monotonic() - t0


def etcd_revision(url: str) -> int:
    r = httpx.post(url + "/v3/kv/range", json={"key": "AA=="}, timeout=5, trust_env=False)
    return int(r.json()["header"]["revision"])


def sqlite_revision(state: str) -> int | None:
    try:
        db = sqlite3.connect(f"file:{os.path.join(state, DB_NAME)}?mode=ro", uri=True, timeout=1)
        return int(db.execute("SELECT value FROM kv_meta WHERE name = 'revision'").fetchone()[0])
    except sqlite3.Error:
        return None  # held exclusively (the full-disk path): not counted


def one_machine(root: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"start": [], "rollout": [], "restart": [], "writes": []}
    m = _mount.start(root, "--ports", "21460-21479")
    try:
        for i in range(ROUNDS):
            out["start"].append(first_start(m, m.state, f"s{i}", manifest(PORT + 2 + i, f"s{i}", replicas=1, **FAST)))
        rollout(m, "roll", "v0")
        for i in range(ROUNDS):
            before = sqlite_revision(m.state)
            out["rollout"].append(rollout(m, "roll", f"v{i + 1}"))
            after = sqlite_revision(m.state)
            if before is not None and after is not None:
                out["writes"].append(after - before)
        for i in range(ROUNDS):
            victim = next(x for x in instances(m, "roll") if x.get("state") == "running")
            os.kill(int(victim["pid"]), signal.SIGKILL)
            t0 = time.monotonic()
            until(lambda: any(x.get("slot") == victim["slot"] and x.get("pid") != victim["pid"]
                              and x.get("health") == "healthy" for x in instances(m, "roll")),
                  30, "the killed instance running again")
            out["restart"].append(time.monotonic() - t0)
    finally:
        _mount.stop(m)
    return out


def cluster(root: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"start": [], "rollout": [], "replace": [], "writes": []}
    with running_cluster(root, 3, ttl=TTL) as c:
        n1, n2 = c["n1"], c["n2"]
        for i in range(ROUNDS):
            out["start"].append(first_start(n1, n2.state, f"s{i}",
                                            manifest(PORT + 2 + i, f"s{i}", replicas=1, nodes="n2", **FAST)))
        rollout(n1, "roll", "v0")
        url = c.etcd.members[0].url
        for i in range(ROUNDS):
            before = etcd_revision(url)
            out["rollout"].append(rollout(n1, "roll", f"v{i + 1}"))
            out["writes"].append(etcd_revision(url) - before)
        for i in range(ROUNDS):  # a fresh service each round: one instance on each node
            watcher = c[c.leader()]
            name = f"dead{i}"
            watcher.write_manifest(name, manifest(PORT + 10 + i, name, replicas=3, **FAST))
            ctl(watcher, f"apply {name}")
            watcher.sh(f"cat active/{name}/wait", timeout=30)
            victim: Node = c.other_than_leader()
            assert placed(watcher, name).get(victim.name) == 1, placed(watcher, name)
            t0 = time.monotonic()
            victim.kill()
            until(lambda: victim.name not in placed(watcher, name)
                  and sum(1 for x in instances(watcher, name)
                          if x.get("state") == "running" and x.get("health") == "healthy") == 3,
                  TTL + 30, "the dead node's instance replaced")
            out["replace"].append(time.monotonic() - t0)
            victim.start()
            until(lambda: "state=ready" in watcher.read(f"nodes/{victim.name}"), 20, "the node back")
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    root = tempfile.mkdtemp(prefix="bench-cluster-")
    one = one_machine(os.path.join(root, "one"))
    many = cluster(os.path.join(root, "cluster"))
    print(f"bench/cluster.py on {machine()}")
    print(f"one machine (SQLite) vs 3 nodes on a 3-member etcd (--node-ttl {TTL}), medians of {ROUNDS}")
    print(f"ctl write to first instance started: {med(many['start']) * 1000:.0f} ms on another node vs "
          f"{med(one['start']) * 1000:.0f} ms on one machine = {med(many['start']) / med(one['start']):.2f}x")
    print(f"rollout of 6 replicas, batch 2: {med(many['rollout']):.2f} s over 3 nodes vs {med(one['rollout']):.2f} s "
          f"on one machine = {med(many['rollout']) / med(one['rollout']):.2f}x")
    print(f"a dead node's instance replaced (1 of 3, healthy): {med(many['replace']):.2f} s after the SIGKILL "
          f"(TTL {TTL} s: {med(many['replace']) - TTL:+.2f} s past it); one machine, a SIGKILLed instance "
          f"healthy again: {med(one['restart']):.2f} s")
    writes = f"{med(one['writes']):.0f}" if one["writes"] else "n/a"
    print(f"store writes per rollout of 6: {med(many['writes']):.0f} etcd revisions "
          f"({med(many['writes']) / 6:.1f} per instance replaced) vs {writes} SQLite store revisions")


if __name__ == "__main__":
    main()
