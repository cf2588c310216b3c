"""A small etcd v3 client on trio, over etcd's JSON gateway (httpx).

No PyPI etcd client runs under trio (the maintained ones are asyncio/gRPC), so
this speaks the gRPC gateway that every etcd member serves on its client port:
``/v3/kv/range|put|deleterange|txn|compaction``, ``/v3/watch``,
``/v3/lease/grant|keepalive|revoke|timetolive``.  Facts it is built on
(measured on etcd 3.4): bytes travel as base64, int64
as JSON strings; a lease keepalive is answered only when its request body ends,
so each keepalive is one POST; a watch from a compacted revision is cancelled
with ``compact_revision``.

Failures come out as the store's kinds (:mod:`.kv`), plus one of a cluster's own:

- :class:`Unavailable` -- no member answered within the deadline (all down,
  quorum lost, this node cut off).  The front end turns it into EIO and
  ``error: cluster store unreachable``.  For a write that may have been
  applied before its answer was lost the message says the outcome is unknown.
- :class:`Compacted` -- a read or watch from a revision etcd has compacted
  away: list again and watch from the list's revision.
- :class:`LeaseNotFound` -- the lease expired or was revoked.

The client holds every endpoint and moves to the next on a refused
connection, a timeout or a member without a leader (httpx does not); a
request that was never sent is always retried there, one that was sent only
if it is idempotent (reads, keepalives, plain puts and deletes) -- a
transaction's compare may already have been applied.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import math
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, AsyncIterator, Literal, Sequence

import httpx
import trio

from .kv import Compacted, LeaseNotFound, StoreError, Unavailable

log = logging.getLogger(__name__)

# How long one call may take, all endpoints tried, before it is Unavailable.  A
# healthy member answers in milliseconds; a leader election on loopback takes
# well under a second with the flags docs/cluster.md recommends, 2-3 s with defaults.
DEFAULT_TIMEOUT = 3.0
# One try on one member gets at least this long (a leader election on a loaded machine);
# otherwise an equal share of the call's timeout, so a frozen member (SIGSTOP, a hung
# machine: it accepts connections, answers nothing) leaves time to try the others.
MIN_TRY = 0.5
# A watch that hears nothing from its member for this long moves to another.  A healthy
# member is silent while nothing changes, unless run with
# --experimental-watch-progress-notify-interval (docs/cluster.md: 5s), so this only
# bounds how long a frozen member can hold a watch; a needless resume costs one request.
WATCH_IDLE = 30.0
# Waiting between rounds over every endpoint (doubles up to the cap).
RETRY_FIRST, RETRY_CAP = 0.05, 1.0
# gRPC status codes the gateway answers with.
_NOT_FOUND, _RESOURCE_EXHAUSTED, _OUT_OF_RANGE, _UNAVAILABLE = 5, 8, 11, 14
# Sent as gRPC metadata by the gateway: a watch on a member that loses its leader is
# cancelled (so the client moves on) instead of silently seeing no more events.
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}


class EtcdError(StoreError):
    """etcd refused a request for a reason that retrying will not fix (a bug here, a bad argument)."""


# -- wire format -------------------------------------------------------------------------

def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) every key starting with prefix (etcd's rule)."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"  # all 0xff (or empty): to the end of the keyspace


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int = 0
    version: int = 0
    lease: int = 0

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KV:
        return cls(key=_unb64(d.get("key")), value=_unb64(d.get("value")),
                   mod_revision=int(d.get("mod_revision", 0)), create_revision=int(d.get("create_revision", 0)),
                   version=int(d.get("version", 0)), lease=int(d.get("lease", 0)))


@dataclass(frozen=True)
class RangeResult:
    kvs: list[KV]
    revision: int  # the store's revision the read saw
    count: int
    more: bool


@dataclass(frozen=True)
class Compare:
    """A transaction guard on one key.  ``mod_revision=0`` with EQUAL means "absent"."""

    key: bytes
    target: Literal["MOD", "CREATE", "VERSION", "VALUE", "LEASE"] = "MOD"
    result: Literal["EQUAL", "NOT_EQUAL", "GREATER", "LESS"] = "EQUAL"
    value: int | bytes = 0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": _b64(self.key), "target": self.target, "result": self.result}
        field_name = {"MOD": "mod_revision", "CREATE": "create_revision", "VERSION": "version",
                      "VALUE": "value", "LEASE": "lease"}[self.target]
        if self.target == "VALUE":
            d[field_name] = _b64(self.value if isinstance(self.value, bytes) else str(self.value).encode())
        else:
            d[field_name] = str(int(self.value) if not isinstance(self.value, bytes) else int(self.value))
        return d


@dataclass(frozen=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            d["lease"] = str(self.lease)
        return d


@dataclass(frozen=True)
class _KeyRange:
    key: bytes
    prefix: bool = False  # every key that starts with ``key``

    def to_json(self) -> dict[str, Any]:
        d = {"key": _b64(self.key)}
        if self.prefix:
            d["range_end"] = _b64(prefix_end(self.key))
        return d


class Delete(_KeyRange):
    pass


class Get(_KeyRange):
    pass


Op = Put | Delete | Get


def _op_json(op: Op) -> dict[str, Any]:
    kind = {Put: "request_put", Delete: "request_delete_range", Get: "request_range"}[type(op)]
    return {kind: op.to_json()}


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    # the kvs each Get op read, in op order (Puts and Deletes give [])
    reads: list[list[KV]] = field(default_factory=list)


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    kv: KV  # for a DELETE: the key and the deleting revision only

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


# -- the client --------------------------------------------------------------------------

class _GatewayError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class EtcdClient:
    """One client for a whole etcd cluster: ``EtcdClient(["http://h1:2379", ...])``.

    Use as ``async with EtcdClient(urls) as c:`` (or call :meth:`aclose`).
    """

    def __init__(self, endpoints: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                 watch_idle: float = WATCH_IDLE) -> None:
        if not endpoints:
            raise ValueError("etcd: no endpoints given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self.watch_idle = watch_idle
        self._try = max(MIN_TRY, timeout / len(self.endpoints))
        self._current = 0  # the endpoint that answered last: tried first
        # trust_env=False: an HTTP(S)_PROXY in the environment must not reroute cluster traffic.
        self._http = httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(timeout),
                                       limits=httpx.Limits(max_connections=None, max_keepalive_connections=20))

    async def __aenter__(self) -> EtcdClient:
        return self

    @property
    def current_endpoint(self) -> str:
        """The member tried first (the one that answered last)."""
        return self.endpoints[self._current]

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._http.aclose()

    # -- one request, every endpoint -------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any], *, idempotent: bool, timeout: float | None = None) -> dict[str, Any]:
        deadline = trio.current_time() + (self.timeout if timeout is None else timeout)
        pause = RETRY_FIRST
        last = "no endpoint tried"
        while True:
            for _ in range(len(self.endpoints)):
                url = self.endpoints[self._current]
                left = deadline - trio.current_time()
                if left <= 0:
                    raise Unavailable(last)
                try:
                    r = await self._http.post(url + path, json=body, timeout=min(left, self._try))
                    answer = self._decode(r)
                except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                    last = f"{url}: {type(e).__name__}: {e}"  # never sent: any request may go elsewhere
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    last = f"{url}: {type(e).__name__}: {e}"
                    if not idempotent:
                        raise Unavailable(f"{last}; the write may or may not have been applied") from None
                except _GatewayError as e:
                    if e.code not in (_UNAVAILABLE, _RESOURCE_EXHAUSTED):
                        raise self._error(e) from None
                    # "no leader" and "too many requests" refuse before anything is proposed;
                    # "request timed out" and "leader changed" may come after
                    last = f"{url}: {e.message}"
                    if not idempotent and not ("no leader" in e.message or e.code == _RESOURCE_EXHAUSTED):
                        raise Unavailable(f"{last}; the write may or may not have been applied") from None
                else:
                    return answer
                self._current = (self._current + 1) % len(self.endpoints)
            # every member refused or failed this round: wait a little, within the deadline
            await trio.sleep(min(pause, max(0.0, deadline - trio.current_time())))
            pause = min(pause * 2, RETRY_CAP)

    @staticmethod
    def _decode(r: httpx.Response) -> dict[str, Any]:
        try:
            d = r.json()
        except ValueError:
            raise _GatewayError(_UNAVAILABLE if r.status_code >= 500 else 2,
                                f"HTTP {r.status_code}: {r.text[:200]!r}") from None
        if not isinstance(d, dict):
            raise _GatewayError(2, f"unexpected answer {d!r:.200}")
        if r.status_code >= 400:
            if "code" in d:
                raise _GatewayError(int(d["code"]), str(d.get("message") or d.get("error")))
            raise _GatewayError(_UNAVAILABLE if r.status_code >= 500 else 2, f"HTTP {r.status_code}: {d!r:.200}")
        return d

    @staticmethod
    def _error(e: _GatewayError) -> StoreError:
        if e.code == _OUT_OF_RANGE and "compacted" in e.message:
            return Compacted(0)
        if e.code == _NOT_FOUND and "lease not found" in e.message:
            return LeaseNotFound(e.message)
        return EtcdError(f"etcd: {e.message}")

    @staticmethod
    def _revision(d: dict[str, Any]) -> int:
        return int(d.get("header", {}).get("revision", 0))

    # -- key-value ---------------------------------------------------------------------------

    async def range(self, key: bytes, *, prefix: bool = False, revision: int = 0, limit: int = 0,
                    serializable: bool = False) -> RangeResult:
        """Read a key, or every key under a prefix (sorted by key), at ``revision`` (0: now).

        ``serializable`` reads whatever the member answering has, without asking the
        leader: it answers while quorum is lost, maybe stale.
        """
        body: dict[str, Any] = Get(key, prefix).to_json()
        if revision:
            body["revision"] = str(revision)
        if limit:
            body["limit"] = str(limit)
        if serializable:
            body["serializable"] = True
        d = await self._call("/v3/kv/range", body, idempotent=True)
        kvs = [KV.from_json(x) for x in d.get("kvs", [])]
        return RangeResult(kvs, self._revision(d), int(d.get("count", 0)), bool(d.get("more", False)))

    async def get(self, key: bytes) -> KV | None:
        r = await self.range(key)
        return r.kvs[0] if r.kvs else None

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Set a key; returns the revision of the write."""
        d = await self._call("/v3/kv/put", Put(key, value, lease).to_json(), idempotent=True)
        return self._revision(d)

    async def delete(self, key: bytes, *, prefix: bool = False) -> tuple[int, int]:
        """Delete a key (or a prefix); returns (keys deleted, revision)."""
        d = await self._call("/v3/kv/deleterange", Delete(key, prefix).to_json(), idempotent=True)
        return int(d.get("deleted", 0)), self._revision(d)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        """If every compare holds, apply ``success``, else ``failure`` -- atomically, as one revision."""
        body = {"compare": [c.to_json() for c in compare], "success": [_op_json(o) for o in success],
                "failure": [_op_json(o) for o in failure]}
        d = await self._call("/v3/kv/txn", body, idempotent=False)
        reads = [[KV.from_json(x) for x in r["response_range"].get("kvs", [])] if "response_range" in r else []
                 for r in d.get("responses", [])]
        return TxnResult(bool(d.get("succeeded", False)), self._revision(d), reads)

    async def compact(self, revision: int) -> None:
        """Forget every revision before ``revision`` (tests, and operators without auto-compaction)."""
        await self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True}, idempotent=True)

    # -- leases --------------------------------------------------------------------------------

    async def lease_grant(self, ttl: float) -> tuple[int, int]:
        """A new lease; returns (id, granted TTL in whole seconds; etcd's minimum is 2)."""
        # A grant whose answer was lost leaks a lease that expires by itself: safe to retry.
        d = await self._call("/v3/lease/grant", {"TTL": str(max(1, math.ceil(ttl)))}, idempotent=True)
        if d.get("error"):
            raise EtcdError(f"etcd: lease grant: {d['error']}")
        return int(d["ID"]), int(d["TTL"])

    async def lease_keepalive(self, lease: int) -> int:
        """Renew a lease once; returns its TTL.  One POST per keepalive: the gateway answers a
        keepalive stream only when its body ends."""
        d = await self._call("/v3/lease/keepalive", {"ID": str(lease)}, idempotent=True)
        ttl = int(d.get("result", {}).get("TTL", 0))
        if ttl <= 0:
            raise LeaseNotFound(f"lease {lease:x} expired or was revoked")
        return ttl

    async def lease_revoke(self, lease: int) -> None:
        """Revoke a lease: its keys are deleted at once.  A lease already gone is no error."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)}, idempotent=True)
        except LeaseNotFound:
            pass

    async def lease_ttl(self, lease: int) -> int:
        """Whole seconds the lease has left (0: under one); -1 if it is gone."""
        d = await self._call("/v3/lease/timetolive", {"ID": str(lease)}, idempotent=True)
        return int(d.get("TTL", 0))  # the gateway leaves out zero values

    async def keep_alive(self, lease: int, ttl: float) -> None:
        """Keep a lease alive until cancelled; raises :class:`LeaseNotFound` once it is lost.

        Renews every ttl/3.  While etcd is unreachable it keeps trying (the lease may
        still be alive when etcd returns; LeaseNotFound says when it is not).
        """
        every = max(0.2, ttl / 3)
        while True:
            try:
                await self.lease_keepalive(lease)
            except Unavailable as e:
                log.warning("lease %x: keepalive failed: %s", lease, e)
                await trio.sleep(min(every, 0.5))
                continue
            await trio.sleep(every)

    # -- watch --------------------------------------------------------------------------------

    def watch(self, key: bytes, *, prefix: bool = False, start_revision: int = 0) -> Watch:
        """Events on a key (or prefix) from ``start_revision`` (0: from now on), one revision's
        at a time, in revision order.

        ``async with client.watch(b"k/", prefix=True, start_revision=r) as w:
        async for events in w: ...``.  The watch survives a member's death or a quorum
        loss: it resumes on any member from the revision after the last event it
        delivered, so no event is lost or repeated.  A resume that finds the revision
        compacted raises :class:`Compacted` from the iteration.
        """
        return Watch(self, key, prefix, start_revision)

    async def _watch_stream(self, url: str, key: bytes, prefix: bool, start: int) -> httpx.Response:
        req: dict[str, Any] = {"key": _b64(key), "progress_notify": True}
        if prefix:
            req["range_end"] = _b64(prefix_end(key))
        if start:
            req["start_revision"] = str(start)
        request = self._http.build_request(
            "POST", url + "/v3/watch", json={"create_request": req}, headers=_REQUIRE_LEADER,
            # connect within the client's timeout; then the stream is read for as long as it lasts
            timeout=httpx.Timeout(self.timeout, read=None))
        return await self._http.send(request, stream=True)


class Watch:
    """A running watch (see :meth:`EtcdClient.watch`).

    Pull-based: the stream is read only while the caller waits for the next event,
    so there is no background task, and a slow reader holds etcd back through TCP
    instead of through memory.
    """

    def __init__(self, client: EtcdClient, key: bytes, prefix: bool, start_revision: int) -> None:
        self._client, self._key, self._prefix = client, key, prefix
        self._next = start_revision  # the first revision not yet queued (0: "now", until etcd says which)
        self._pending: collections.deque[list[WatchEvent]] = collections.deque()
        self._response: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._url = ""
        self.reconnects = 0

    @property
    def next_revision(self) -> int:
        """The first revision this watch has not read from etcd yet."""
        return self._next

    @property
    def connected(self) -> bool:
        """Is a stream to a member up now?"""
        return self._lines is not None

    async def __aenter__(self) -> Watch:
        """A watch from a given revision connects at the first read (it can miss nothing, so it
        also starts while etcd is unreachable, and catches up once it returns).  A watch
        "from now" must learn which revision that is: it connects here, within the client's
        timeout, or raises :class:`Unavailable`."""
        if self._next:
            return self
        with trio.move_on_after(self._client.timeout):
            await self._connect()
            return self
        raise Unavailable(f"could not start a watch: {self._last_error}")

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        response, self._response, self._lines = self._response, None, None
        if response is not None:
            with trio.CancelScope(shield=True):
                await response.aclose()

    def __aiter__(self) -> AsyncIterator[list[WatchEvent]]:
        return self

    async def __anext__(self) -> list[WatchEvent]:
        while not self._pending:
            if self._lines is None:
                await self._connect()
            assert self._lines is not None
            try:
                line = None
                with trio.move_on_after(self._client.watch_idle):
                    line = await self._lines.__anext__()
                if line is None:
                    await self._lost(f"nothing heard for {self._client.watch_idle:g}s")
                    continue
                self._handle(line)
            except StopAsyncIteration:
                await self._lost("the stream ended")
            except (httpx.TransportError, _GatewayError, ValueError, KeyError) as e:
                await self._lost(f"{type(e).__name__}: {e}")
            except Compacted:
                await self.aclose()
                raise
            except BaseException:
                # Cancelled mid-read: the line reader is finished, so start afresh from the
                # revision after the last queued event next time (nothing is lost).
                await self.aclose()
                raise
        return self._pending.popleft()

    _last_error = "no member tried"

    async def _connect(self) -> None:
        """Open a stream on some member, retrying (every member in turn) until one answers."""
        c = self._client
        pause = RETRY_FIRST
        while True:
            self._url = c.endpoints[c._current]
            try:
                # The first answer says the watch exists (or why not): once past it, no write is
                # missed.  A member that accepts the request but says nothing is as good as down.
                with trio.fail_after(min(c.timeout, c.watch_idle)):
                    r = await c._watch_stream(self._url, self._key, self._prefix, self._next)
                    if r.status_code >= 400:
                        await r.aread()
                        await r.aclose()
                        EtcdClient._decode(r)
                        raise _GatewayError(_UNAVAILABLE, f"HTTP {r.status_code}")
                    self._response, self._lines = r, r.aiter_lines()
                    self._handle(await self._lines.__anext__())
                return
            except trio.TooSlowError:
                await self.aclose()
                self._last_error = f"{self._url}: no answer to a new watch"
            except Compacted:
                await self.aclose()
                raise
            except (httpx.TransportError, _GatewayError, StopAsyncIteration, ValueError, KeyError) as e:
                await self.aclose()
                self._last_error = f"{self._url}: {type(e).__name__}: {e}"
            c._current = (c._current + 1) % len(c.endpoints)
            await trio.sleep(pause)
            pause = min(pause * 2, RETRY_CAP)

    async def _lost(self, why: str) -> None:
        log.info("etcd watch on %s: %s; resuming from revision %d", self._url, why, self._next)
        await self.aclose()
        self.reconnects += 1
        c = self._client
        c._current = (c._current + 1) % len(c.endpoints)

    def _handle(self, line: str) -> None:
        if not line.strip():
            return
        d = json.loads(line)
        if "error" in d:  # the gateway ends a broken stream with one error object
            err = d["error"]
            raise _GatewayError(int(err.get("grpc_code", err.get("http_code", _UNAVAILABLE))),
                                str(err.get("message", err)))
        res = d.get("result", {})
        if res.get("canceled"):
            compact = int(res.get("compact_revision", 0))
            if compact:
                raise Compacted(compact)
            raise _GatewayError(_UNAVAILABLE, str(res.get("cancel_reason", "watch cancelled")))
        header_rev = int(res.get("header", {}).get("revision", 0))
        if res.get("created"):
            if not self._next:
                # "from now": pin the revision, so a resume after a reconnect misses nothing
                self._next = header_rev + 1
            return
        events = [WatchEvent("DELETE" if ev.get("type") == "DELETE" else "PUT", KV.from_json(ev["kv"]))
                  for ev in res.get("events", [])]
        # One answer holds whole revisions (etcd sends a transaction's events together).
        for ev in events:
            if ev.revision < self._next:
                continue  # read before a reconnect
            if self._pending and self._pending[-1][0].revision == ev.revision:
                self._pending[-1].append(ev)
            else:
                self._pending.append([ev])
        if events:
            self._next = max(self._next, events[-1].revision + 1)
        elif header_rev:
            # a progress notification: every event up to the header's revision was sent
            self._next = max(self._next, header_rev + 1)
