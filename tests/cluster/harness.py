"""A real cluster on one machine: etcd members and N `deployfs serve --cluster` nodes.

Each node is a separate server process with its own mount, state dir, address (127.0.1.I,
all of 127/8 is loopback), router (`--bind` on that address) and instance port range. Nodes
start side by side and each mount is waited for with a deadline.  A node can be killed the
way a machine dies (the server, its router and its instances SIGKILLed together, found by the
marker deployfs puts in their environment and by their cgroups), frozen (SIGSTOP) and thawed,
stopped for real (SIGTERM: it drains itself) and started again on the same state dir.

Everything started here dies with the test process (PR_SET_PDEATHSIG) and is gone after
`close()`, also when a test fails: servers SIGKILLed, instances reaped, mounts lazily unmounted;
and if the test process itself is killed, tests/cluster/reaper.py does the same.
`scripts/cluster.py` (`make cluster`) runs the same nodes for a newcomer to try.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Iterator

from tests import mount as _mount
from tests.etcd import Cluster as Etcd
from tests.etcd import _die_with_parent, cluster as etcd_cluster

# The scenarios send their requests through every node's router (each follows the cluster's
# routing table); False sends them through the controller's node's only (--routing leader).
EVERY_ROUTER = True

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Instance ports: PORTS_BASE + PORTS_EACH * (i - 1) ... for node i (disjoint: one host holds them all).
PORTS_BASE = 21340
PORTS_EACH = 40


def until(pred: Callable[[], object], timeout: float, what: str, log: Callable[[], str] = lambda: "",
          step: float = 0.05) -> float:
    """Poll `pred` every `step` s until it holds; returns the seconds it took."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{log()}")
        time.sleep(step)
    return time.monotonic() - t0


