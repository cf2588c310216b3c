"""The store (:mod:`deployfs.state.kv`) on etcd v3, for a cluster.

A thin layer over :class:`.etcd.EtcdClient`: the contract of ``kv`` is etcd's
own model (one revision counter, mod/create revisions, compare-and-swap
transactions, watches from a revision, leases), so each call is one etcd
request.  What this layer adds:

* A namespace: every key lives under ``namespace`` (default ``/deployfs/``),
  so deployfs can share an etcd cluster (as Kubernetes keeps under
  ``/registry/``) and a store never sees keys it did not write.
* The store's error kinds: a failed compare is :class:`Conflict`; a lease that
  is gone, :class:`LeaseNotFound`; history compacted away, :class:`Compacted`;
  no member reachable within the client's timeout, :class:`.etcd.Unavailable`
  (a :class:`~deployfs.model.errors.Error` of kind UNAVAILABLE: EIO and
  ``error: cluster store unreachable`` at the front end).  A write that timed
  out may still be applied once etcd has quorum again (etcd queues it):
  callers must treat Unavailable on a write as "unknown", never "not done".
* A watch survives a member's death and a quorum loss: it resumes on any member
  from the revision after the last one it delivered (nothing lost or repeated).

etcd's own limits apply beyond the contract: a transaction may name a key once
(no put and delete of one key, no put inside a deleted prefix) and holds at
most ``--max-txn-ops`` (128) operations; a value is at most 1.5 MiB; the
shortest lease is etcd's minimum (2 s with default raft timings), and the
granted TTL is returned.
"""

from __future__ import annotations

import math
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import AsyncIterator, Sequence

from . import etcd
from .etcd import KV, EtcdClient, Unavailable
from .kv import Change, Compacted, Compare, Conflict, Delete, KeyValue, Lease, Op, Put, Read

__all__ = ["EtcdKV", "open_etcd", "Unavailable"]

DEFAULT_NAMESPACE = "/deployfs/"


class EtcdKV:
    def __init__(self, client: EtcdClient, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.client = client
        self.namespace = namespace
        self._ns = namespace.encode()

    def _key(self, key: str) -> bytes:
        return self._ns + key.encode()

    def _kv(self, kv: KV) -> KeyValue:
        return KeyValue(kv.key[len(self._ns):].decode(), kv.value, kv.mod_revision, kv.create_revision, kv.lease)

    # -- reads and writes --------------------------------------------------------------------

    async def get(self, key: str) -> Read:
        r = await self.client.range(self._key(key))
        return Read(r.revision, [self._kv(kv) for kv in r.kvs])

    async def range(self, prefix: str) -> Read:
        r = await self.client.range(self._key(prefix), prefix=True)
        return Read(r.revision, [self._kv(kv) for kv in r.kvs])

    def _op(self, op: Op) -> etcd.Op:
        if isinstance(op, Put):
            return etcd.Put(self._key(op.key), op.value, op.lease)
        return etcd.Delete(self._key(op.key), op.prefix)

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        # An absent key has mod_revision 0 in etcd's compares, exactly the contract's "0: absent".
        t = await self.client.txn([etcd.Compare(self._key(c.key), "MOD", "EQUAL", c.mod_revision) for c in compares],
                                  [self._op(op) for op in ops])
        if not t.succeeded:
            raise Conflict("a compared key changed since it was read: read again and retry")
        return t.revision

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self.client.put(self._key(key), value, lease=lease)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        _, revision = await self.client.delete(self._key(key), prefix=prefix)
        return revision

    async def compact(self, revision: int) -> None:
        try:
            await self.client.compact(revision)
        except Compacted:
            pass  # compacted that far already
        except etcd.EtcdError as e:
            if "future revision" in str(e):
                raise ValueError(f"cannot compact to {revision}: the store has not reached it") from None
            raise

    # -- watches -------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int) -> AbstractAsyncContextManager[AsyncIterator[list[Change]]]:
        return self._watch(prefix, start_revision)

    @asynccontextmanager
    async def _watch(self, prefix: str, start_revision: int) -> AsyncIterator[AsyncIterator[list[Change]]]:
        async with self.client.watch(self._key(prefix), prefix=True, start_revision=start_revision) as w:
            yield _Changes(self, w)

    # -- leases --------------------------------------------------------------------------------

    async def grant(self, ttl: float) -> Lease:
        if not ttl > 0:
            raise ValueError(f"a lease needs a TTL above 0 seconds, not {ttl}")
        id, granted = await self.client.lease_grant(math.ceil(ttl))
        return Lease(id, float(granted))

    async def keepalive(self, lease: int) -> float:
        return float(await self.client.lease_keepalive(lease))

    async def revoke(self, lease: int) -> None:
        await self.client.lease_revoke(lease)


class _Changes:
    """A watch's revisions as the store's changes.  Not an async generator: a read that is
    cancelled (a timeout around one ``__anext__``) must leave the watch usable."""

    def __init__(self, store: EtcdKV, w: etcd.Watch) -> None:
        self._store, self._w = store, w

    def __aiter__(self) -> _Changes:
        return self

    async def __anext__(self) -> list[Change]:
        events = await self._w.__anext__()
        return [Change("delete" if e.type == "DELETE" else "put", self._store._kv(e.kv)) for e in events]


@asynccontextmanager
async def open_etcd(endpoints: Sequence[str], *, namespace: str = DEFAULT_NAMESPACE,
                    timeout: float = etcd.DEFAULT_TIMEOUT) -> AsyncIterator[EtcdKV]:
    """The store on the etcd cluster at ``endpoints`` (every member's client URL)."""
    async with EtcdClient(endpoints, timeout=timeout) as client:
        yield EtcdKV(client, namespace)
