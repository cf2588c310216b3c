"""HAProxy mode: deployfs owns an haproxy and drives it at run time.

Why this shape (measured on haproxy 2.6.12):

* haproxy runs in master-worker mode in its own session: it outlives a
  crashed deployfs, and a restarted one adopts it by its pidfile.
* Servers come and go through the admin socket (``add server`` ...
  ``state ready``; ``state drain`` ... ``maint`` ... ``del server``), which
  costs no reload.  Servers are added with ``pool-max-conn -1
  pool-purge-delay 5s``: without them throughput fell 2.7x.
* A new service needs a new frontend, which 2.6 cannot add at run time: the
  configuration is rewritten and the master reloads (listeners are kept, the
  old worker finishes its connections).  Run-time changes vanish on reload,
  so every change is also written to the configuration file.
* A ``protocol tcp`` service gets mode tcp, the same layer-4 semantics as
  the built-in router's.  A ``protocol http`` one gets mode http with what
  gives the built-in router's guarantees: a server is chosen per request
  (haproxy's default in keep-alive mode), a draining server gets no new
  request, a connection failure or an empty answer is retried (``retry-on
  conn-failure empty-response``: haproxy retries L7 failures of idempotent
  requests only) on another server (``option redispatch 1``), and
  ``option forwardfor`` adds X-Forwarded-For.  Switching a service's mode
  rewrites its sections and reloads, like a new frontend.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable

import trio

from ..state import statedir
from .router import DEFAULT_IDLE_TIMEOUT, default_max_conns
from .router_client import PING_TIMEOUT, Backend, RouterError, TableFeeder, _cmdline_has, _read_pid

log = logging.getLogger(__name__)


def _maxconn() -> int:
    """haproxy needs two descriptors per proxied connection: stay inside our limit."""
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(256, min(20000, (soft - 100) // 2))


def _name(backend: Backend) -> str:
    host, port = backend
    return f"s{host.replace('.', '_').replace(':', '_')}_{port}"


class HAProxyRouter(TableFeeder):
    # A silent master is reported, not killed: its workers go on serving, and die with it.
    restart_when_silent = False

    def __init__(self, state_dir: str, *, bind: str = "127.0.0.1", balance: str = "roundrobin",
                 on_error=None, haproxy: str = "haproxy", max_conns: int = 0,  # type: ignore[no-untyped-def]
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        super().__init__(state_dir, on_error=on_error, max_conns=max_conns, idle_timeout=idle_timeout)
        self.bind, self.balance, self.haproxy = bind, balance, haproxy
        self.cfg = os.path.join(self.state_dir, "haproxy.cfg")
        self.admin = os.path.join(self.state_dir, "haproxy.sock")  # for operators: socat it
        self.master = os.path.join(self.state_dir, "haproxy-master.sock")
        self.pidfile = os.path.join(self.state_dir, "haproxy.pid")
        # What haproxy has now: service -> (port, {server name: (backend, draining)})
        self.live: dict[str, tuple[int, dict[str, tuple[Backend, bool]]]] = {}
        # Server weights a canary_weight set (service -> server name -> weight); absent: haproxy's default, 1.
        self.weights: dict[str, dict[str, int]] = {}
        self.modes: dict[str, str] = {}  # service -> its frontend's mode (tcp | http)

    # -- the admin and master sockets -------------------------------------------------------

    async def cmd(self, line: str, *, master: bool = False, timeout: float = 5) -> str:
        """One command through the master socket: to the newest worker (``@1``) unless ``master``.

        Never through the workers' own stats socket: during a reload the old
        worker may still answer there, and what it is told dies with it.
        """
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_unix_socket(self.master)
                async with stream:
                    await stream.send_all(f"{'' if master else '@1 '}{line}\nquit\n".encode())
                    out = b""
                    while data := await stream.receive_some(65536):
                        out += data
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
            raise RouterError(f"haproxy unreachable: {e}") from None
        return out.decode(errors="replace")

    async def workers(self) -> set[int]:
        out = await self.cmd("show proc", master=True)
        pids, section = set(), ""
        for line in out.splitlines():
            if line.startswith("#"):
                section = line
            elif section == "# workers" and line.split():
                pids.add(int(line.split()[0]))
        return pids

    # -- configuration ---------------------------------------------------------------------------

    def render(self) -> str:
        import resource
        per_service = self.max_conns or default_max_conns(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        idle = f"{self.idle_timeout:g}s" if self.idle_timeout else "24d"  # haproxy's longest
        lines = [
            "# Written by deployfs; rewritten on every change.  Edit at your peril.",
            "global",
            "    master-worker",
            f"    stats socket {self.admin} mode 600 level admin expose-fd listeners",
            f"    maxconn {_maxconn()}",
            "    hard-stop-after 60s  # old workers after a reload: bounded, even with keep-alive clients",
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            f"    timeout client {idle}  # --idle-timeout",
            f"    timeout server {idle}",
            "    timeout client-fin 5s",
        ]
        for service, (port, servers) in sorted(self.live.items()):
            http = self.modes.get(service) == "http"
            lines += [f"frontend fe_{service}", f"    bind {self.bind}:{port}", f"    maxconn {per_service}"]
            if http:
                lines += ["    mode http", "    option forwardfor"]
            lines += [f"    default_backend be_{service}",
                      f"backend be_{service}", f"    balance {self.balance}"]
            if http:
                lines += ["    mode http", "    retries 3", "    option redispatch 1",
                          "    retry-on conn-failure empty-response response-timeout"]
            weights = self.weights.get(service, {})
            for name, (b, draining) in sorted(servers.items()):
                if not draining:
                    weight = f" weight {weights[name]}" if name in weights else ""
                    lines.append(f"    server {name} {b[0]}:{b[1]} pool-max-conn -1 pool-purge-delay 5s{weight}")
        return "\n".join(lines) + "\n"

    def _write(self, *, applied: bool = False) -> None:
        """Write the configuration.  ``applied``: haproxy already runs it (changed through the
        admin socket), so a failure to save it (a full state disk) is logged, and the next
        write catches up; otherwise it is a RouterError (an event), never a crash of the feeder."""
        tmp = self.cfg + ".tmp"
        try:
            with statedir.open_file(tmp, "w") as f:
                f.write(self.render())
            os.replace(tmp, self.cfg)
        except OSError as e:
            if not applied:
                raise RouterError(f"cannot write {self.cfg}: {e.strerror or e}") from None
            log.warning("cannot save %s (haproxy already runs it): %s", self.cfg, e.strerror or e)

    async def _reload(self) -> None:
        """Rewrite the configuration and reload; return once the new worker serves it."""
        self._write()
        before = await self.workers()
        await self.cmd("reload", master=True)

        async def new_worker() -> bool:
            try:
                return bool((await self.workers()) - before)
            except RouterError:
                return False  # the master re-executes itself to reload: its socket is briefly gone
        await _until(new_worker, "started no new worker after a reload")

    async def _any_worker(self) -> bool:
        try:
            return bool(await self.workers())
        except RouterError:
            return False  # the master socket is not up yet

    # -- TableFeeder ---------------------------------------------------------------------------------

    async def _ensure(self) -> None:
        pid = _read_pid(self.pidfile)
        if pid and _cmdline_has(pid, b"haproxy"):
            try:
                await self.cmd("show proc", master=True, timeout=3)
                self.pid = pid
                await self._read_live()
                log.info("adopted the running haproxy (pid %d)", pid)
                return
            except RouterError:
                pass
        self.live, self.weights, self.modes = {}, {}, {}
        self._write()
        env = self._marked_env()
        log_file = statedir.open_file(os.path.join(self.state_dir, "haproxy.log"), "ab")
        try:
            proc = subprocess.run([self.haproxy, "-W", "-D", "-f", self.cfg, "-S", f"{self.master},mode,600",
                                   "-p", self.pidfile], stdin=subprocess.DEVNULL, stdout=log_file,
                                  stderr=subprocess.STDOUT, env=env, start_new_session=True, timeout=30,
                                  umask=0o077)  # its pid file, in the state directory, owner-only too
        except FileNotFoundError:
            raise RouterError(f"{self.haproxy} is not installed (apt-get install haproxy)") from None
        finally:
            log_file.close()
        if proc.returncode != 0:
            raise RouterError(f"haproxy did not start (status {proc.returncode}); see haproxy.log")
        async def pidfile() -> bool:
            return _read_pid(self.pidfile) is not None
        await _until(pidfile, "wrote no pidfile")
        self.pid = _read_pid(self.pidfile)
        await _until(self._any_worker, "has no worker")

    async def _read_live(self) -> None:
        """After adopting haproxy, learn what it serves from its configuration and state."""
        self.live, self.weights, self.modes = {}, {}, {}
        service = None
        with statedir.open_file(self.cfg, "r") as cfg:
            for line in cfg:
                words = line.split()
                if words[:1] == ["frontend"]:
                    service = words[1].removeprefix("fe_")
                elif words == ["mode", "http"] and service:
                    self.modes[service] = "http"
                elif words[:1] == ["bind"] and service:
                    self.live[service] = (int(words[1].rsplit(":", 1)[1]), {})
                elif words[:1] == ["backend"]:
                    service = words[1].removeprefix("be_")
                elif words[:1] == ["server"] and "weight" in words[:-1] and service:
                    # A canary's weights, so that a later table without them puts each back to 1.
                    self.weights.setdefault(service, {})[words[1]] = int(words[words.index("weight") + 1])
        for service, (port, servers) in self.live.items():
            out = await self.cmd(f"show servers state be_{service}")
            for row in out.splitlines()[2:]:
                f = row.split()
                if len(f) > 18:
                    servers[f[3]] = ((f[4], int(f[18])), f[6] != "0")

    async def _apply(self, service: str, port: int | None, backends: list[Backend],
                     weights: list[int] | None, protocol: str = "tcp") -> None:
        if port is None:
            self.weights.pop(service, None)
            if service in self.live:
                del self.live[service]
                self.modes.pop(service, None)
                await self._reload()
            return
        want = {_name(b): b for b in backends}
        had = self.weights.pop(service, {})
        if weights is not None:
            self.weights[service] = {_name(b): w for b, w in zip(backends, weights)}
        if service not in self.live or self.live[service][0] != port or self.modes.get(service, "tcp") != protocol:
            before, mode_before = self.live.get(service), self.modes.get(service)
            self.live[service] = (port, {n: (b, False) for n, b in want.items()})
            self.modes[service] = protocol
            try:
                await self._reload()
            except RouterError:
                # A frontend that cannot bind fails every later reload too: take it out again.
                if before is None:
                    del self.live[service]
                    self.modes.pop(service, None)
                else:
                    self.live[service] = before
                    self.modes[service] = mode_before or "tcp"
                self._write()
                raise
            return
        servers = self.live[service][1]
        for name, b in want.items():
            if name not in servers:
                await self._expect(f"add server be_{service}/{name} {b[0]}:{b[1]} pool-max-conn -1 "
                                   "pool-purge-delay 5s", "New server registered")
            # Weights change at run time, no reload: set before a server is made ready, so it
            # never takes a connection at the wrong weight.
            weight = self.weights.get(service, {}).get(name, 1)
            if had.get(name, 1) != weight or name not in servers:
                out = await self.cmd(f"set server be_{service}/{name} weight {weight}")
                if out.strip():  # silence is success
                    raise RouterError(f"haproxy: set weight of {name}: {out.strip()}")
            if name not in servers or servers[name][1]:
                await self.cmd(f"set server be_{service}/{name} state ready")
            servers[name] = (b, False)
        for name, (b, draining) in list(servers.items()):
            if name not in want and not draining:
                await self.cmd(f"set server be_{service}/{name} state drain")
                servers[name] = (b, True)
        self._write(applied=True)

    async def _expect(self, line: str, ok: str) -> None:
        out = await self.cmd(line)
        if ok not in out:
            raise RouterError(f"haproxy: {line!r}: {out.strip()}")

    async def _drain(self, service: str, backend: Backend, timeout: float) -> int:
        name = _name(backend)
        left = 0
        with trio.move_on_after(timeout):
            while (left := await self._in_use(service, name)) > 0:
                await trio.sleep(0.05)
        await self.cmd(f"set server be_{service}/{name} state maint")
        if service in self.live:
            self.live[service][1].pop(name, None)
        self._write(applied=True)
        # `del server` wants no connection at all, idle pooled ones included:
        # that is only true once the instance has stopped, which is after we return.
        self.nursery.start_soon(self._delete, service, name)
        return left

    async def _delete(self, service: str, name: str) -> None:
        with trio.move_on_after(120):
            while True:
                try:
                    out = await self.cmd(f"del server be_{service}/{name}")
                except RouterError:
                    out = ""
                if "Server deleted" in out or "No such" in out or "Unknown" in out:
                    return
                await trio.sleep(0.5)

    async def _in_use(self, service: str, name: str) -> int:
        """Current sessions on one server (`scur` of `show stat`)."""
        out = await self.cmd("show stat")
        for row in out.splitlines():
            f = row.split(",")
            if len(f) > 4 and f[0] == f"be_{service}" and f[1] == name:
                return int(f[4] or 0)
        return 0

    async def _stop_process(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGUSR1)  # soft stop: finish what is in flight
            except ProcessLookupError:
                pass

    def _alive(self) -> bool:
        return self.pid is not None and _cmdline_has(self.pid, b"haproxy")

    async def _ping(self) -> dict:
        await self.cmd("show proc", master=True, timeout=PING_TIMEOUT)
        # The newest worker's counters, in the built-in router's shape, for the metrics.
        return {"routes": _routes(await self.cmd("show stat", timeout=PING_TIMEOUT), self.live)}


def _routes(stat: str, live: dict[str, tuple[int, dict[str, tuple[Backend, bool]]]]) -> dict:
    """`show stat` (CSV) as per-backend connection counts: scur, stot and econ of each server
    (by its address, so a draining server still counts), the frontend's scur as `open`."""
    lines = stat.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    header = lines[0][2:].split(",")
    routes: dict[str, dict] = {service: {"port": port, "backends": [list(b) for b, draining in servers.values()
                                                                    if not draining],
                                         "active": {}, "total": {}, "failed": {}}
                               for service, (port, servers) in live.items()}
    for line in lines[1:]:
        f = dict(zip(header, line.split(",")))
        kind, _, service = f.get("pxname", "").partition("_")
        r = routes.get(service)
        if r is None:
            continue
        if kind == "fe" and f.get("svname") == "FRONTEND":
            r["open"] = int(f.get("scur") or 0)
        elif kind == "be" and f.get("svname") != "BACKEND" and f.get("addr"):
            addr = f["addr"]
            r["active"][addr], r["total"][addr] = int(f.get("scur") or 0), int(f.get("stot") or 0)
            r["failed"][addr] = int(f.get("econ") or 0)
    return routes


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Poll ``check``; past ``timeout`` it is a RouterError, like every other haproxy
    failure, so the feeder reports it and goes on instead of dying."""
    with trio.move_on_after(timeout):
        while not await check():
            await trio.sleep(0.02)
        return
    raise RouterError(f"haproxy {what} within {timeout:g} s; see haproxy.log")
