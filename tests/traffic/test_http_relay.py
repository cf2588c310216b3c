"""protocol http in the relay thread, on real loopback sockets (no router process, no trio).

Backends here are small raw-socket servers, so each test controls exactly what an
instance does: answer, stream, close an idle connection, drop a request unanswered.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from deployfs.traffic import _http
from deployfs.traffic._relay import Relay


class Backend:
    """A raw HTTP/1.1 server: ``handle(conn, head, rfile)`` answers one request; runs a thread per connection."""

    def __init__(self, handle: Callable[[socket.socket, bytes, object], bool]) -> None:
        self.handle = handle
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.addr = self.lst.getsockname()
        self.conns: list[socket.socket] = []
        self.requests: list[bytes] = []
        self.closed = 0  # connections the router closed
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lst.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        f = c.makefile("rb")
        try:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = f.readline()
                    if not line:
                        self.closed += 1
                        return
                    head += line
                self.requests.append(head)
                if not self.handle(c, head, f):
                    return
        except OSError:
            pass
        finally:
            f.close()  # else the makefile keeps the descriptor, and the connection, open
            c.close()

    def stop(self) -> None:
        self.lst.shutdown(socket.SHUT_RDWR)  # wakes the accept: a bare close leaves the port listening
        self.lst.close()


def ok(body: bytes = b"ok\n") -> Callable[[socket.socket, bytes, object], bool]:
    def handle(c: socket.socket, head: bytes, f: object) -> bool:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return True
    return handle


def named(name: bytes) -> Callable[[socket.socket, bytes, object], bool]:
    return ok(name)


@pytest.fixture
def relay():
    r = Relay(lambda fn: fn())
    yield r
    r.close()


class Front:
    """A listener whose connections the relay serves as HTTP for one route."""

    def __init__(self, relay: Relay, backends: list[Backend]) -> None:
        self.relay = relay
        self.pokes = 0
        self.route = relay.http_route("roundrobin", self._poke)
        self.update(backends)
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.addr = self.lst.getsockname()
        self.done = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _poke(self) -> None:
        self.pokes += 1

    def update(self, backends: list[Backend]) -> None:
        ev = threading.Event()
        self.relay.post(lambda: self.route.update([b.addr for b in backends]), ev.set)
        assert ev.wait(5)

    def _accept(self) -> None:
        while True:
            try:
                c, a = self.lst.accept()
            except OSError:
                return
            self.relay.add_http(c, self.route, a[0], "test", self._done)

    def _done(self) -> None:
        self.done += 1

    def client(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(*self.addr, timeout=10)

    def raw(self) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=10)
        return s


def get(conn: http.client.HTTPConnection, path: str = "/", **kw) -> tuple[int, bytes]:
    conn.request("GET", path, **kw)
    r = conn.getresponse()
    return r.status, r.read()


def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_one_keepalive_connection_is_balanced_per_request_with_x_forwarded_for(relay):
    a, b = Backend(named(b"a")), Backend(named(b"b"))
    front = Front(relay, [a, b])
    conn = front.client()
    bodies = [get(conn, headers={"X-Forwarded-For": "10.1.2.3"})[1] for _ in range(6)]
    assert sorted(bodies) == [b"a"] * 3 + [b"b"] * 3
    assert all(b"\r\nX-Forwarded-For: 10.1.2.3, 127.0.0.1\r\n" in h for h in a.requests + b.requests)
    assert len(a.conns) == len(b.conns) == 1  # the router's own connections are reused


def test_leaving_instance_gets_no_request_and_its_idle_connection_is_closed_at_once(relay):
    a, b = Backend(named(b"a")), Backend(named(b"b"))
    front = Front(relay, [a, b])
    conn = front.client()
    for _ in range(4):
        get(conn)
    front.update([b])
    until(lambda: a.closed == 1)  # our idle connection to it, closed by us, not by the app
    assert front.route.conns[a.addr] == 0 and front.pokes >= 1  # a drain sees it at once
    assert {get(conn)[1] for _ in range(4)} == {b"b"}  # the client's connection carries on


def test_idempotent_request_dropped_unanswered_is_retried_elsewhere_and_a_post_is_not(relay):
    def drop(c, head, f):
        return False  # reads the request, closes without a byte: an app shutting down
    bad, good = Backend(drop), Backend(named(b"good"))
    front = Front(relay, [bad, good])
    conn = front.client()
    assert [get(conn) for _ in range(4)] == [(200, b"good")] * 4
    assert len(bad.requests) >= 1 and front.route.retried >= 1
    front.update([bad])
    conn.request("POST", "/", body=b"x")
    r = conn.getresponse()
    assert r.status == 502  # it may have been acted on: not sent twice
    assert len([h for h in bad.requests if h.startswith(b"POST")]) == 1


def test_connection_refused_is_retried_even_for_a_post(relay):
    dead = Backend(ok())
    dead.stop()
    good = Backend(named(b"good"))
    front = Front(relay, [dead, good])
    conn = front.client()
    for _ in range(3):
        conn.request("POST", "/", body=b"x")
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, b"good")


def test_no_instance_is_a_503(relay):
    front = Front(relay, [])
    status, body = get(front.client())
    assert status == 503


def echo(c, head, f):
    """Answers with the request body, chunked, in pieces: streaming both ways."""
    lines = head.lower().split(b"\r\n")
    if b"expect: 100-continue" in lines:
        c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    if b"transfer-encoding: chunked" in lines:
        while True:
            size = int(f.readline().strip(), 16)
            data = f.read(size)
            f.readline()
            if not size:
                break
            c.sendall(b"%x\r\n%s\r\n" % (len(data), data))
    else:
        n = int([x for x in lines if x.startswith(b"content-length:")][0].split(b":")[1])
        while n:
            data = f.read(min(n, 1 << 16))
            n -= len(data)
            c.sendall(b"%x\r\n%s\r\n" % (len(data), data))
    c.sendall(b"0\r\n\r\n")
    return True


def test_large_and_chunked_bodies_stream_both_ways_intact(relay):
    front = Front(relay, [Backend(echo)])
    conn = front.client()
    big = os.urandom(8 << 20)
    conn.request("POST", "/", body=big)
    r = conn.getresponse()
    assert hashlib.sha256(r.read()).digest() == hashlib.sha256(big).digest()
    parts = [os.urandom(n) for n in (1, 70000, 5)]
    conn.request("POST", "/", body=iter(parts), encode_chunked=True)
    assert conn.getresponse().read() == b"".join(parts)


def test_expect_100_continue_passes_through(relay):
    front = Front(relay, [Backend(echo)])
    s = front.raw()
    s.sendall(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    f = s.makefile("rb")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += f.readline()
    assert head.startswith(b"HTTP/1.1 100 Continue")  # only now the client sends its body
    s.sendall(b"hello")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += f.readline()
    assert head.startswith(b"HTTP/1.1 200")
    assert f.readline() == b"5\r\n" and f.readline() == b"hello\r\n"


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET /\r\n\r\n",
], ids=["cl+te", "two-lengths", "te-not-chunked", "obs-fold", "space-in-name", "http09"])
def test_ambiguous_requests_are_refused_and_reach_no_instance(relay, head):
    b = Backend(ok())
    front = Front(relay, [b])
    s = front.raw()
    s.sendall(head)
    reply = s.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in reply
    assert b.requests == []


def test_websocket_upgrade_becomes_a_pipe_counted_until_it_ends(relay):
    def upgrade(c, head, f):
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nhi")
        while data := c.recv(100):
            c.sendall(data.upper())
        return False
    b = Backend(upgrade)
    front = Front(relay, [b])
    s = front.raw()
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    got = b""
    while not got.endswith(b"hi"):
        got += s.recv(100)
    assert b"Upgrade: websocket" in b.requests[0] and b"Connection: Upgrade" in b.requests[0]
    s.sendall(b"ping")
    assert s.recv(100) == b"PING"
    front.update([])
    assert front.route.conns[b.addr] == 1  # still open: a drain waits for it, as for TCP
    s.close()
    until(lambda: front.route.conns[b.addr] == 0)


def test_close_delimited_response_closes_the_client_connection(relay):
    def legacy(c, head, f):
        c.sendall(b"HTTP/1.0 200 OK\r\n\r\nold")
        return False
    front = Front(relay, [Backend(legacy)])
    s = front.raw()
    s.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    reply = s.makefile("rb").read()
    assert reply.endswith(b"old") and b"Connection: close" in reply


def test_pipelined_requests_are_answered_in_order(relay):
    a, b = Backend(named(b"a")), Backend(named(b"b"))
    front = Front(relay, [a, b])
    s = front.raw()
    s.sendall(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\nGET /3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    reply = s.makefile("rb").read()
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    assert reply.endswith(b"a") or reply.endswith(b"b")


def test_framer_counts_chunked_bodies_split_anywhere():
    body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\n"
    for cut in range(len(body)):
        fr = _http.Framer(chunked=True)
        buf = bytearray(body[:cut])
        n1 = fr.take(buf)
        rest = bytearray(body[:cut][n1:] + body[cut:])
        n2 = fr.take(rest)
        assert fr.done and n1 + n2 == len(body), cut


def test_canary_weights_split_requests_on_one_connection(relay):
    a, b = Backend(named(b"a")), Backend(named(b"b"))
    front = Front(relay, [a, b])
    ev = threading.Event()
    relay.post(lambda: front.route.update([a.addr, b.addr], {a.addr: 1, b.addr: 3}), ev.set)
    assert ev.wait(5)
    conn = front.client()
    bodies = [get(conn)[1] for _ in range(40)]
    assert bodies.count(b"a") == 10 and bodies.count(b"b") == 30


def test_nothing_after_connection_close_is_forwarded(relay):
    b = Backend(ok())
    front = Front(relay, [b])
    s = front.raw()
    s.sendall(b"GET /1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    reply = s.makefile("rb").read()
    assert reply.count(b"HTTP/1.1 200 OK") == 1 and b"Connection: close" in reply
    assert len(b.requests) == 1
