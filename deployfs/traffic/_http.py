"""``protocol http`` in the relay thread: requests, not byte streams (docs/traffic.md).

Why the router parses HTTP at all: forwarding bytes, it cannot tell an idle
keep-alive connection from a busy one, so when an app closes its idle
connections on SIGTERM a client's next request meets a reset.  Here the
router keeps the client's connection itself, picks a healthy instance per
request, pools its own upstream connections, closes the idle ones to an
instance leaving routing at once, and retries an idempotent request that an
instance dropped without a byte of answer.

Why a hand-written parser and not h11: it runs once per request in the one
relay thread, and only has to find where each message ends (the request is
re-framed strictly, the response copied as it comes); h11 builds event
objects and header lists per message, several times the cost.  It is
strict where smuggling lives: both Content-Length and Transfer-Encoding, a
Transfer-Encoding other than ``chunked``, a malformed or conflicting length,
obs-fold or a space before the colon are each a 400 and the connection is
closed.

Everything here runs in the relay thread, on non-blocking sockets
registered edge-triggered: each socket keeps ``rd``/``wr`` hints (set by an
edge, cleared by a short read, EAGAIN or a short send), and ``pump`` makes
every step those hints allow, so nothing waits for an edge that already
passed.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._balance import smooth_weighted
from ._relay import reset

if TYPE_CHECKING:
    from ._relay import Relay

log = logging.getLogger("deployfs.router")
Backend = tuple[str, int]

BUF = 65536
MAX_HEAD = 65536  # request or response head; a bigger one is refused
HWM = 262144  # bytes queued for a socket before its source stops being read
POOL_IDLE = 1.0  # an idle upstream connection is closed after this: below every app's keep-alive timeout
CONNECT_TIMEOUT = 2.0
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# The peer's FIN came with that edge: a short read no longer means the queue is empty
# (the FIN is still to be read, and no new edge will announce it).
_HUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_OUT = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"upgrade"))


class BadMessage(Exception):
    pass


class Framer:
    """Where one message body ends, counted over raw bytes: a length, chunks, or the connection's end."""

    __slots__ = ("left", "chunked", "state", "to_close", "done")

    def __init__(self, length: int = 0, chunked: bool = False, to_close: bool = False) -> None:
        self.left, self.chunked, self.to_close = length, chunked, to_close
        self.state = 0  # chunked: 0 size line, 1 data, 2 CRLF after data, 3 trailer
        self.done = not chunked and not to_close and length == 0

    def take(self, buf: bytearray) -> int:
        """How many bytes at the start of ``buf`` belong to the body (sets ``done`` at its end)."""
        if self.to_close:
            return len(buf)
        if not self.chunked:
            n = min(self.left, len(buf))
            self.left -= n
            self.done = self.left == 0
            return n
        pos, end = 0, len(buf)
        while pos < end and not self.done:
            if self.state == 1:
                n = min(self.left, end - pos)
                pos += n
                self.left -= n
                if self.left == 0:
                    self.state = 2
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if end - pos > 4096:
                    raise BadMessage("chunk line too long")
                break
            line = bytes(buf[pos:nl]).rstrip(b"\r")
            pos = nl + 1
            if self.state == 0:
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
                    raise BadMessage("bad chunk size")
                self.left = int(size, 16)
                self.state = 1 if self.left else 3
            elif self.state == 2:
                if line:
                    raise BadMessage("chunk not followed by CRLF")
                self.state = 0
            elif not line:  # state 3: the empty line that ends the trailer
                self.done = True
        return pos


def _headers(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes, bytes]]]:
    """(start line, [(lower name, value, raw line)]); obs-fold and malformed lines are a BadMessage."""
    lines = head.split(b"\r\n")
    out = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in b" \t":
            raise BadMessage("obsolete line folding")
        name, sep, value = line.partition(b":")
        if not sep or not name or not _TOKEN.issuperset(name):
            raise BadMessage("malformed header line")
        out.append((name.lower(), value.strip(), line))
    return lines[0], out


