"""A node's log server (node/logserver.py) and the client other nodes read it with
(state/logclient.py): what is answered and refused, on real sockets (ephemeral ports on
127.0.3.3), the index a short TTL keeps (one request for a `ls -l`), and an owner gone."""

import json
import os
import socket

import pytest
import trio

from deployfs.node.logserver import MAX_READ, LogServer
from deployfs.state.logclient import Owner, RemoteLogs, Unreachable

ADDRESS = "127.0.3.3"


@pytest.fixture
def logs(tmp_path):
    d = tmp_path / "logs"
    (d / "app").mkdir(parents=True)
    (d / "app" / "3.log.1").write_bytes(b"old\n")
    (d / "app" / "3.log").write_bytes(b"new 1\nnew 2\n")
    (d / "app" / "7.log").write_bytes(b"seven\n")
    (tmp_path / "secret").write_bytes(b"not a log\n")
    os.symlink(tmp_path / "secret", d / "app" / "9.log")  # planted: never followed
    (d / "app" / "notes.txt").write_bytes(b"not a log either\n")
    return str(d)


def get(server: LogServer, target: str, method: bytes = b"GET"):
    return server.answer(method, target.encode())


def test_the_index_lists_the_services_logs_with_size_and_mtime(logs):
    status, body, _ = get(LogServer(logs, ADDRESS, 0), "/v1/logs/app")
    assert status == 200
    index = json.loads(body)
    assert sorted(index) == ["3", "7"]  # not the planted link, not other files
    assert index["3"][0] == len(b"old\nnew 1\nnew 2\n") and index["7"][0] == 6
    assert json.loads(get(LogServer(logs, ADDRESS, 0), "/v1/logs/other")[1]) == {}


def test_ranges_read_both_parts_as_one_file_with_its_size(logs):
    s = LogServer(logs, ADDRESS, 0)
    status, body, headers = get(s, "/v1/logs/app/3?offset=2&length=6")
    assert (status, body) == (200, b"d\nnew ")
    assert dict(headers)["x-log-size"] == "16"
    assert get(s, "/v1/logs/app/3?offset=16&length=10")[:2] == (200, b"")
    assert get(s, "/v1/logs/app/3")[1] == b"old\nnew 1\nnew 2\n"  # no range: from 0, at most MAX_READ


@pytest.mark.parametrize("target", [
    "/v1/logs/app/9",  # a link planted where a log is
    "/v1/logs/app/12345",  # no such instance
    "/v1/logs/..%2Fsecret", "/v1/logs/%2E%2E/secret", "/v1/logs/app/..%2F..%2Fsecret", "/v1/logs/app/3/../7",
    "/v1/logs/App", "/v1/logs/app/3x", "/v1/logs", "/", "/etc/passwd",
])
def test_nothing_but_a_log_is_answered(logs, target):
    status, body, _ = get(LogServer(logs, ADDRESS, 0), target)
    assert status == 404 and b"not a log" not in body, (target, status, body)


def test_bad_requests_are_refused(logs):
    s = LogServer(logs, ADDRESS, 0)
    assert get(s, "/v1/logs/app/3", b"DELETE")[0] == 405  # read-only
    assert get(s, "/v1/logs/app/3", b"PUT")[0] == 405
    assert get(s, "/v1/logs/app/3?offset=x")[0] == 400
    assert get(s, "/v1/logs/app/3?offset=-1")[0] == 400


def test_a_read_is_bounded(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "1.log").write_bytes(b"x" * (MAX_READ + 10))
    status, body, headers = get(LogServer(str(tmp_path), ADDRESS, 0), f"/v1/logs/app/1?length={10 * MAX_READ}")
    assert status == 200 and len(body) == MAX_READ and dict(headers)["x-log-size"] == str(MAX_READ + 10)


async def test_a_client_reads_the_index_once_per_ttl_and_ranges_as_asked(logs):
    server = LogServer(logs, ADDRESS, 0)
    client = RemoteLogs(ttl=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        owner = Owner("n2", ADDRESS, server.port)
        assert client.info(owner, "app", 3) is None  # never asked
        for _ in range(5):  # `ls -l logs/`: a fresh and a stat per file
            for id in (3, 7):
                await client.fresh(owner, "app")
                client.info(owner, "app", id)
        assert client.requests == 1
        assert client.info(owner, "app", 3).size == 16 and client.info(owner, "app", 8) is None
        assert await client.read(owner, "app", 3, 4, 100) == b"new 1\nnew 2\n"
        with open(os.path.join(logs, "app", "3.log"), "ab") as f:
            f.write(b"new 3\n")
        assert await client.read(owner, "app", 3, 16, 100) == b"new 3\n"
        assert client.info(owner, "app", 3).size == 22  # the size read with the bytes: a stat agrees
        assert await client.read(owner, "app", 4, 0, 100) == b""  # none: ended
        await trio.sleep(0.3)
        before = client.requests
        await client.fresh(owner, "app")
        assert client.requests == before + 1  # past the TTL: asked again
        nursery.cancel_scope.cancel()
    await client.aclose()


async def test_an_owner_gone_is_unreachable_with_the_reason_and_asked_again_later(logs):
    client = RemoteLogs(ttl=0.1, timeout=1.0, retry_after=0.5)
    with socket.socket() as s:  # a port nothing listens on (bound, never listening)
        s.bind((ADDRESS, 0))
        owner = Owner("n2", ADDRESS, s.getsockname()[1])
        with trio.fail_after(3):
            await client.fresh(owner, "app")
        with pytest.raises(Unreachable, match=r"node n2 \(127\.0\.3\.3:\d+\) does not answer for its instances' logs"):
            client.info(owner, "app", 3)
        before = client.requests
        await client.fresh(owner, "app")  # within retry_after: no request (a `ls -l` waits once)
        assert client.requests == before
        with pytest.raises(Unreachable):
            await client.read(owner, "app", 3, 0, 10)
        # it comes back on the same port: answered again once retry_after has passed
        server = LogServer(logs, ADDRESS, owner.port)
        s.close()
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await trio.sleep(0.5)
            await client.fresh(owner, "app")
            assert client.info(owner, "app", 7).size == 6
            nursery.cancel_scope.cancel()
    with pytest.raises(Unreachable, match="serves no logs"):
        client.info(Owner("n3", ADDRESS, 0), "app", 3)
    with pytest.raises(Unreachable, match="has no record"):
        await client.read(Owner("n4", "", 0), "app", 3, 0, 10)
    await client.aclose()


async def test_one_connection_carries_many_requests_and_a_bad_one_is_closed(logs):
    server = LogServer(logs, ADDRESS, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        stream = await trio.open_tcp_stream(ADDRESS, server.port)
        req = f"GET /v1/logs/app/7 HTTP/1.1\r\nhost: x\r\n\r\n".encode()
        await stream.send_all(req * 2)
        got = b""
        with trio.fail_after(3):
            while got.count(b"seven\n") < 2:
                got += await stream.receive_some(65536)
        await stream.send_all(b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\n\r\n")  # past the head's bound
        with trio.fail_after(3):
            rest = b""
            while chunk := await stream.receive_some(65536):
                rest += chunk
        assert rest.startswith(b"HTTP/1.1 400 ")
        await stream.aclose()
        nursery.cancel_scope.cancel()
