"""The router's copying loop: bytes between connection pairs, in one thread.

Why not a trio task per direction (what the router did first): copying is
the one thing the router does per *request*, and each trio wait costs two
epoll_ctl calls, a failed recv and a pass through the scheduler.  Against a
Python backend on two cores that held the router to 0.41-0.71x of direct.
Here every socket is registered once, edge-triggered, and an event costs a
recv and a send; accepting, choosing a backend, retrying a refused connect,
counting connections for drains and the control protocol stay trio code,
because they happen once per connection and read best as it.

Ownership: :meth:`Relay.add` takes a pair of connected non-blocking sockets
(detached from trio) and from then on only the relay thread touches them.
When both directions have ended, or one broke, the relay closes both and
calls ``done`` in trio's thread (via the trio token).  End of stream is
passed on as a half-close (shutdown SHUT_WR);
an error on one side resets the other (SO_LINGER 0), so a client never takes
a cut response for a whole one.

Edge-triggered rules this relies on: a direction reads until recv would
block (a short read means the queue was empty, and any later arrival raises
a new edge), and while it holds bytes the other side would not take, it
stops reading and resumes on that side's EPOLLOUT edge.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._http import HttpRoute

log = logging.getLogger("deployfs.router")

BUF = 65536
_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP
_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


class _Flow:
    """One direction of a pair: bytes read from ``src`` are written to ``dst``."""

    __slots__ = ("src", "dst", "pending", "ended")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.pending: memoryview | None = None  # read, not yet taken by dst
        self.ended = False  # EOF seen and passed on


class Pair:
    __slots__ = ("label", "socks", "flows", "done", "closed", "last")

    def __init__(self, a: socket.socket, b: socket.socket, label: str, done: Callable[[], None]) -> None:
        self.label, self.socks, self.done = label, (a, b), done
        self.flows = (_Flow(a, b), _Flow(b, a))
        self.closed = False
        self.last = time.monotonic()  # when a byte last moved, either way: for the idle timeout


class Relay:
    def __init__(self, call_in_owner: Callable[[Callable[[], None]], None], *,
                 idle_timeout: float | None = None) -> None:
        # call_in_owner runs a callback in the thread that owns the pairs'
        # bookkeeping (trio's: TrioToken.run_sync_soon).
        self._call = call_in_owner
        # A pair with no byte either way for this long is closed (None: never).
        # Swept a few times per timeout, not timed per pair: cheap for thousands.
        self.idle_timeout = idle_timeout
        self.idle_closed = 0
        self._pairs: set[Pair] = set()
        self._swept = time.monotonic()
        self._ep = select.epoll()
        self._fds: dict[int, tuple[Pair, int]] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._aborts: list[Pair] = []
        self._posts: list[Callable[[], None]] = []  # to run in the relay thread
        self._http_routes: set[HttpRoute] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()

    # -- called from the owner's thread -------------------------------------------------

    def add(self, a: socket.socket, b: socket.socket, label: str, done: Callable[[], None]) -> Pair:
        pair = Pair(a, b, label, done)
        self._pairs.add(pair)
        for i, s in enumerate(pair.socks):
            s.setblocking(False)
            self._fds[s.fileno()] = (pair, i)
        for s in pair.socks:  # registering reports what is already readable: nothing is missed
            self._ep.register(s.fileno(), _MASK)
        return pair

    def add_http(self, sock: socket.socket, route: HttpRoute, peer: str, label: str,
                 done: Callable[[], None]) -> Any:
        """Serve one client connection as HTTP (``protocol http``): requests go to the route's
        instances one at a time, each to the instance the route picks for it."""
        from ._http import HttpConn
        sock.setblocking(False)
        conn = HttpConn(self, route, sock, peer, label, done)
        self._pairs.add(conn)  # type: ignore[arg-type]
        self.register(conn.fd, conn)
        return conn

    def http_route(self, policy: str, poke: Callable[[], None]) -> HttpRoute:
        """A service's request balancing state; ``poke`` runs in the owner's thread when a drain may be over."""
        from ._http import HttpRoute
        route = HttpRoute(self, policy, poke)
        self._http_routes.add(route)
        return route

    def drop_http_route(self, route: HttpRoute) -> None:
        def drop() -> None:
            route.close_all()
            self._http_routes.discard(route)
        self.post(drop)

    def post(self, fn: Callable[[], None], then: Callable[[], None] | None = None) -> None:
        """Run ``fn`` in the relay thread, then ``then`` in the owner's."""
        def both() -> None:
            fn()
            if then is not None:
                self.call_owner(then)
        self._posts.append(both)
        self._wake()

    # -- for the http connections, in the relay thread -----------------------------------

    def register(self, fd: int, obj: object) -> None:
        self._fds[fd] = (obj, 0)  # type: ignore[assignment]
        self._ep.register(fd, _MASK)

    def unregister(self, fd: int) -> None:
        self._fds.pop(fd, None)
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass

    def forget(self, conn: object) -> None:
        self._pairs.discard(conn)  # type: ignore[arg-type]

    def call_owner(self, fn: Callable[[], None]) -> None:
        try:
            self._call(fn)
        except RuntimeError:
            pass  # the owner's loop has ended: nobody waits any more

    def tunnel(self, a: socket.socket, b: socket.socket, label: str, done: Callable[[], None], *,
               to_up: bytes, to_client: bytes) -> None:
        """Turn an upgraded HTTP connection (client ``a``, instance ``b``) into a byte pipe."""
        pair = Pair(a, b, label, done)
        self._pairs.add(pair)
        for i, s in enumerate(pair.socks):
            self._fds[s.fileno()] = (pair, i)
            self._ep.register(s.fileno(), _MASK)
        for flow, data in zip(pair.flows, (to_up, to_client)):
            if data:
                flow.pending = memoryview(data)
        for flow in pair.flows:  # their edges may have passed while they were HTTP: look now
            self._flow(pair, flow, rdhup=False)

    def abort(self, pair: Pair) -> None:
        """Reset both ends (the route was removed); done is still called."""
        self._aborts.append(pair)
        self._wake()

    def close(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout=5)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already awake-pending

    # -- the relay thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            # Every connection would hang with nobody copying: better to die
            # loudly, so deployfs starts a new router and sends it the table.
            log.critical("the relay loop failed", exc_info=True)
            os._exit(70)

    def _loop(self) -> None:
        while not self._stopping:
            idle = self.idle_timeout
            every = min(1.0, idle / 4) if idle else -1.0
            if self._http_routes:
                every = min(every, 0.25) if every > 0 else 0.25  # pooled connections expire
            events = self._ep.poll(every)
            if every > 0 and time.monotonic() - self._swept >= every:
                self._sweep(idle)
            for fd, ev in events:
                if fd == self._wake_r:
                    self._drain_wake()
                    continue
                entry = self._fds.get(fd)
                if entry is None:
                    continue
                pair, i = entry
                if pair.__class__ is not Pair:  # an http connection or one of its upstreams
                    try:
                        pair.event(ev)  # type: ignore[attr-defined]
                    except Exception:
                        log.exception("http connection failed")
                        self._finish(pair, rst=True)
                    continue
                try:
                    if ev & select.EPOLLERR:  # reset or unreachable: nothing more will pass either way
                        err = pair.socks[i].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        log.info("relay %s broke: %s", pair.label, os.strerror(err) if err else "socket error")
                        self._finish(pair, rst=True)
                        continue
                    out, into = pair.flows[i], pair.flows[1 - i]
                    if ev & select.EPOLLOUT and into.pending is not None:
                        self._flow(pair, into, rdhup=False)
                    if ev & _READ and out.pending is None and not out.ended:
                        self._flow(pair, out, rdhup=bool(ev & select.EPOLLRDHUP))
                except Exception:  # a bug in one pair must not stop every other
                    log.exception("relay %s failed", pair.label)
                    self._finish(pair, rst=True)
        for pair, _ in list(self._fds.values()):
            self._finish(pair, rst=True)
        self._ep.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _sweep(self, idle: float | None) -> None:
        now = self._swept = time.monotonic()
        for route in list(self._http_routes):
            route.sweep(now)
        if not idle:
            return
        pairs = list(self._pairs)  # one C-level copy: the owner's thread adds pairs meanwhile
        idle_pairs = [p for p in pairs if now - p.last > idle]
        for pair in idle_pairs:
            self._finish(pair, rst=False)
        if idle_pairs:
            self.idle_closed += len(idle_pairs)
            log.info("closed %d connection(s) idle for %gs", len(idle_pairs), idle)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._aborts:
            self._finish(self._aborts.pop(), rst=True)
        while self._posts:
            self._posts.pop(0)()

    def _flow(self, pair: Pair, f: _Flow, rdhup: bool) -> None:
        """Move bytes src -> dst until src has none or dst takes no more."""
        if pair.closed:
            return
        short = False
        pair.last = time.monotonic()
        try:
            while True:
                if f.pending is not None:
                    sent = f.dst.send(f.pending)
                    if sent < len(f.pending):
                        f.pending = f.pending[sent:]
                        return  # dst is full: its EPOLLOUT edge resumes us
                    f.pending = None
                    if short and not rdhup:
                        return  # src was emptied by that read: its next edge resumes us
                data = f.src.recv(BUF)
                if not data:
                    f.ended = True
                    f.dst.shutdown(socket.SHUT_WR)
                    if pair.flows[0].ended and pair.flows[1].ended:
                        self._finish(pair, rst=False)
                    return
                f.pending, short = memoryview(data), len(data) < BUF
        except BlockingIOError:
            return
        except OSError as e:
            # One side broke: reset the other, so nobody mistakes a cut response for a whole one.
            log.info("relay %s broke: %s", pair.label, e)
            self._finish(pair, rst=True)

    def _finish(self, pair: Pair, rst: bool) -> None:
        if pair.__class__ is not Pair:
            from ._http import Upstream
            if isinstance(pair, Upstream):
                if pair.owner is not None:
                    pair.owner.finish(rst=True)
                pair.route.close(pair)
            else:
                pair.finish(rst)  # type: ignore[attr-defined]
            return
        if pair.closed:
            return
        pair.closed = True
        self._pairs.discard(pair)
        for s in pair.socks:
            try:
                fd = s.fileno()
                self._fds.pop(fd, None)
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass
            if rst:
                reset(s)
            s.close()
        try:
            self._call(pair.done)
        except RuntimeError:
            pass  # the owner's loop has ended (router shutting down): nobody waits any more


class _HasSockopt(Protocol):
    def setsockopt(self, level: int, option: int, value: bytes, /) -> None: ...


def reset(s: _HasSockopt) -> None:
    """Make the coming close send RST instead of FIN."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
