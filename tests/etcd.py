"""Real etcd members for the tests: one member, or a 3-member cluster where quorum matters.

Each member runs `etcd` (Debian's etcd-server, which `make test` installs) in its own
temporary data dir, on ports picked free from this module's range (20300-20399),
started in its own session and stopped by PID; a member that dies with the test
process dies too (PR_SET_PDEATHSIG).  Startup waits on `GET /health` with a deadline.

Use the fixtures by importing them into a test module:
``from tests.etcd import etcd1, etcd3``.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

import httpx
import pytest

PORTS = range(20300, 20400)
# Short raft timings: a leader is elected (and re-elected after a member dies) within
# a fraction of a second, not the 1.5-2.6 s of the defaults; fine on loopback.
FAST_RAFT = ["--heartbeat-interval", "25", "--election-timeout", "250",
             # as docs/cluster.md recommends: a quiet watch hears progress, not silence, every 5 s
             "--experimental-watch-progress-notify-interval", "5s"]
START_TIMEOUT = 20.0

_taken: set[int] = set()


def _free_port() -> int:
    for port in PORTS:
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError(f"no free port left in {PORTS}")


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise RuntimeError("etcd is not installed: `make test` installs it (apt-get install etcd-server)")
    return path


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, token: str) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already runs"
        # A member that restarts finds its data dir: it rejoins, whatever --initial-cluster-state says.
        cmd = [etcd_binary(), "--name", self.name, "--data-dir", self.data_dir,
               "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
               "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
               "--initial-cluster", initial_cluster, "--initial-cluster-state", "new",
               "--initial-cluster-token", token, "--logger", "zap", "--log-level", "warn", *FAST_RAFT]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)

    def healthy(self) -> bool:
        """Does this member answer /health with a leader and quorum?"""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            r = httpx.get(self.url + "/health", timeout=0.5, trust_env=False)
            return r.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, *, kill: bool = False) -> None:
        """Stop this member (SIGTERM, or SIGKILL for a crash) and wait until it is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)  # a paused member cannot act on SIGTERM
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def get(self, key: str) -> dict | None:
        """A key as etcd holds it (value decoded, lease as an int), or None; for tests that
        look from outside at what a `deployfs serve` process wrote."""
        r = httpx.post(self.url + "/v3/kv/range", json={"key": base64.b64encode(key.encode()).decode()},
                       timeout=5, trust_env=False)
        r.raise_for_status()
        kvs = r.json().get("kvs", [])
        if not kvs:
            return None
        kv = kvs[0]
        return {"value": base64.b64decode(kv.get("value", "")).decode(), "lease": int(kv.get("lease", 0)),
                "mod_revision": int(kv["mod_revision"])}

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-3000:]
        except OSError:
            return ""


@dataclass
class Cluster:
    members: list[Member]
    token: str
    root: str
    _ports: list[int] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def endpoints(self) -> str:
        """The members' URLs as `--cluster` takes them."""
        return ",".join(self.urls)

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self, member: Member | None = None) -> None:
        for m in [member] if member else self.members:
            m.start(self.initial_cluster, self.token)

    def wait_healthy(self, members: list[Member] | None = None, timeout: float = START_TIMEOUT) -> float:
        """Poll until every member given (default: all) is healthy; returns the seconds taken."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        waiting = list(members or self.members)
        while waiting:
            waiting = [m for m in waiting if not m.healthy()]
            if not waiting:
                break
            dead = [m for m in waiting if not m.running()]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {m.name} ({'exited' if not m.running() else 'running'}):\n{m.log()}"
                                 for m in waiting)
                raise AssertionError(f"etcd members not healthy after {time.monotonic() - t0:.1f}s:\n{logs}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def stop(self) -> None:
        for m in self.members:
            m.stop(kill=True)
        for p in self._ports:
            _taken.discard(p)


@contextlib.contextmanager
def cluster(size: int) -> Iterator[Cluster]:
    """`size` fresh etcd members forming one cluster; all gone on the way out, also on failure."""
    root = tempfile.mkdtemp(prefix="deployfs-etcd-")
    ports = [_free_port() for _ in range(2 * size)]
    members = [Member(f"m{i + 1}", ports[2 * i], ports[2 * i + 1], os.path.join(root, f"m{i + 1}"),
                      os.path.join(root, f"m{i + 1}.log")) for i in range(size)]
    c = Cluster(members, f"deployfs-test-{os.getpid()}-{time.monotonic_ns()}", root, ports)
    try:
        c.start()
        c.wait_healthy()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def etcd1() -> Iterator[Cluster]:
    """One etcd member for a test module (tests keep apart by key prefix)."""
    with cluster(1) as c:
        yield c


@pytest.fixture
def etcd3() -> Iterator[Cluster]:
    """A fresh 3-member cluster for one test: tests that stop members must not leak into the next."""
    with cluster(3) as c:
        yield c
