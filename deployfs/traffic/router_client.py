"""The server's side of the router: adopt or start it, feed it, watch it.

``set_backends`` never blocks the engine: it records the latest backend list
per service and a single sender task delivers it, so the router always ends
up with the newest table, in order.  ``drain`` first waits for that table to
be delivered (the backend must be out of routing before we count its
connections), then waits for the backend's connections to end.

If the router dies, it is started again and sent the whole table.  The
feeding is shared (:class:`TableFeeder`); :class:`RouterClient` speaks to
the built-in router, ``haproxy.HAProxyRouter`` to haproxy.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Callable

import trio

from ..model.errors import Kind
from ..node.runtime import MARKER
from ..state import statedir
from ..state.events import CLUSTER
from .router import DEFAULT_IDLE_TIMEOUT, Backend, pid_path, sock_path

log = logging.getLogger(__name__)
ROUTER_MODULE = "deployfs.traffic.router"
# The liveness check: a router that does not answer its control socket (stopped,
# hung) forwards nothing either.  Reported at once; replaced once silent this long.
PING_EVERY = 1.0
PING_TIMEOUT = 2.0
SILENT_RESTART = 5.0


class RouterError(Exception):
    pass


class TableFeeder:
    """Keeps a router process in step with the newest backend table."""

    restart_when_silent = True  # kill and replace a router that stops answering

    def __init__(self, state_dir: str, *, on_error: Callable[[str, str], None] | None = None,
                 max_conns: int = 0, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.state_dir = os.path.abspath(state_dir)
        # Per service: connections held at once (0: from the router's descriptor limit), idle seconds (0: none).
        self.max_conns, self.idle_timeout = max_conns, idle_timeout
        self.on_error = on_error or (lambda service, msg: log.warning("%s: %s", service, msg))
        # Per service: its port, backends, and their weights (None: even; canary_weight sets them).
        self.table: dict[str, tuple[int | None, list[Backend], list[int] | None]] = {}
        self.protocols: dict[str, str] = {}  # per service: tcp | http (docs/traffic.md)
        # Why the router refused a service's last table (it could not listen): a
        # rollout must not be reported done on a port that does not serve it.
        self.errors: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._wake = trio.Event()
        self._flushed = trio.Event()
        self._flushed.set()
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None  # a router we started (not adopted)
        self.stopping = False
        self.bind = "127.0.0.1"  # the address service ports listen on
        # The router's last answer to the liveness ping (its counters, for the metrics): at most
        # PING_EVERY old, and no extra round trip per scrape. None while it does not answer
        # ({} from haproxy, which keeps its own counters).
        self.last_stats: dict | None = None

    # -- what the engine calls ----------------------------------------------------------

    def set_backends(self, service: str, port: int | None, backends: list[Backend],
                     weights: list[int] | None = None, *, protocol: str = "tcp") -> None:
        # A table the router refused is sent again even if unchanged: the port may be free now.
        entry = (port, list(backends), None if weights is None else list(weights))
        if (self.table.get(service) == entry and self.protocols.get(service, "tcp") == protocol
                and service not in self._dirty | self.errors.keys()):
            return
        self.table[service] = entry
        self.protocols[service] = protocol
        self._dirty.add(service)
        if self._flushed.is_set():
            self._flushed = trio.Event()
        self._wake.set()

    def routed(self) -> bool:
        return self._flushed.is_set()

    def failure(self, service: str) -> str | None:
        """Why the router could not take the service's newest table (once routed), else None."""
        return self.errors.get(service)

    def port_problem(self, port: int) -> tuple[Kind, str] | None:
        """(kind, reason) if the router could not listen on ``port`` now: another program holds it."""
        bind = self.bind
        with socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the router's listener does
            try:
                s.bind((bind, port))
                s.listen(1)  # what actually collides with another listener under SO_REUSEADDR
            except OSError as e:
                code = {errno.EADDRINUSE: Kind.ADDRESS_IN_USE, errno.EACCES: Kind.PERMISSION}.get(
                    e.errno or 0, Kind.ADDRESS_UNAVAILABLE)
                return code, f"cannot listen on {bind}:{port}: {e.strerror or e}"
        return None

    async def wait_routed(self) -> None:
        await self._flushed.wait()

    async def drain(self, service: str, backend: Backend, timeout: float) -> int | None:
        """Connections to ``backend`` still open when ``timeout`` ran out (None: not known)."""
        with trio.move_on_after(timeout + 5):
            await self.wait_routed()
            try:
                return await self._drain(service, backend, timeout)
            except RouterError as e:
                log.warning("drain of %s:%d: %s", *backend, e)
        return None

    # -- what each router implements --------------------------------------------------------

    async def _ensure(self) -> None:
        raise NotImplementedError

    async def _apply(self, service: str, port: int | None, backends: list[Backend],
                     weights: list[int] | None, protocol: str = "tcp") -> None:
        raise NotImplementedError

    async def _drain(self, service: str, backend: Backend, timeout: float) -> int:
        raise NotImplementedError

    async def _stop_process(self) -> None:
        raise NotImplementedError

    def _marked_env(self) -> dict[str, str]:
        """The router's environment: marked, so tests and stray sweeps know it is ours."""
        return dict(os.environ, **{MARKER: f"{self.state_dir}:router:0"})

    def _alive(self) -> bool:
        raise NotImplementedError

    async def _ping(self) -> dict:
        """Ask the router how it is (within PING_TIMEOUT), or raise RouterError."""
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt or start the router process (before anything is routed)."""
        await self._ensure()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.pid is None:
            await self._ensure()
        async with trio.open_nursery() as n:
            self.nursery = n
            task_status.started()
            n.start_soon(self._sender)
            n.start_soon(self._watchdog)
            n.start_soon(self._liveness)

    async def _sender(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._dirty:
                service = self._dirty.pop()
                port, backends, weights = self.table[service]
                try:
                    await self._apply(service, port, backends, weights, self.protocols.get(service, "tcp"))
                    self.errors.pop(service, None)
                    if port is None and service not in self._dirty:  # deleted: nothing to resend
                        self.table.pop(service, None)
                        self.protocols.pop(service, None)
                        self.protocols.pop(service, None)
                except RouterError as e:
                    self.errors[service] = str(e)
                    self.on_error(service, str(e))
            if not self._dirty:
                self._flushed.set()

    async def _watchdog(self) -> None:
        while True:
            assert self.pid is not None
            try:
                fd = os.pidfd_open(self.pid)
            except OSError:
                fd = None
            if fd is not None:
                try:
                    await trio.lowlevel.wait_readable(fd)
                finally:
                    trio.lowlevel.notify_closing(fd)
                    os.close(fd)
            if self._proc is not None:
                self._proc.poll()
            if self.stopping:
                return
            old = self.pid
            log.warning("the router (pid %s) died; starting it again", old)
            await self._ensure()
            self.on_error(CLUSTER, f"pid {old} is gone; pid {self.pid} took over and was sent the whole table")
            for service in self.table:
                self._dirty.add(service)
            self._wake.set()

    async def _liveness(self) -> None:
        """Ping the router; say (once) when it stops answering and why, replace it if it stays
        silent, and turn what it reports (a service at its cap, no descriptors) into one event each."""
        silent_since: float | None = None
        saturated: set[str] = set()
        fds_short = False
        while not self.stopping:
            await trio.sleep(PING_EVERY)
            pid = self.pid
            try:
                stats = await self._ping()
            except RouterError as e:
                self.last_stats = None
                if self.stopping or pid != self.pid:
                    continue  # being replaced
                now = trio.current_time()
                if silent_since is None:
                    silent_since = now
                    self.on_error(CLUSTER, f"pid {pid} does not answer its control socket ({e}): {_proc_state(pid)}; "
                                           "no connection is forwarded meanwhile")
                if (self.restart_when_silent and now - silent_since >= SILENT_RESTART and pid is not None
                        and self._alive()):
                    self.on_error(CLUSTER, f"pid {pid} silent for {now - silent_since:.0f}s: killing it, "
                                           "a new router takes over")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)  # the watchdog starts the next one
                    with trio.move_on_after(30):
                        while self.pid == pid:
                            await trio.sleep(0.05)
                    silent_since = None
                continue
            self.last_stats = stats
            if silent_since is not None:
                self.on_error(CLUSTER, f"pid {pid} answers again")
                silent_since = None
            routes = stats.get("routes", {})
            for service, r in routes.items():
                if r.get("saturated") and service not in saturated:
                    saturated.add(service)
                    self.on_error(service, f"port {r['port']} is at its limit of {stats.get('max_conns')} "
                                           f"connections: new ones are refused ({r.get('rejected', 0)} so far)")
                elif not r.get("saturated") and service in saturated:
                    saturated.discard(service)
                    self.on_error(service, f"port {r['port']} is below its connection limit again "
                                           f"({r.get('rejected', 0)} refused in all)")
            saturated &= routes.keys()
            if bool(stats.get("fds_short")) != fds_short:
                fds_short = not fds_short
                self.on_error(CLUSTER, f"out of file descriptors (limit {stats.get('nofile')}): new connections "
                                       "wait; raise LimitNOFILE or lower --max-conns" if fds_short else
                                       "file descriptors available again")

    async def quit(self) -> None:
        """Stop the router, and return only once it is gone (SIGTERM leaves nothing behind)."""
        self.stopping = True
        await self._stop_process()
        with trio.move_on_after(10):
            while self._alive():
                if self._proc is not None and self._proc.poll() is not None:
                    break
                await trio.sleep(0.02)


class RouterClient(TableFeeder):
    """The built-in router (deployfs.traffic.router), spoken to over its unix socket."""

    def __init__(self, state_dir: str, *, bind: str = "127.0.0.1", balance: str = "roundrobin",
                 on_error: Callable[[str, str], None] | None = None, max_conns: int = 0,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        super().__init__(state_dir, on_error=on_error, max_conns=max_conns, idle_timeout=idle_timeout)
        self.bind, self.balance = bind, balance

    async def request(self, req: dict, timeout: float = 10) -> dict:
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_unix_socket(sock_path(self.state_dir))
                async with stream:
                    await stream.send_all(json.dumps(req).encode() + b"\n")
                    buf = b""
                    while b"\n" not in buf:
                        data = await stream.receive_some(65536)
                        if not data:
                            raise RouterError("router closed the connection")
                        buf += data
        except trio.TooSlowError:
            raise RouterError(f"router unreachable: no answer within {timeout:g}s") from None
        except (OSError, trio.BrokenResourceError) as e:
            raise RouterError(f"router unreachable: {e}") from None
        reply = json.loads(buf)
        if "error" in reply:
            raise RouterError(reply["error"])
        return reply

    async def _apply(self, service: str, port: int | None, backends: list[Backend],
                     weights: list[int] | None, protocol: str = "tcp") -> None:
        req: dict = {"op": "set", "service": service, "port": port, "backends": backends, "protocol": protocol}
        if weights is not None:
            req["weights"] = weights
        await self.request(req)

    async def _ping(self) -> dict:
        return await self.request({"op": "stats"}, timeout=PING_TIMEOUT)

    async def _limits(self) -> None:
        """Give the router (started or adopted) this server's limits."""
        await self.request({"op": "limits", "max_conns": self.max_conns, "idle_timeout": self.idle_timeout})

    async def _drain(self, service: str, backend: Backend, timeout: float) -> int:
        reply = await self.request({"op": "drain", "service": service, "backend": list(backend),
                                    "timeout": timeout}, timeout=timeout + 5)
        return int(reply.get("left", 0))

    async def _ensure(self) -> None:
        """Adopt the router that is running for this state directory, or start one."""
        pid = _read_pid(pid_path(self.state_dir))
        if pid and _is_router(pid):
            try:
                await self.request({"op": "stats"}, timeout=3)
                self.pid = pid
                log.info("adopted the running router (pid %d)", pid)
                await self._limits()
                return
            except RouterError:
                pass
        log_file = statedir.open_file(os.path.join(self.state_dir, "router.log"), "ab")
        env = self._marked_env()
        proc = subprocess.Popen(
            [sys.executable, "-m", ROUTER_MODULE, "--state", self.state_dir, "--bind", self.bind,
             "--balance", self.balance],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        log_file.close()
        self.pid = proc.pid
        with trio.fail_after(20):
            while True:
                if proc.poll() is not None:
                    raise RouterError(f"the router exited at start (status {proc.returncode}); see router.log")
                try:
                    await self.request({"op": "stats"}, timeout=1)
                    break
                except RouterError:
                    await trio.sleep(0.02)
        self._proc = proc  # keep it, so subprocess never reaps behind our back
        await self._limits()

    async def _stop_process(self) -> None:
        try:
            await self.request({"op": "quit"}, timeout=5)
        except RouterError:
            pass

    def _alive(self) -> bool:
        return self.pid is not None and _is_router(self.pid)


def _proc_state(pid: int | None) -> str:
    """Why a process may not answer, in words, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError, ValueError):
        return "the process is gone"
    return {"T": "the process is stopped (SIGSTOP or SIGTSTP)", "t": "the process is stopped by a debugger",
            "D": "the process is blocked in the kernel (D state)", "Z": "the process has exited (zombie)",
            "R": "the process is running but busy", "S": "the process is alive but does not respond"
            }.get(state, f"the process is in state {state}")


def _read_pid(path: str) -> int | None:
    try:
        with statedir.open_file(path, "r") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _is_router(pid: int) -> bool:
    # A router started before the modules moved into packages runs as
    # `-m deployfs.router`; it outlives upgrades, so it is adopted too.
    return _cmdline_has(pid, ROUTER_MODULE.encode()) or _cmdline_has(pid, b"deployfs.router")


def _cmdline_has(pid: int, word: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return word in f.read()
    except OSError:
        return False
