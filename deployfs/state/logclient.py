"""Reading an instance's output from the node that runs it (its log server: node/logserver.py).

A log stays on its owner's disk; another node's view asks the owner for two things only:
a service's index (every instance's log size and mtime, one request for all of them) and a
range of one log's bytes.  The index is kept for ``ttl`` seconds, so `ls -l logs/` costs one
request per owner, not one per file, and ``tail -f`` (a stat a second) one a poll; a range is
asked for when it is read, as a local file would be (only the bytes asked for, at most
:data:`MAX_READ` a request).

An owner that does not answer within ``timeout`` is :class:`Unreachable`, remembered for
``retry_after`` seconds (a `ls -l` of many of its logs waits once, not once per file), and
said once in this server's log when it stops answering and once when it answers again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import trio

from .logfiles import LogInfo

log = logging.getLogger(__name__)

MAX_READ = 1024 * 1024  # the most one request asks for (a FUSE read is at most 128 KiB)
MAX_INDEX_BYTES = 4 * 1024 * 1024  # an index past this is not an owner's answer
_KEEP = 1000  # index entries kept before the old ones go


@dataclass(frozen=True)
class Owner:
    """The node an instance runs on, as its node record says where its logs are served."""
    node: str
    address: str
    port: int  # 0: it serves none (--log-port 0, or a node of a version without a log server)

    def __str__(self) -> str:
        return f"node {self.node} ({self.address}:{self.port})"


class Unreachable(Exception):
    """The owner of a log cannot be asked now: the reason, in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class _Index:
    at: float  # trio clock
    logs: dict[int, LogInfo]
    error: str = ""  # not "": the owner did not answer (logs is then what it said last)


class RemoteLogs:
    def __init__(self, *, ttl: float = 0.5, timeout: float = 1.0, retry_after: float = 2.0) -> None:
        self.ttl, self.timeout, self.retry_after = ttl, timeout, retry_after
        # Never the environment's proxy: a cluster member is reached directly.
        self._http = httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(timeout),
                                       limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))
        self._index: dict[tuple[Owner, str], _Index] = {}
        self._inflight: dict[tuple[Owner, str], trio.Event] = {}
        self._down: set[Owner] = set()  # owners said to be unreachable (said once, and once when back)
        self.requests = 0  # made so far (what the tests count)

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- what is known now (no request) -----------------------------------------------------

    def info(self, owner: Owner, service: str, instance_id: int) -> LogInfo | None:
        """The log's size and mtime as its owner last said (None: it keeps none, or was never asked);
        :class:`Unreachable` if it did not answer the last time it was asked."""
        if owner.port == 0:
            raise Unreachable(_serves_none(owner))
        found = self._index.get((owner, service))
        if found is None:
            return None
        if found.error:
            raise Unreachable(found.error)
        return found.logs.get(instance_id)

    def known(self, owner: Owner, service: str) -> dict[int, LogInfo]:
        """The instances of ``service`` the owner last said it keeps logs of (nothing if it did not answer)."""
        found = self._index.get((owner, service))
        return {} if found is None or found.error else found.logs

    # -- asking the owner --------------------------------------------------------------------

    async def fresh(self, owner: Owner, service: str) -> None:
        """Ask the owner for the service's index unless it answered (or failed) within the TTL.
        Callers at once share one request; a failure is kept in the index (``info`` raises)."""
        if owner.port == 0:
            return
        key = (owner, service)
        while True:
            found = self._index.get(key)
            if found is not None and trio.current_time() - found.at < (self.retry_after if found.error else self.ttl):
                return
            busy = self._inflight.get(key)
            if busy is None:
                break
            await busy.wait()
        done = self._inflight[key] = trio.Event()
        try:
            try:
                r = await self._get(owner, service, "")
                logs = _decode_index(r)
            except Unreachable as e:
                self._remember(key, self._index[key].logs if key in self._index else {}, e.message)
                return
            self._remember(key, logs)
        finally:
            del self._inflight[key]
            done.set()

    async def read(self, owner: Owner, service: str, instance_id: int, off: int, size: int) -> bytes:
        """``size`` bytes (at most MAX_READ) at ``off`` of the log, as the owner has it now."""
        if owner.port == 0:
            raise Unreachable(_serves_none(owner))
        size = max(0, min(size, MAX_READ))
        r = await self._get(owner, service, f"/{instance_id}?offset={off}&length={size}")
        key = (owner, service)
        if r.status_code == 404:
            return b""  # gone since it was listed (the node let it go): it reads as ended
        try:
            now = LogInfo(int(r.headers["x-log-size"]), float(r.headers["x-log-mtime"]))
        except (KeyError, ValueError):
            raise self._failed(owner, key, "its answer lacks the log's size") from None
        # The size read with the bytes is the freshest: a stat right after a read agrees with it.
        found = self._index.get(key)
        if found is not None and not found.error:
            found.logs[instance_id] = now
        return r.content[:size]

    async def _get(self, owner: Owner, service: str, rest: str) -> httpx.Response:
        key = (owner, service)
        self.requests += 1
        try:
            r = await self._http.get(f"http://{_host(owner.address)}:{owner.port}/v1/logs/{quote(service, safe='')}{rest}")
        except httpx.HTTPError as e:
            raise self._failed(owner, key, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
        if r.status_code not in (200, 404):
            raise self._failed(owner, key, f"it answered {r.status_code} {r.text[:200].strip()}")
        if self._down and owner in self._down:
            self._down.discard(owner)
            log.info("%s answers for its logs again", owner)
        return r

    def _failed(self, owner: Owner, key: tuple[Owner, str], reason: str) -> Unreachable:
        message = f"{owner} does not answer for its instances' logs: {reason}"
        if owner not in self._down:
            self._down.add(owner)
            log.warning("%s", message)
        self._remember(key, self._index[key].logs if key in self._index else {}, message)
        return Unreachable(message)

    def _remember(self, key: tuple[Owner, str], logs: dict[int, LogInfo], error: str = "") -> None:
        if len(self._index) >= _KEEP and key not in self._index:  # owners and services come and go
            for old in sorted(self._index, key=lambda k: self._index[k].at)[: _KEEP // 2]:
                del self._index[old]
        self._index[key] = _Index(trio.current_time(), logs, error)


def _serves_none(owner: Owner) -> str:
    if not owner.address:
        return f"node {owner.node} has no record (nodes/{owner.node}): where its logs are is not known"
    return f"node {owner.node} serves no logs to other nodes (it runs with --log-port 0)"


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address  # an IPv6 address in a URL


def _decode_index(r: httpx.Response) -> dict[int, LogInfo]:
    if r.status_code == 404 or len(r.content) > MAX_INDEX_BYTES:
        return {}
    try:
        d = json.loads(r.content)
        return {int(k): LogInfo(int(v[0]), float(v[1])) for k, v in d.items()}
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        raise Unreachable(f"its index of logs is not JSON: {r.content[:100]!r}") from None