@dataclass
class Node:
    name: str
    index: int
    root: str
    endpoints: str
    ttl: int
    extra: tuple[str, ...] = ()
    port_range: str | None = None  # the instances' ports (default: this node's share of the tests' range)
    m: _mount.Mount | None = None
    frozen: bool = False  # a frozen server's mount must not be read: the reader would hang with it

    @property
    def address(self) -> str:
        return f"127.0.1.{self.index}"

    @property
    def ports(self) -> str:
        if self.port_range:
            return self.port_range
        low = PORTS_BASE + PORTS_EACH * (self.index - 1)
        return f"{low}-{low + PORTS_EACH - 1}"

    @property
    def mnt(self) -> str:
        return os.path.join(self.root, "mnt")

    @property
    def state(self) -> str:
        return os.path.join(self.root, "state")

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "deployfs", "serve", self.mnt, "--state", self.state,
                "--cluster", self.endpoints, "--node", self.name, "--address", self.address,
                "--bind", self.address, "--node-ttl", str(self.ttl), "--ports", self.ports, *self.extra]

    # -- life ---------------------------------------------------------------------------------

    def spawn(self) -> None:
        assert not self.running(), f"{self.name} already runs"
        os.makedirs(self.root, exist_ok=True)
        self.m = _mount.spawn(self.root, mnt=self.mnt, state=self.state, argv=self.argv(),
                              preexec_fn=_die_with_parent)

    def wait_mounted(self, timeout: float = 20) -> None:
        assert self.m is not None
        _mount.wait_mounted(self.m, timeout)

    def start(self) -> None:
        self.spawn()
        self.wait_mounted()

    def running(self) -> bool:
        """Started, not dead, not frozen: its mount answers."""
        return self.m is not None and self.m.proc.poll() is None and not self.frozen

    @property
    def pid(self) -> int:
        assert self.m is not None
        return self.m.proc.pid

    def instance_pids(self) -> list[int]:
        """Processes deployfs started for this node (its instances and router)."""
        from deployfs.node.runtime import marked_processes, marker_prefix
        return list(marked_processes(marker_prefix(self.state)))

    def kill(self) -> list[int]:
        """A machine death: the server, its router and its instances SIGKILLed at once; the dead
        mount lazily unmounted (the machine is gone, and so is its mount). Returns the pids of
        the instances and router killed."""
        if self.m is None:
            return []
        if self.m.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.m.proc.pid, signal.SIGKILL)
            self.m.proc.wait()
        self.frozen = False
        killed = _mount.reap(self.state)
        if _mount.in_mount_table(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], check=False, capture_output=True)
        return killed

    def crash(self) -> None:
        """The server alone SIGKILLed (a deployfs crash, not the machine's): its instances and
        router run on, and the dead mount stays for the next start to clean up."""
        assert self.m is not None
        _mount.kill9(self.m)
        self.frozen = False

    def freeze(self) -> None:
        """A hung machine, as far as the cluster sees it: the server stops answering and stops
        its keepalives (its instances and router go on, as on a machine whose deployfs hangs)."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM, the real shutdown (the node drains itself first); no mount or process left."""
        assert self.m is not None
        return _mount.stop(self.m, signal.SIGTERM, timeout=timeout)

    # -- the mount ------------------------------------------------------------------------------

    @property
    def mount(self) -> _mount.Mount:
        assert self.m is not None, f"{self.name} was never started"
        return self.m

    def sh(self, cmd: str, timeout: float = 15, check: bool = False) -> subprocess.CompletedProcess:
        return self.mount.sh(cmd, timeout=timeout, check=check)

    def read(self, *parts: str) -> str:
        return self.mount.read(*parts)

    def try_read(self, *parts: str) -> str | None:
        """A file's text, or None when it cannot be read (yet)."""
        r = self.sh(f"cat {' '.join(parts)}")
        return r.stdout if r.returncode == 0 else None

    def ctl(self, command: str, service: str | None = None) -> subprocess.CompletedProcess:
        """`echo command > ctl` (the service's when given); the reply is read back from the same
        open file, as `deploy` does."""
        target = f"active/{service}/ctl" if service else "ctl"
        return self.sh(f"exec 3<>{target}; echo {command!r} >&3; status=$?; cat <&3; exit $status")

    def write_manifest(self, name: str, text: str) -> None:
        self.mount.write_manifest(name, text)

    def log(self) -> str:
        return f"--- {self.name} server log:\n{self.m.server_log() if self.m else ''}"


@dataclass
class Cluster:
    etcd: Etcd
    nodes: list[Node]
    root: str
    loads: list["Hammer"] = field(default_factory=list)

    def __getitem__(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.running()]

    def logs(self) -> str:
        return "\n".join(n.log() for n in self.nodes)

    def until(self, pred: Callable[[], object], timeout: float, what: str) -> float:
        return until(pred, timeout, what, self.logs)

    def leader(self) -> str:
        """The node that runs the controller, as the first running node's `cluster` file says."""
        for n in self.running():
            text = n.try_read("cluster")
            if text:
                for line in text.splitlines():
                    if line.startswith("leader="):
                        return line.split("=", 1)[1]
        return ""

    def routers(self, port: int) -> list[str]:
        """The URLs of the service port on every node's router (see EVERY_ROUTER)."""
        nodes = self.running() if EVERY_ROUTER else [self[self.leader()]]
        return [f"http://{n.address}:{port}/" for n in nodes]

    def other_than_leader(self) -> Node:
        leader = self.leader()
        return next(n for n in self.running() if n.name != leader)

    def start(self, names: list[str] | None = None) -> None:
        """(Re)start the nodes named (default: all that are not running), side by side."""
        for n in self.nodes:
            if n.frozen:
                n.thaw()
        todo = [n for n in self.nodes if (names is None and not n.running()) or (names and n.name in names)]
        for n in todo:
            n.spawn()
        for n in todo:
            n.wait_mounted()

    def close(self) -> None:
        for h in self.loads:
            h.stop()
        for n in self.nodes:
            n.kill()


