#!/usr/bin/env python3
"""`make cluster`: a local three-node cluster to try cluster mode on one machine.

A 3-member etcd on loopback (client ports 2379, 22379, 32379, as etcd's own local-cluster
example) and three `deployfs serve --cluster` nodes n1..n3 on 127.0.1.1-3 (all of 127/8 is
loopback), mounted at ./cluster/nI/mnt with state in ./cluster/nI/state.  Every run starts a
fresh cluster (./cluster is wiped first: it is a sandbox).  Ctrl-C cordons every node (so none
tries to move its instances to another that is stopping too), stops them with SIGTERM (each
stops its instances and unmounts), then the etcd members.

The nodes are the same as the tests' (tests/cluster/harness.py), so what you try here is what
the scenario tests prove.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from tests import mount as _mount  # noqa: E402
from tests.cluster.harness import Node, start_reaper, stop_reaper  # noqa: E402
from tests.etcd import Cluster as Etcd, Member  # noqa: E402
from tests.mount import SERVICE  # noqa: E402

ETCD_PORTS = [(2379, 2380), (22379, 22380), (32379, 32380)]
EXAMPLE_PORT = 8080


def clean(root: str) -> None:
    """What a run killed with SIGKILL may have left: mounts, instances, the directory."""
    for i in (1, 2, 3):
        node = os.path.join(root, f"n{i}")
        if _mount.in_mount_table(os.path.join(node, "mnt")):
            subprocess.run(["fusermount3", "-u", "-z", os.path.join(node, "mnt")], check=False)
        if os.path.isdir(os.path.join(node, "state")):
            _mount.reap(os.path.join(node, "state"))
    shutil.rmtree(root, ignore_errors=True)


def example(path: str) -> None:
    with open(path, "w") as f:
        f.write(f"image {sys.executable}\n"
                f"args {SERVICE} --port $PORT --bind $ADDRESS --version v1\n"
                "replicas 3\n"
                f"port {EXAMPLE_PORT}\n"
                "health http://$ADDRESS:$PORT/healthz\n"
                "health_interval 1\n")


def usage(root: str, etcd: Etcd, nodes: list[Node]) -> str:
    rel = os.path.relpath(root)
    lines = [f"deployfs cluster: etcd at {etcd.endpoints}", ""]
    for n in nodes:
        lines.append(f"  {n.name}  {rel}/{n.name}/mnt   address {n.address}   state {rel}/{n.name}/state   "
                     f"log {os.path.relpath(n.mount.log)}")
    lines += ["", "Try (from another terminal, in this directory):",
              f"  cat {rel}/n1/mnt/cluster                      # store, nodes, which node leads",
              f"  cat {rel}/n2/mnt/nodes/n3",
              f"  cp {rel}/hello.manifest {rel}/n2/mnt/manifests/hello   # a manifest written on n2 ...",
              f"  echo 'apply hello' > {rel}/n3/mnt/ctl",
              f"  cat {rel}/n1/mnt/active/hello/wait                # ... applied on n3, awaited on n1",
              f"  cat {rel}/n1/mnt/active/hello/instances/*         # spread over n1, n2, n3",
              f"  curl http://127.0.1.1:{EXAMPLE_PORT}/                    # a node's router (docs/cluster.md)",
              f"  echo 'drain n2' > {rel}/n1/mnt/ctl; tail -f {rel}/n3/mnt/active/hello/events",
              "",
              "A node killed or stopped leaves the others running; type 'start n3' (and Enter) here to",
              "start it again. Ctrl-C (or SIGTERM) stops everything (instances, mounts, etcd).",
              "docs/cluster.md says what else to try."]
    return "\n".join(lines)


def stop(nodes: list[Node], etcd: Etcd) -> None:
    running = [n for n in nodes if n.running()]
    if running:  # nowhere to move: each node stops its own instances at once instead of draining
        for n in nodes:
            running[0].sh(f"echo 'cordon {n.name}' > ctl", timeout=5)
    for n in running:
        n.mount.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for n in running:
        try:
            n.mount.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{n.name} did not stop within 30 s: killed", file=sys.stderr)
    for n in nodes:
        n.kill()  # whatever is left: the server, its instances, its mount
    for m in etcd.members:
        m.stop()


def _read_lines(typed: "queue.Queue[str]") -> None:
    for line in sys.stdin:
        typed.put(line)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (and SIGINT in the background, where a shell ignores it) as Ctrl-C


def main() -> None:
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="cluster", help="where the cluster lives (default ./cluster, wiped first)")
    p.add_argument("--node-ttl", type=int, default=2, help="the nodes' lease TTL (default 2 s: failures show fast)")
    a = p.parse_args()
    root = os.path.abspath(a.dir)
    clean(root)
    os.makedirs(root)
    members = [Member(f"m{i + 1}", c, pp, os.path.join(root, "etcd", f"m{i + 1}"), os.path.join(root, "etcd", f"m{i + 1}.log"))
               for i, (c, pp) in enumerate(ETCD_PORTS)]
    os.makedirs(os.path.join(root, "etcd"))
    etcd = Etcd(members, f"deployfs-local-{os.getpid()}", os.path.join(root, "etcd"))
    nodes = [Node(f"n{i}", i, os.path.join(root, f"n{i}"), etcd.endpoints, a.node_ttl,
                  port_range=f"{24000 + 1000 * (i - 1)}-{24999 + 1000 * (i - 1)}") for i in (1, 2, 3)]
    reaper = start_reaper(nodes)  # if this script is killed, its instances and mounts go too
    try:
        etcd.start()
        etcd.wait_healthy()
        for n in nodes:
            n.spawn()
        for n in nodes:
            n.wait_mounted()
        example(os.path.join(root, "hello.manifest"))
        print(usage(root, etcd, nodes), flush=True)
        typed: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_read_lines, args=(typed,), daemon=True).start()
        said: set[str] = set()
        while True:  # a node that stops (killed, frozen past its TTL, SIGTERM) leaves the others running
            for n in nodes:
                if not n.running() and n.name not in said:
                    said.add(n.name)
                    print(f"node {n.name} stopped (log {os.path.relpath(n.mount.log)}); the others carry on. "
                          f"Type 'start {n.name}' and Enter here to start it again.", flush=True)
            try:
                line = typed.get(timeout=0.5).split()
            except queue.Empty:
                continue
            byname = {n.name: n for n in nodes}
            if len(line) == 2 and line[0] == "start" and line[1] in byname and not byname[line[1]].running():
                n = byname[line[1]]
                n.spawn()
                n.wait_mounted()
                said.discard(n.name)
                print(f"node {n.name} started again on its state directory", flush=True)
            elif line:
                print("type 'start NODE' (a node that stopped), or Ctrl-C to stop everything", flush=True)
    except KeyboardInterrupt:
        print("\nstopping the cluster ...", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave mounts behind
        stop(nodes, etcd)
        stop_reaper(reaper)
        print("stopped: no node, instance, mount or etcd member left running")


if __name__ == "__main__":
    main()
