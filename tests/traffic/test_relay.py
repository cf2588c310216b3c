"""The router's copying loop, on real loopback TCP connections (no router, no trio)."""

import hashlib
import os
import socket
import struct
import threading

import pytest

from deployfs.traffic._relay import Relay


@pytest.fixture
def relay():
    r = Relay(lambda fn: fn())  # done runs in the relay thread: enough for these tests
    yield r
    r.close()


@pytest.fixture
def listener():
    lst = socket.create_server(("127.0.0.1", 0))
    yield lst
    lst.close()


def tcp_pair(listener):
    """Two connected TCP sockets: (the user's end, the relay's end)."""
    user = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    for s in (user, theirs):
        s.settimeout(10)
    return user, theirs


def relayed(relay, listener):
    """client <-> [relay] <-> server: returns (client, server, done event, pair)."""
    client, c_end = tcp_pair(listener)
    server, s_end = tcp_pair(listener)
    done = threading.Event()
    pair = relay.add(c_end, s_end, "test", done.set)
    return client, server, done, pair


def recv_all(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(1 << 20, n - len(buf)))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def test_bytes_cross_both_ways_intact_under_backpressure(relay, listener):
    client, server, done, _ = relayed(relay, listener)
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)  # far more than socket buffers hold
    # Both sides send everything before reading anything: only a relay that
    # stops reading when the far side is full, and resumes, gets through.
    senders = [threading.Thread(target=s.sendall, args=(data,)) for s, data in ((client, up), (server, down))]
    for t in senders:
        t.start()
    got_up = recv_all(server, len(up))
    got_down = recv_all(client, len(down))
    for t in senders:
        t.join(10)
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    assert not done.is_set()


def test_half_close_is_passed_on_and_the_pair_ends_when_both_sides_have(relay, listener):
    client, server, done, _ = relayed(relay, listener)
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert recv_all(server, 7) == b"request"
    assert server.recv(10) == b""  # the client's EOF arrived as EOF
    server.sendall(b"response after the client's half-close")
    assert recv_all(client, 38) == b"response after the client's half-close"
    assert not done.is_set()
    server.close()
    assert client.recv(10) == b""
    assert done.wait(5)


def test_a_reset_on_one_side_resets_the_other(relay, listener):
    client, server, done, _ = relayed(relay, listener)
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert recv_all(server, 18)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()  # the backend dies mid-request
    with pytest.raises(ConnectionResetError):
        client.recv(10)  # a reset, never a clean EOF that could pass for a whole response
    assert done.wait(5)


def test_abort_resets_both_ends_and_reports_done(relay, listener):
    client, server, done, pair = relayed(relay, listener)
    other_client, other_server, other_done, _ = relayed(relay, listener)
    client.sendall(b"x")
    assert recv_all(server, 1) == b"x"
    relay.abort(pair)
    for end in (client, server):
        with pytest.raises(ConnectionResetError):
            end.recv(10)
    assert done.wait(5)
    other_client.sendall(b"unaffected")
    assert recv_all(other_server, 10) == b"unaffected"
    assert not other_done.is_set()


def test_many_pairs_at_once(relay, listener):
    pairs = [relayed(relay, listener) for _ in range(50)]
    for i, (client, *_) in enumerate(pairs):
        client.sendall(f"hello {i}".encode())
    for i, (_, server, *_) in enumerate(pairs):
        expect = f"hello {i}".encode()
        assert recv_all(server, len(expect)) == expect
        server.sendall(expect[::-1])
    for i, (client, server, done, _) in enumerate(pairs):
        assert recv_all(client, len(f"hello {i}")) == f"hello {i}".encode()[::-1]
        client.close()
        server.close()
        assert done.wait(5)


def test_an_idle_pair_is_closed_and_a_busy_one_is_not(listener):
    relay = Relay(lambda fn: fn(), idle_timeout=0.4)
    try:
        idle_client, _, idle_done, _ = relayed(relay, listener)
        busy_client, busy_server, busy_done, _ = relayed(relay, listener)
        for _ in range(8):  # 0.8 s of traffic, a byte every 0.1 s
            busy_client.sendall(b"x")
            assert recv_all(busy_server, 1) == b"x"
            threading.Event().wait(0.1)
        assert idle_done.wait(2)
        assert idle_client.recv(10) == b""  # closed cleanly: nothing was in flight
        assert not busy_done.is_set() and relay.idle_closed == 1
    finally:
        relay.close()