def start_reaper(nodes: list[Node]) -> subprocess.Popen:
    """Cleans up after the nodes even if this process dies without its finally (tests/cluster/reaper.py)."""
    return subprocess.Popen([sys.executable, "-m", "tests.cluster.reaper", *(f"{n.state}:{n.mnt}" for n in nodes)],
                            stdin=subprocess.PIPE, start_new_session=True, cwd=REPO)


def stop_reaper(reaper: subprocess.Popen) -> None:
    assert reaper.stdin is not None
    reaper.stdin.close()  # it reaps what is left (nothing, after a clean stop) and exits
    reaper.wait(timeout=20)


@contextlib.contextmanager
def running_cluster(root: str, size: int = 3, *, etcd_members: int = 3, ttl: int = 2,
                    extra: tuple[str, ...] = ()) -> Iterator[Cluster]:
    """`etcd_members` fresh etcd members and `size` nodes n1..nSIZE under `root`, all mounted;
    everything gone on the way out, also on failure."""
    with etcd_cluster(etcd_members) as etcd:
        nodes = [Node(f"n{i}", i, os.path.join(root, f"n{i}"), etcd.endpoints, ttl, extra) for i in range(1, size + 1)]
        c = Cluster(etcd, nodes, root)
        reaper = start_reaper(nodes)
        try:
            c.start()
            yield c
        finally:
            c.close()
            stop_reaper(reaper)


def get(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    """One GET on a fresh connection: (answered 2xx, body or the error)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300, r.read().decode(errors="replace")
    except Exception as e:  # noqa: BLE001  (any failure is a failed request, with its reason)
        return False, repr(e)


class Hammer:
    """Requests in a loop through several routers (one thread each, a fresh connection per
    request, as different clients would come); counts what succeeded and what failed."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.ok: dict[str, int] = {u: 0 for u in urls}
        self.failed: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(u,), daemon=True) for u in urls]
        for t in self._threads:
            t.start()

    def _run(self, url: str) -> None:
        while not self._stop.is_set():
            ok, why = get(url)
            if ok:
                self.ok[url] += 1
            else:
                self.failed.append((time.monotonic(), url, why))
                time.sleep(0.01)

    def stop(self) -> "Hammer":
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        return self

    @property
    def total(self) -> int:
        return sum(self.ok.values()) + len(self.failed)

    def __str__(self) -> str:
        per = ", ".join(f"{u.split('//')[1].split('/')[0]}: {n}" for u, n in self.ok.items())
        return f"{self.total} requests, {len(self.failed)} failed ({per}); first failures: {self.failed[:3]}"


def manifest(port: int, version: str = "v1", replicas: int = 3, **more: object) -> str:
    """examples/web.py on $ADDRESS (the node's), health-checked fast; `more` adds or overrides directives."""
    from tests.mount import SERVICE
    directives: dict[str, object] = {
        "image": sys.executable, "args": f"{SERVICE} --port $PORT --bind $ADDRESS --version {version}",
        "replicas": replicas, "port": port, "health": "http://$ADDRESS:$PORT/healthz", "health_interval": 0.2,
        "health_timeout": 0.5, "health_retries": 2, "update_deadline": 20, "drain_timeout": 1, "stop_timeout": 5}
    directives.update(more)  # `more` may also override these
    return "".join(f"{k} {v}\n" for k, v in directives.items())


def instances(node: Node | _mount.Mount, service: str) -> list[dict[str, str]]:
    """The service's instance files as `node` shows them, each as its key=value fields."""
    text = node.sh(f"cat active/{service}/instances/* 2>/dev/null").stdout
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in text.splitlines()]


def placed(node: Node | _mount.Mount, service: str, version: str | None = None) -> dict[str, int]:
    """How many running instances (of `version`, if given) each node runs, as `node` shows it."""
    out: dict[str, int] = {}
    for i in instances(node, service):
        if i.get("state") == "running" and (version is None or i.get("version") == version):
            out[i["node"]] = out.get(i["node"], 0) + 1
    return out