class Request:
    __slots__ = ("method", "head", "body", "keep", "upgrade", "replay", "http10")

    def __init__(self, head: bytes, peer: bytes) -> None:
        start, headers = _headers(head)
        parts = start.split(b" ")
        if len(parts) != 3 or not parts[0] or not _TOKEN.issuperset(parts[0]) or not parts[1]:
            raise BadMessage("malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise BadMessage("unsupported HTTP version")
        self.method, self.http10 = method, version == b"HTTP/1.0"
        length: int | None = None
        chunked = False
        conn: set[bytes] = set()
        upgrade = b""
        xff = b""
        kept: list[bytes] = [start]
        for name, value, line in headers:
            if name == b"content-length":
                if not value.isdigit() or len(value) > 18 or (length is not None and int(value) != length):
                    raise BadMessage("bad Content-Length")
                length = int(value)
            elif name == b"transfer-encoding":
                if value.lower() != b"chunked" or chunked:
                    raise BadMessage("unsupported Transfer-Encoding")
                chunked = True
            elif name == b"connection":
                conn.update(t.strip().lower() for t in value.split(b","))
                continue
            elif name == b"upgrade":
                upgrade = value
                continue
            elif name == b"x-forwarded-for":
                xff = value if not xff else xff + b", " + value
                continue
            elif name in _HOP:
                continue
            kept.append(line)
        if chunked and length is not None:
            raise BadMessage("both Content-Length and Transfer-Encoding")
        self.body = Framer(length or 0, chunked)
        self.keep = b"keep-alive" in conn if self.http10 else b"close" not in conn
        self.upgrade = bool(upgrade) and b"upgrade" in conn
        if self.upgrade:
            kept += [b"Connection: Upgrade", b"Upgrade: " + upgrade]
        kept.append(b"X-Forwarded-For: " + (xff + b", " + peer if xff else peer))
        self.head = b"\r\n".join(kept) + b"\r\n\r\n"
        # Safe to send again elsewhere if an instance drops it unanswered: idempotent, and whole in hand.
        self.replay = method in IDEMPOTENT and self.body.done and not self.upgrade


def _send(sock: socket.socket, buf: bytearray) -> bool:
    """Send what the socket takes of ``buf`` now, dropping it from ``buf``; False once the socket
    is full (its next EPOLLOUT edge says when to go on).  Other errors are the caller's."""
    try:
        n = sock.send(buf)
    except BlockingIOError:
        return False
    full = n < len(buf)
    del buf[:n]
    return not full


def _response(status: int, reason: str) -> bytes:
    body = f"{status} {reason}\n".encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


class Upstream:
    """One router-owned connection to an instance: pooled between requests."""

    __slots__ = ("sock", "fd", "backend", "route", "rd", "wr", "connected", "eof", "owner", "out", "inbuf",
                 "since", "closed", "hup")

    def __init__(self, route: HttpRoute, backend: Backend) -> None:
        self.route, self.backend = route, backend
        self.sock = socket.socket(socket.AF_INET6 if ":" in backend[0] else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()
        self.rd = self.wr = self.eof = self.closed = self.hup = False
        self.connected = False
        self.owner: HttpConn | None = None
        self.out = bytearray()
        self.inbuf = bytearray()
        self.since = time.monotonic()
        err = self.sock.connect_ex(backend)
        if err not in (0, errno.EINPROGRESS):
            self.sock.close()
            raise OSError(err, os.strerror(err))
        self.connected = err == 0
        self.wr = self.connected

    def event(self, ev: int) -> None:
        if ev & _IN:
            self.rd = True
            if ev & _HUP:
                self.hup = True
        if ev & _OUT:
            self.wr = True
            if not self.connected:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.eof = True  # the connect failed: nothing was sent
                    self.wr = False
                else:
                    self.connected = True
                    self.route.connecting.discard(self)
        if self.owner is not None:
            self.owner.pump()
        elif self.rd:
            self.route.idle_event(self)

    def recv(self) -> None:
        """Read what the instance sent into ``inbuf`` (``eof`` on end or error)."""
        try:
            while True:
                data = self.sock.recv(BUF)
                if not data:
                    self.eof = True
                    self.rd = False
                    return
                self.inbuf += data
                if len(data) < BUF and not self.hup:
                    self.rd = False
                    return
        except BlockingIOError:
            self.rd = False
        except OSError:
            self.eof = True
            self.rd = False

    def send(self) -> None:
        try:
            self.wr = _send(self.sock, self.out)
        except OSError:
            self.eof = True
            self.out.clear()


class HttpRoute:
    """A service's backends, balancing and pooled upstream connections, as the relay thread sees them."""

    def __init__(self, relay: Relay, policy: str, poke: Callable[[], None]) -> None:
        self.relay, self.policy, self.poke = relay, policy, poke
        self.backends: list[Backend] = []
        self.routed: set[Backend] = set()
        self.weights: dict[Backend, int] | None = None  # a canary_weight's shares; None: even
        self.credit: dict[Backend, int] = {}
        # For the metrics, per backend: requests sent to it, connects to it that failed.
        self.sent: dict[Backend, int] = {}
        self.refused: dict[Backend, int] = {}
        self.idle: dict[Backend, list[Upstream]] = {}
        self.conns: dict[Backend, int] = {}  # open upstream connections (idle or busy): what a drain waits for
        self.rr = 0
        self.connecting: set[Upstream] = set()  # connects in progress, timed out by sweep
        self.requests = self.retried = self.failed = 0
        self.unavailable = 0  # requests answered 503: no instance in routing (the metrics count them refused)

    # relay thread only
    def update(self, backends: list[Backend], weights: dict[Backend, int] | None = None) -> None:
        self.backends = list(backends)
        self.routed = set(self.backends)
        self.weights, self.credit = weights, {}
        for b in list(self.idle):
            if b not in self.routed:  # leaving: close our idle connections to it now, before its app does
                for up in self.idle.pop(b):
                    self.close(up)
        # A backend gone for good is forgotten (until then the router's stats leave it out once idle).
        for counts in (self.sent, self.refused):
            for b in [b for b in counts if b not in self.routed and not self.conns.get(b)]:
                del counts[b]

    def choose(self, avoid: Backend | None) -> Backend | None:
        b, w = self.backends, self.weights
        if w is not None:
            b = [x for x in b if w.get(x)] or b  # weight 0: only when nothing else is left
        if avoid is not None and len(b) > 1:
            b = [x for x in b if x != avoid] or b
        if not b:
            return None
        if self.policy == "leastconn":
            return min(b, key=lambda x: (self.conns.get(x, 0) - len(self.idle.get(x, ())) + 1) / (w[x] if w else 1))
        if w is not None:
            return smooth_weighted(b, w, self.credit)
        pick = b[self.rr % len(b)]  # the first request goes to the first backend, as over tcp
        self.rr += 1
        return pick

    def get(self, backend: Backend) -> Upstream:
        pool = self.idle.get(backend)
        while pool:
            up = pool.pop()
            if not up.eof and not up.rd:
                return up
            self.close(up)
        up = Upstream(self, backend)
        if not up.connected:
            self.connecting.add(up)
        self.conns[backend] = self.conns.get(backend, 0) + 1
        self.relay.register(up.fd, up)
        return up

    def put(self, up: Upstream) -> None:
        """A finished exchange's connection: back to the pool if its instance still gets requests."""
        up.owner = None
        if up.eof or up.inbuf or up.out or up.backend not in self.routed:
            self.close(up)
            return
        up.since = time.monotonic()
        self.idle.setdefault(up.backend, []).append(up)

    def idle_event(self, up: Upstream) -> None:
        """An idle pooled connection became readable: the instance closed it (or broke the protocol)."""
        self.close(up)

    def close(self, up: Upstream) -> None:
        if up.closed:
            return
        up.closed = True
        self.connecting.discard(up)
        pool = self.idle.get(up.backend)
        if pool and up in pool:
            pool.remove(up)
        self.relay.unregister(up.fd)
        up.sock.close()
        self.conns[up.backend] -= 1
        if up.backend not in self.routed:
            self.relay.call_owner(self.poke)  # a drain may be waiting for this one

    def tunnel_closed(self, backend: Backend) -> None:
        self.conns[backend] -= 1
        self.relay.call_owner(self.poke)

    def sweep(self, now: float) -> None:
        for b, pool in list(self.idle.items()):
            for up in [u for u in pool if now - u.since > POOL_IDLE]:
                self.close(up)
        for up in [u for u in self.connecting if now - u.since > CONNECT_TIMEOUT]:
            self.connecting.discard(up)
            if not up.connected and not up.closed and up.owner is not None:
                up.eof = True  # as if refused: nothing was sent, so the request goes elsewhere
                up.owner.pump()

    def close_all(self) -> None:
        for b in list(self.idle):
            for up in self.idle.pop(b):
                self.close(up)


class HttpConn:
    """One client connection in http mode; at most one request at a time goes upstream."""

    def __init__(self, relay: Relay, route: HttpRoute, sock: socket.socket, peer: str, label: str,
                 done: Callable[[], None]) -> None:
        self.relay, self.route, self.sock, self.label, self.done = relay, route, sock, label, done
        self.peer = peer.encode()
        self.fd = sock.fileno()
        self.rd, self.wr, self.eof, self.hup = False, True, False, False
        self.cin = bytearray()
        self.cout = bytearray()
        self.closed = False
        self.last = time.monotonic()
        self.req: Request | None = None
        self.up: Upstream | None = None
        self.resp: Framer | None = None  # the response body, once its head is through
        self.sent = False  # some of this request's response reached the client: no retry any more
        self.up_keep = True
        self.close_after = False
        self.tries = 0
        self.failed: Backend | None = None

    def event(self, ev: int) -> None:
        if ev & _IN:
            self.rd = True
            if ev & _HUP:
                self.hup = True
        if ev & _OUT:
            self.wr = True
        self.pump()

    # -- the state machine --------------------------------------------------------------------

    def pump(self) -> None:
        if self.closed:
            return
        self.last = time.monotonic()
        try:
            self._pump()
        except BadMessage as e:
            self._refuse(400, "Bad Request", str(e))
        except OSError as e:
            # A client resetting between requests is routine (wrk at its end does); mid-request it is news.
            log.log(logging.INFO if self.req is not None else logging.DEBUG, "http %s broke: %s", self.label, e)
            self.finish(rst=True)

    def _pump(self) -> None:
        while not self.closed:
            progress = False
            if self.rd and not self.eof and len(self.cin) < HWM:
                self._read_client()
                progress = True
            req, up = self.req, self.up
            if req is None:
                if self.cout or self.close_after:
                    pass  # an answer still being written; after `Connection: close` no request is read
                elif self.eof and not self.cin:
                    self.finish(rst=False)
                    return
                else:
                    end = self.cin.find(b"\r\n\r\n")
                    if end < 0:
                        if len(self.cin) > MAX_HEAD:
                            self._refuse(431, "Request Header Fields Too Large", "request head too large")
                            return
                        if self.eof:
                            self.finish(rst=False)  # a partial request, then the client left
                            return
                    else:
                        head = bytes(self.cin[:end + 4])
                        del self.cin[:end + 4]
                        self.req = req = Request(head, self.peer)
                        self.tries = 0
                        self.failed = None
                        if not self._dispatch():
                            return
                        up = self.up
                        progress = True
            if req is not None and up is not None:
                if not req.body.done and self.cin and len(up.out) < HWM:
                    n = req.body.take(self.cin)
                    up.out += self.cin[:n]
                    del self.cin[:n]
                    progress = progress or n > 0
                if up.out and up.wr and up.connected:
                    up.send()
                    progress = True
                if up.rd and len(self.cout) < HWM:
                    up.recv()
                    progress = True
                if up.inbuf:
                    moved = self._response()
                    if moved < 0:
                        return
                    progress = progress or moved > 0
                if up.eof and self.up is up:
                    if not self._upstream_ended():
                        return
                    progress = progress or self.up is not up  # retried elsewhere
                if not req.body.done and self.eof and self.req is req:
                    self.finish(rst=True)  # the client left mid-upload: the instance must not take it as whole
                    return
            if self.cout and self.wr:
                self._write_client()
                progress = True
            if self.req is not None and self.resp is not None and self.resp.done and self.req.body.done:
                self._exchange_done()
                progress = True
            if self.req is None and self.close_after and not self.cout:
                self.finish(rst=False)
                return
            if not progress:
                return

    def _read_client(self) -> None:
        try:
            while len(self.cin) < HWM:
                data = self.sock.recv(BUF)
                if not data:
                    self.eof = True
                    break
                self.cin += data
                if len(data) < BUF and not self.hup:
                    break
            else:
                return  # stopped for backpressure: the hint stays set
        except BlockingIOError:
            pass
        self.rd = False

    def _write_client(self) -> None:
        self.wr = _send(self.sock, self.cout)

    def _dispatch(self) -> bool:
        """Send the current request to an instance; False if the connection ended instead."""
        route, req = self.route, self.req
        assert req is not None
        while True:
            backend = route.choose(self.failed)
            if backend is None or self.tries > len(route.backends) + 1:
                route.failed += 1
                if backend is None:
                    route.unavailable += 1
                    self._refuse(503, "Service Unavailable", "no healthy instance")
                else:
                    self._refuse(502, "Bad Gateway", "no instance answered")
                return False
            self.tries += 1
            try:
                up = route.get(backend)
            except OSError:
                route.refused[backend] = route.refused.get(backend, 0) + 1
                self.failed = backend
                continue
            up.owner = self
            up.out += req.head
            self.up, self.resp, self.sent, self.up_keep = up, None, False, True
            route.requests += 1
            route.sent[backend] = route.sent.get(backend, 0) + 1
            return True

    def _upstream_ended(self) -> bool:
        """The instance's connection ended or broke before this exchange finished."""
        up, req = self.up, self.req
        assert up is not None and req is not None
        if self.resp is not None and (self.resp.done or self.resp.to_close) and not up.inbuf:
            self.resp.done = True  # whole (or delimited by the connection's end, so whole now)
            self.up_keep = False
            return True
        if not up.connected:
            self.route.refused[up.backend] = self.route.refused.get(up.backend, 0) + 1
        if not self.sent and (not up.connected or req.replay):
            # Nothing of an answer came: refused (nothing was sent), or an idempotent request the
            # instance dropped as it closed.  Another instance gets it.
            self.route.retried += 1
            self.route.close(up)
            self.up = None
            self.failed = up.backend
            req.body = Framer()
            return self._dispatch()
        self.route.failed += 1
        self.route.close(up)
        self.up = None
        if self.sent:
            self.finish(rst=True)  # a cut response must not pass for a whole one
        else:
            self._refuse(502, "Bad Gateway", f"{up.backend[0]}:{up.backend[1]} closed without answering")
        return False

    def _response(self) -> int:
        """Pass on what the instance sent: the bytes consumed, or -1 if this connection is done with."""
        up, req = self.up, self.req
        assert up is not None and req is not None
        buf = up.inbuf
        before = len(buf)
        while buf:
            if self.resp is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise OSError("response head too large")
                    break
                head = bytes(buf[:end + 4])
                del buf[:end + 4]
                if not self._response_head(head):
                    return -1
                continue
            if self.resp.done:
                # More than the response: the connection cannot carry another exchange.
                self.up_keep = False
                buf.clear()
                break
            try:
                n = self.resp.take(buf)
            except BadMessage as e:
                raise OSError(f"bad response body: {e}") from None
            self.cout += buf[:n]
            del buf[:n]
            self.sent = True
            if n == 0:
                break
        return before - len(buf)

    def _response_head(self, head: bytes) -> bool:
        req, up = self.req, self.up
        assert req is not None and up is not None
        try:
            start, headers = _headers(head)
        except BadMessage as e:
            raise OSError(f"bad response head: {e}") from None
        parts = start.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise OSError("bad status line")
        status = int(parts[1])
        if status == 101 and req.upgrade:
            self.cout += head
            self.sent = True
            self._tunnel()
            return False
        if 100 <= status < 200:
            self.cout += head  # 100 Continue and the like: the client's, as they are
            self.sent = True
            return True
        length: int | None = None
        chunked = False
        conn: set[bytes] = set()
        rewrite = False
        for name, value, _ in headers:
            if name == b"content-length" and value.isdigit():
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                conn.update(t.strip().lower() for t in value.split(b","))
                rewrite = True
            elif name == b"keep-alive":
                rewrite = True
        if req.method == b"HEAD" or status in (204, 304):
            self.resp = Framer()
        elif chunked:
            self.resp = Framer(chunked=True)
        elif length is not None:
            self.resp = Framer(length)
        else:
            self.resp = Framer(to_close=True)
            self.close_after = True
        self.up_keep = not self.resp.to_close and (
            b"keep-alive" in conn if parts[0] == b"HTTP/1.0" else b"close" not in conn)
        if not req.keep:
            self.close_after = True
        if self.close_after or req.http10 or rewrite:
            # Connection is hop-by-hop: the instance's says what it does with *our* connection.
            lines = [start] + [line for name, _, line in headers if name not in (b"connection", b"keep-alive")]
            if self.close_after:
                lines.append(b"Connection: close")
            elif req.http10:
                lines.append(b"Connection: keep-alive")
            head = b"\r\n".join(lines) + b"\r\n\r\n"
        self.cout += head
        self.sent = True
        return True

    def _exchange_done(self) -> None:
        up = self.up
        self.req = self.up = self.resp = None
        if up is not None:
            if self.up_keep:
                self.route.put(up)
            else:
                self.route.close(up)

    def _refuse(self, status: int, reason: str, why: str) -> None:
        """Answer this connection's request ourselves, then close it."""
        log.info("http %s: %d %s", self.label, status, why)
        if self.up is not None:
            self.route.close(self.up)
            self.up = None
        self.req = None
        self.close_after = True
        self.cin.clear()
        self.eof = True  # read no further: the answer closes the connection
        self.cout += _response(status, reason)
        if self.wr:
            try:
                self._write_client()
            except OSError:
                self.finish(rst=True)
                return
        if not self.cout:
            self.finish(rst=False)

    def _tunnel(self) -> None:
        """A 101 Switching Protocols: from here the two connections are a byte pipe (drained like TCP)."""
        up = self.up
        assert up is not None
        self.closed = True
        self.relay.unregister(self.fd)
        self.relay.unregister(up.fd)
        self.relay.forget(self)
        up.closed = True  # the pipe owns its socket now; the route counts it until the pipe ends
        route, backend = self.route, up.backend

        def ended() -> None:
            self.relay.post(lambda: route.tunnel_closed(backend))
            self.done()
        self.relay.tunnel(self.sock, up.sock, self.label, ended, to_up=bytes(self.cin) + bytes(up.out),
                          to_client=bytes(self.cout) + bytes(up.inbuf))

    def finish(self, rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self.up is not None:
            self.route.close(self.up)
            self.up = None
        self.relay.unregister(self.fd)
        self.relay.forget(self)
        if rst:
            reset(self.sock)
        else:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.sock.close()
        self.relay.call_owner(self.done)

