"""This node's instances' output, served to the other nodes' views (``logs/N`` from any node).

A small HTTP/1.1 server on trio (h11: the protocol is the library's, never hand-written), on
the node's ``--address`` and ``--log-port`` (its node record says where: state/records.py).
Two read-only requests, what state/logclient.py asks:

``GET /v1/logs/<service>``
    ``{"<id>": [size, mtime], ...}``: every instance of the service this node keeps output
    of (the running ones and the newest gone ones the runtime keeps).
``GET /v1/logs/<service>/<id>?offset=O&length=L``
    at most ``min(L, 1 MiB)`` bytes of that log at ``O``, with its whole size and mtime in
    ``x-log-size`` and ``x-log-mtime``; 404 if the node keeps no output of it.

Nothing else is answered.  A name is a service name or it is refused, an id is digits, and
the files are the runtime's own (state/logfiles.py: never through a link), so no request
reaches a file outside the log directory.  There is no authentication: like etcd's ports, the
log port is for cluster members only, and the operator keeps everyone else out of it with a
firewall (docs/cluster.md); it listens on ``--address`` alone, never on every interface.
Connections and their requests are bounded (:data:`MAX_CONNS`, an idle timeout, h11's
bound on a request's head), so a client can cost the node little.
"""

from __future__ import annotations

import json
import logging
import re
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from ..model.manifest import valid_name
from ..state import logfiles

log = logging.getLogger(__name__)

MAX_CONNS = 64  # at once; more are closed at accept
IDLE = 10.0  # seconds a connection may sit without a request
MAX_HEAD = 8192  # bytes of a request's line and headers
MAX_READ = 1024 * 1024  # bytes of a log one request gets
_PATH_RE = re.compile(r"/v1/logs/([^/]{1,200})(?:/([0-9]{1,12}))?")


class LogServer:
    def __init__(self, log_dir: str, address: str, port: int) -> None:
        self.log_dir, self.address, self.port = log_dir, address, port
        self._listeners: list[trio.SocketListener] = []
        self._conns = 0

    async def listen(self) -> None:
        """Bind now (an address or port refused is an OSError before anything else starts)."""
        self._listeners = await trio.open_tcp_listeners(self.port, host=self.address)
        self.port = self._listeners[0].socket.getsockname()[1]  # port 0: the one given

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self._listeners:
            await self.listen()
        try:
            async with trio.open_nursery() as nursery:
                for listener in self._listeners:
                    nursery.start_soon(self._accept, listener, nursery)
                task_status.started()
        finally:
            for listener in self._listeners:
                await trio.aclose_forcefully(listener)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            stream = await listener.accept()
            if self._conns >= MAX_CONNS:
                await trio.aclose_forcefully(stream)
                continue
            nursery.start_soon(self._serve, stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        self._conns += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await _send(stream, conn, 400, b"bad request\n")
                    return
                if event is h11.NEED_DATA:
                    with trio.move_on_after(IDLE):
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        continue
                    return  # idle too long
                if isinstance(event, h11.Request):
                    status, body, headers = self.answer(event.method, event.target)
                    await _send(stream, conn, status, body, headers)
                elif isinstance(event, h11.ConnectionClosed) or conn.our_state is h11.MUST_CLOSE:
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                elif conn.our_state is h11.MUST_CLOSE:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass
        finally:
            self._conns -= 1
            await trio.aclose_forcefully(stream)

    def answer(self, method: bytes, target: bytes) -> tuple[int, bytes, list[tuple[str, str]]]:
        """(status, body, headers) for one request: pure of the connection, so tested without one."""
        if method != b"GET":
            return 405, b"only GET\n", [("allow", "GET")]
        try:
            url = urlsplit(target.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return 400, b"bad target\n", []
        m = _PATH_RE.fullmatch(url.path)
        service = unquote(m.group(1)) if m else ""
        if m is None or not valid_name(service):
            return 404, b"no such log\n", []
        if m.group(2) is None:
            listing = logfiles.listing(self.log_dir, service)
            body = json.dumps({str(id): [i.size, i.mtime] for id, i in listing.items()}).encode()
            return 200, body, [("content-type", "application/json")]
        query = parse_qs(url.query)
        try:
            off = int(query.get("offset", ["0"])[0])
            length = min(int(query.get("length", [str(MAX_READ)])[0]), MAX_READ)
        except ValueError:
            return 400, b"offset and length are numbers\n", []
        if off < 0 or length < 0 or off > 2 ** 62:
            return 400, b"offset and length are at least 0\n", []
        parts = logfiles.parts(self.log_dir, service, int(m.group(2)))
        info = logfiles.info(parts)
        if info is None:
            return 404, b"no such log\n", []
        data = logfiles.read(parts, off, length)
        return 200, data, [("content-type", "application/octet-stream"), ("x-log-size", str(info.size)),
                           ("x-log-mtime", repr(info.mtime))]


async def _send(stream: trio.SocketStream, conn: h11.Connection, status: int, body: bytes,
                headers: list[tuple[str, str]] | None = None) -> None:
    head = [("content-length", str(len(body))), *(headers or [])]
    data = conn.send(h11.Response(status_code=status, headers=head))
    data = (data or b"") + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(data)
