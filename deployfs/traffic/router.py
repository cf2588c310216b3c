"""The traffic path: a TCP proxy per service, in a process of its own.

Why a separate process: traffic must keep flowing to the
instances last known healthy while ``deployfs serve`` is dead (crashed, or
being upgraded).  So the router runs in its own session, owns the public
listeners, and is only *fed* by the server over a unix socket in the state
directory.  A restarted server finds the router by its pidfile, re-adopts it
and sends it the full table again; the listeners never close.

Control protocol: one JSON object per connection, one JSON reply.
  {"op": "set", "service": S, "port": P, "backends": [[host, port], ...], "weights": [w, ...],
   "protocol": "tcp"|"http"}
      -> "weights" is optional (one per backend; a canary_weight sets them): without it each counts the same;
         "protocol" too (default tcp): http balances each request, not each connection
  {"op": "drain", "service": S, "backend": [host, port], "timeout": T}
      -> replies once the backend has no open connection, or at T
  {"op": "limits", "max_conns": N, "idle_timeout": T}
      -> per-service connection cap (0: from the descriptor limit), idle timeout (0: none)
  {"op": "stats"}   {"op": "quit"}

Limits (one router serves every service, so one service must not starve the
others of descriptors): each service holds at most ``max_conns`` client
connections (two descriptors each, with the backend's); past that a new one
is accepted and reset at once.  A pair with no byte either way for
``idle_timeout`` is closed.  Running out of descriptors anyway (EMFILE) is
logged once per episode, not per accept, and the accept waits for one to free.
Both states are in ``stats``, which the server polls (its liveness check) and
turns into one event each.

Forwarding: each accepted connection goes to the next backend (round-robin,
or least-connections; with weights, smooth weighted round-robin, so a backend
of weight 10 in 100 gets every tenth connection, not merely one in ten on
average, or the fewest connections per unit of weight).  If a backend refuses the connect, nothing has been
sent yet, so the next backend is tried.  With no backend at all the client
is reset at once rather than left hanging.  Once connected, the pair of
sockets is handed to the relay thread (_relay.py), which copies the bytes;
the connection's task waits for it to finish, so counts and drains stay here.
With ``protocol http`` the client socket alone goes to the relay thread,
which picks an instance per request (_http.py); a drain then waits for the
router's own connections to the instance, which it closes once idle.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import logging
import os
import resource
import signal
import socket
import sys
from typing import Callable
import time
from dataclasses import dataclass, field

import trio

from ..state import statedir
from ._balance import smooth_weighted
from ._http import HttpRoute
from ._relay import Relay, reset

log = logging.getLogger("deployfs.router")
Backend = tuple[str, int]
CONNECT_TIMEOUT = 2.0
RESERVED_FDS = 64  # the control socket, the relay's epoll and pipe, logs, a few accepts in flight
DEFAULT_IDLE_TIMEOUT = 300.0
# accept() failing for want of descriptors or memory: wait for one to free, never spin
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def raise_nofile() -> int:
    """Raise the soft descriptor limit to the hard one (each proxied connection costs two); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def default_max_conns(nofile: int) -> int:
    """A quarter of the descriptors a service's pairs may use: one flooded service leaves the rest to others."""
    return max(16, (nofile - RESERVED_FDS) // 2 // 4)


@dataclass
class Route:
    service: str
    port: int
    backends: list[Backend] = field(default_factory=list)
    weights: dict[Backend, int] | None = None  # None: every backend the same
    _credit: dict[Backend, int] = field(default_factory=dict)  # smooth weighted round-robin's running credit
    active: dict[Backend, int] = field(default_factory=dict)
    # Per backend, for the metrics: connections forwarded, and connects that failed.
    # Kept here, in the router process, so they outlive a server restart.
    total: dict[Backend, int] = field(default_factory=dict)
    failed: dict[Backend, int] = field(default_factory=dict)
    served: int = 0
    refused: int = 0
    open: int = 0  # client connections held now
    rejected: int = 0  # turned away at the connection cap
    saturated: bool = False  # at the cap now
    protocol: str = "tcp"  # how new connections are served: tcp (bytes) or http (requests)
    http: HttpRoute | None = None  # the relay's per-request balancing, once the route has served http
    scope: trio.CancelScope | None = None
    closed: trio.Event = field(default_factory=trio.Event)  # its listeners are closed
    changed: trio.Event = field(default_factory=trio.Event)
    _rr: itertools.count = field(default_factory=itertools.count)

    def candidates(self, policy: str) -> list[Backend]:
        """Every backend, in the order to try them for one connection."""
        b = list(self.backends)
        if not b:
            return []
        w = self.weights
        if w is not None:
            # A backend of weight 0 is tried only when every other one refused.
            if policy == "leastconn":
                return sorted(b, key=lambda x: (w[x] == 0, (self.active.get(x, 0) + 1) / (w[x] or 1)))
            first = smooth_weighted(b, w, self._credit)
            rest = [x for x in b if x != first]
            return [first] + sorted(rest, key=lambda x: w[x] == 0)
        if policy == "leastconn":
            return sorted(b, key=lambda x: self.active.get(x, 0))
        start = next(self._rr) % len(b)
        return b[start:] + b[:start]

    def busy(self, backend: Backend) -> int:
        """Connections a drain of ``backend`` waits for: TCP pairs, and in http mode our upstream connections."""
        return self.active.get(backend, 0) + (self.http.conns.get(backend, 0) if self.http else 0)

    def release(self, backend: Backend) -> None:
        self.active[backend] -= 1
        if not self.active[backend] and backend not in self.backends:
            # Its last connection after it left routing: its series end (set() could not drop them then).
            for counts in (self.active, self.total, self.failed):
                counts.pop(backend, None)
        self.poke()

    def live(self, backend: Backend) -> bool:
        """Still in the metrics: in routing, or out of it with a connection left (docs/operations.md)."""
        return backend in self.backends or self.busy(backend) > 0

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Router:
    def __init__(self, bind: str, policy: str = "roundrobin", *, nofile: int | None = None) -> None:
        self.bind, self.policy = bind, policy
        self.routes: dict[str, Route] = {}
        self.started = time.time()  # its counters count from here (metrics: a reset is explained)
        self.nursery: trio.Nursery
        self.relay: Relay
        self.nofile = nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_conns = default_max_conns(self.nofile)
        self.out_of_fds = 0  # accepts that failed for want of descriptors
        self._fds_short = False
        self._freed = trio.Event()  # a connection ended: a descriptor may be free again

    def limits(self, max_conns: int, idle_timeout: float) -> dict:
        self.max_conns = max_conns or default_max_conns(self.nofile)
        self.relay.idle_timeout = idle_timeout or None
        return {"ok": True, "max_conns": self.max_conns, "idle_timeout": idle_timeout}

    async def set(self, service: str, port: int | None, backends: list[Backend],
                  weights: list[int] | None = None, protocol: str = "tcp") -> dict:
        if weights is not None and (len(weights) != len(backends) or any(
                not isinstance(x, int) or x < 0 for x in weights) or not sum(weights)):
            return {"error": f"bad weights {weights!r}: one whole number >= 0 per backend, not all 0"}
        if protocol not in ("tcp", "http"):
            return {"error": f"unknown protocol {protocol!r}: tcp or http"}
        route = self.routes.get(service)
        if route is not None and (port is None or route.port != port):
            assert route.scope is not None
            route.scope.cancel()
            del self.routes[service]
            if route.http is not None:
                self.relay.drop_http_route(route.http)
            # Reply only once the port is free: a service applied next may bind it at once.
            await route.closed.wait()
            route = None
        if port is None:
            return {"ok": True}
        if route is None:
            route = Route(service, port)
            try:
                listeners = await trio.open_tcp_listeners(port, host=self.bind)
            except OSError as e:
                return {"error": f"cannot listen on {self.bind}:{port}: {e.strerror or e}"}
            route.scope = trio.CancelScope()
            self.routes[service] = route
            self.nursery.start_soon(self._serve, route, listeners)
        route.backends = [tuple(b) for b in backends]  # type: ignore[misc]
        route.weights = None if weights is None else dict(zip(route.backends, weights))
        route._credit = {}
        for counts in (route.total, route.failed):  # a backend gone for good: its series ends
            for b in [b for b in counts if b not in route.backends and not route.active.get(b)]:
                del counts[b]
        route.protocol = protocol
        if protocol == "http" and route.http is None:
            route.http = self.relay.http_route(self.policy, lambda: route.poke())
        if route.http is not None:
            # Kept in step even after a switch to tcp: its open client connections still use it.
            # Replied only once the relay thread has the list: a drain that follows counts from it.
            http, table, w, applied = route.http, list(route.backends), route.weights, trio.Event()
            self.relay.post(lambda: http.update(table, w), applied.set)
            await applied.wait()
        route.poke()
        return {"ok": True}

    async def _serve(self, route: Route, listeners: list[trio.SocketListener]) -> None:
        assert route.scope is not None
        with route.scope:
            try:
                async with trio.open_nursery() as n:
                    for lst in listeners:
                        n.start_soon(self._accept, route, lst, n)
            finally:
                for lst in listeners:
                    lst.socket.close()
                route.closed.set()

    async def accept(self, listener: trio.SocketListener) -> trio.SocketStream:
        """accept(); while descriptors are short, wait for one to free, with one log line per
        episode (trio.serve_listeners logs a traceback every 0.1 s instead)."""
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno not in _CAPACITY_ERRNOS:
                    raise
                self.out_of_fds += 1
                if not self._fds_short:
                    self._fds_short = True
                    log.warning("out of file descriptors (limit %d): %s; new connections wait", self.nofile,
                                os.strerror(e.errno or 0))
                with trio.move_on_after(0.1):
                    await self._freed.wait()
                continue
            if self._fds_short:
                self._fds_short = False
                log.info("file descriptors available again (%d accepts had to wait)", self.out_of_fds)
            return stream

    async def _accept(self, route: Route, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            client = await self.accept(listener)
            if route.open >= self.max_conns:
                route.rejected += 1
                if not route.saturated:
                    route.saturated = True
                    log.warning("%s: port %d at its limit of %d connections; refusing new ones", route.service,
                                route.port, self.max_conns)
                reset(client.socket)
                client.socket.close()
                continue
            route.open += 1
            nursery.start_soon(self._forward, route, client)

    async def _forward(self, route: Route, client: trio.SocketStream) -> None:
        try:
            await self._forward_one(route, client)
        except Exception:  # one connection's bug must not end the listener
            log.exception("forwarding failed")
            await client.aclose()
        finally:
            route.open -= 1
            if route.saturated and route.open < self.max_conns * 9 // 10:  # some slack: one line, not a flutter
                route.saturated = False
                log.info("%s: port %d below its connection limit again (%d refused so far)", route.service,
                         route.port, route.rejected)
            self._freed.set()
            self._freed = trio.Event()

    async def _forward_one(self, route: Route, client: trio.SocketStream) -> None:
        if route.protocol == "http" and route.http is not None:
            await self._serve_http(route, route.http, client)
            return
        upstream, chosen = None, None
        for backend in route.candidates(self.policy):
            # Counted from the connect on: a drain must also wait for a
            # connection that chose this backend just before it left routing.
            route.active[backend] = route.active.get(backend, 0) + 1
            with trio.move_on_after(CONNECT_TIMEOUT):
                try:
                    upstream = await trio.open_tcp_stream(*backend)
                    chosen = backend
                    break
                except OSError:
                    pass  # nothing was sent yet: try the next one
            route.failed[backend] = route.failed.get(backend, 0) + 1  # refused, or no answer in time
            route.release(backend)
        if upstream is None or chosen is None:
            route.refused += 1
            reset(client)
            await client.aclose()
            return
        route.served += 1
        route.total[chosen] = route.total.get(chosen, 0) + 1
        finished, pair = trio.Event(), None
        try:
            label = f"{_peer(client)} -> {chosen[0]}:{chosen[1]}"
            for st in (client, upstream):
                st.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # From here the relay thread owns both sockets and closes them.
            a, b = (socket.socket(fileno=st.socket.detach()) for st in (client, upstream))
            pair = self.relay.add(a, b, label, finished.set)
            await finished.wait()
        except OSError:
            pass  # the client left before the hand-over
        finally:
            if pair is None:
                await upstream.aclose()
                await client.aclose()
            elif not finished.is_set():
                self.relay.abort(pair)  # the route is going away: reset both ends
            route.release(chosen)

    async def _serve_http(self, route: Route, http: HttpRoute, client: trio.SocketStream) -> None:
        """Hand the client to the relay thread, which parses its requests and picks an instance for each."""
        route.served += 1
        finished, conn = trio.Event(), None
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = _peer(client)
            sock = socket.socket(fileno=client.socket.detach())
            conn = self.relay.add_http(sock, http, peer.rsplit(":", 1)[0], f"{peer} -> {route.service}",
                                       finished.set)
            await finished.wait()
        except OSError:
            pass  # the client left before the hand-over
        finally:
            if conn is None:
                await client.aclose()
            elif not finished.is_set():
                self.relay.abort(conn)  # the route is going away

    async def drain(self, service: str, backend: Backend, timeout: float) -> dict:
        route = self.routes.get(service)
        with trio.move_on_after(timeout):
            while route is not None and route.busy(backend) > 0:
                await route.changed.wait()
        left = route.busy(backend) if route else 0
        return {"ok": True, "left": left}

    def stats(self) -> dict:
        return {"pid": os.getpid(), "started": self.started, "nofile": self.nofile, "max_conns": self.max_conns,
                "idle_timeout": self.relay.idle_timeout or 0, "out_of_fds": self.out_of_fds,
                "fds_short": self._fds_short, "routes": {
            s: {"port": r.port, "backends": [list(b) for b in r.backends], "served": r.served,
                # tcp resets a client no backend took; http answers its request 503: both are refusals
                "refused": r.refused + (r.http.unavailable if r.http else 0),
                "weights": None if r.weights is None else [r.weights[b] for b in r.backends],
                "open": r.open, "rejected": r.rejected, "saturated": r.saturated,
                "protocol": r.protocol,
                **({"requests": r.http.requests, "retried": r.http.retried, "answered_by_router": r.http.failed}
                   if r.http else {}),
                "active": {f"{h}:{p}": r.busy((h, p)) for (h, p) in {*r.active, *(r.http.conns if r.http else ())}
                           if r.busy((h, p))},
                # In http mode a backend's total counts requests sent to it, failed its connects that failed.
                "total": _merged(r.live, r.total, r.http.sent if r.http else {}),
                "failed": _merged(r.live, r.failed, r.http.refused if r.http else {})} for s, r in self.routes.items()}}


def _merged(live: Callable[[Backend], bool], *counts: dict[Backend, int]) -> dict[str, int]:
    """The backends' counts summed, of those still live only: the relay thread keeps http's
    per-backend counts, and a backend it no longer routes to ends its series here."""
    out: dict[str, int] = {}
    for c in counts:
        for (h, p), n in list(c.items()):  # the relay thread may add a key meanwhile: copy first
            if live((h, p)):
                out[f"{h}:{p}"] = out.get(f"{h}:{p}", 0) + n
    return out


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


# -- the process ------------------------------------------------------------------

def sock_path(state_dir: str) -> str:
    return os.path.join(state_dir, "router.sock")


def pid_path(state_dir: str) -> str:
    return os.path.join(state_dir, "router.pid")


async def serve(state_dir: str, bind: str, policy: str) -> None:
    router = Router(bind, policy, nofile=raise_nofile())
    path = sock_path(state_dir)
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    with statedir.open_file(pid_path(state_dir), "w") as f:
        f.write(f"{os.getpid()}\n")

    async def control(stream: trio.SocketStream) -> None:
        # The server may die mid-request (that is the point of a separate
        # router): a broken control connection must never end the router.
        try:
            await _control(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            log.exception("bad control request")

    async def _control(stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            while b"\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            try:
                req = json.loads(buf)
                op = req["op"]
                if op == "set":
                    reply = await router.set(req["service"], req.get("port"), req.get("backends", []),
                                             req.get("weights"), req.get("protocol", "tcp"))
                elif op == "drain":
                    reply = await router.drain(req["service"], tuple(req["backend"]), float(req["timeout"]))
                elif op == "stats":
                    reply = router.stats()
                elif op == "limits":
                    reply = router.limits(int(req["max_conns"]), float(req["idle_timeout"]))
                elif op == "quit":
                    await stream.send_all(b'{"ok": true}\n')
                    nursery.cancel_scope.cancel()
                    return
                else:
                    reply = {"error": f"unknown op {op!r}"}
            except (ValueError, KeyError, TypeError) as e:
                reply = {"error": f"bad request: {e}"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    router.relay = Relay(trio.lowlevel.current_trio_token().run_sync_soon, idle_timeout=DEFAULT_IDLE_TIMEOUT)
    async def controls() -> None:
        async with trio.open_nursery() as n:
            while True:
                n.start_soon(control, await router.accept(listener))

    async with trio.open_nursery() as nursery:
        router.nursery = nursery
        nursery.start_soon(controls)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    router.relay.close()
    for p in (path, pid_path(state_dir)):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def main() -> None:
    p = argparse.ArgumentParser(prog="deployfs-router")
    p.add_argument("--state", required=True)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--balance", choices=["roundrobin", "leastconn"], default="roundrobin")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d deployfs-router: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    trio.run(serve, a.state, a.bind, a.balance)


if __name__ == "__main__":
    main()
