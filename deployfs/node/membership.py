"""This node's membership of a cluster: its name claimed under a lease, kept alive.

Two keys per node, as Kubernetes keeps a Node object and a Lease beside it:

``nodes/<name>``
    The node's record (JSON: ``address``, ``cordoned``, ``joined``), kept after
    the node dies, so the cluster still knows it (and can call it ``down``).
``alive/<name>``
    Put under the node's lease (TTL ``--node-ttl``): it exists exactly while the
    node's lease lives.  Its value says who holds the name (address, host, pid,
    when) for the error a second server gets.

Joining is one conditional write: ``alive/<name>`` must be absent and
``nodes/<name>`` unchanged since it was read, so two servers racing for one
name cannot both win; the loser is refused with :class:`NameTaken` and writes
nothing.  The one exception is this node itself: its state dir remembers the
lease it holds, so a server restarted within the TTL (after a crash, or with
``--keep-instances``) takes its name back under that lease.  A joined node renews its lease every TTL/3 (one request each).  If
the lease is lost anyway -- etcd paused or out of quorum past the TTL, this
machine frozen -- the node claims its name again under a new lease, unless
another server has taken it meanwhile (then it says so, and keeps trying:
that server may be a mistake that goes away).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import trio

from ..model.errors import Error, Kind
from ..state import statedir
from ..state.kv import Compare, Conflict, KVStore, Lease, LeaseNotFound, Put, StoreError

log = logging.getLogger(__name__)

NODES = "nodes/"
ALIVE = "alive/"


class NameTaken(Error):
    """Another server holds this node name under a live lease."""

    def __init__(self, name: str, holder: dict[str, Any], ttl: float) -> None:
        who = ", ".join(f"{k}={holder[k]}" for k in ("address", "host", "pid") if k in holder)
        since = holder.get("since")
        when = time.strftime(" since %Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if isinstance(since, (int, float)) else ""
        super().__init__(Kind.EXISTS, f"node name {name!r} is taken: a server with a live lease holds it "
                                      f"({who}{when}); give this one another --node, or, if that server is "
                                      f"gone, start again once its lease runs out (--node-ttl, {ttl:g} s)")
        self.holder = holder


@dataclass
class Membership:
    store: KVStore
    name: str
    address: str
    ttl: float
    log_port: int = 0  # where its log server answers, on ``address`` (node/logserver.py); 0: none
    # where the state dir remembers this node's lease, so a restart within the TTL (after
    # a crash, or --keep-instances) takes its own name back instead of being refused
    lease_file: str | None = None
    lease: int = 0  # 0: not joined (or lost)
    adopted: bool = False  # joined under the lease it held before a restart
    rejoins: int = 0  # how often the lease was lost and the name claimed again
    unreachable: str | None = None  # why the last keepalive failed, while the store is out of reach

    @property
    def node_key(self) -> str:
        return NODES + self.name

    @property
    def alive_key(self) -> str:
        return ALIVE + self.name

    def _holder(self) -> bytes:
        return json.dumps({"address": self.address, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": round(time.time(), 3)}, sort_keys=True).encode()

    async def join(self) -> None:
        """Claim the name under a lease; :class:`NameTaken` if another live server holds it.

        "Another": a server restarted on this node (same state dir) within the TTL finds
        its own lease remembered there, and takes the name back under it.
        """
        previous = self._remembered()
        fresh: Lease | None = None
        try:
            while True:
                alive = (await self.store.get(self.alive_key)).kv
                if alive is not None and not (previous and alive.lease == previous):
                    raise NameTaken(self.name, _json(alive.value), self.ttl)
                if alive is not None:  # ours, from before a restart: renew it, then write our own details
                    try:
                        await self.store.keepalive(previous)
                    except LeaseNotFound:
                        previous = 0
                        continue
                    lease, guard = previous, Compare(self.alive_key, alive.mod_revision)
                else:
                    fresh = fresh or await self.store.grant(self.ttl)
                    lease, guard = fresh.id, Compare(self.alive_key, 0)
                node = (await self.store.get(self.node_key)).kv
                record: dict[str, Any] = _json(node.value) if node is not None else {"cordoned": False}
                record.update(address=self.address, log_port=self.log_port, joined=round(time.time(), 3))
                try:
                    await self.store.txn(
                        [guard, Compare(self.node_key, node.mod_revision if node else 0)],
                        [Put(self.node_key, json.dumps(record, sort_keys=True).encode()),
                         Put(self.alive_key, self._holder(), lease)])
                except Conflict:
                    continue  # someone wrote either key since we read it: look again
                except LeaseNotFound:
                    if lease != previous:
                        raise
                    previous = 0  # it ran out between the renewal and the write
                    continue
                break
        except BaseException:
            if fresh is not None:
                await self._revoke_quietly(fresh.id)
            raise
        if fresh is not None and lease != fresh.id:
            await self._revoke_quietly(fresh.id)  # granted, then not needed
        self.lease, self.adopted = lease, lease == previous
        self._remember(lease)

    async def _revoke_quietly(self, lease: int) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await self.store.revoke(lease)
            except StoreError:
                pass  # it expires by itself

    def _remembered(self) -> int:
        """The lease this node held before a restart, as the state dir remembers it (0: none)."""
        if self.lease_file is None:
            return 0
        try:
            with statedir.open_file(self.lease_file) as f:
                d = _json(f.read())
        except OSError:
            return 0
        lease = d.get("lease")
        return lease if d.get("name") == self.name and isinstance(lease, int) else 0

    def _remember(self, lease: int) -> None:
        if self.lease_file is None:
            return
        try:
            tmp = self.lease_file + ".tmp"
            with statedir.open_file(tmp, "wb") as f:
                f.write(json.dumps({"name": self.name, "lease": lease}).encode())
            os.replace(tmp, self.lease_file)
        except OSError as e:  # only a restart within the TTL needs it: that one would be refused
            log.warning("node %s: cannot remember the lease in %s: %s", self.name, self.lease_file, e)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the lease alive for ever (join first); claim the name again if the lease is lost."""
        if not self.lease:
            await self.join()
        task_status.started()
        every = self.ttl / 3
        while True:
            await trio.sleep(every)
            try:
                await self.store.keepalive(self.lease)
                self.unreachable = None
            except LeaseNotFound:
                self.unreachable = None
                log.warning("node %s: the lease expired (the cluster store was out of reach, or this machine "
                            "stood still, longer than --node-ttl %g s): claiming the name again", self.name, self.ttl)
                self.lease = 0
                await self._rejoin()
            except StoreError as e:  # unreachable: keep trying, the lease may well outlive the outage
                log.warning("node %s: lease keepalive failed: %s", self.name, e)
                self.unreachable = str(e)

    async def _rejoin(self) -> None:
        while not self.lease:
            try:
                await self.join()
                self.rejoins += 1
                log.info("node %s: joined again under a new lease", self.name)
            except NameTaken as e:
                log.error("node %s: %s", self.name, e.message)
                await trio.sleep(self.ttl)
            except StoreError as e:
                log.warning("node %s: cannot claim the name again yet: %s", self.name, e)
                await trio.sleep(min(1.0, self.ttl / 3))

    async def leave(self) -> None:
        """Give the name up now (revoke the lease): another server may take it at once."""
        lease, self.lease = self.lease, 0
        if lease:
            await self.store.revoke(lease)
        if self.lease_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lease_file)


def _json(value: bytes) -> dict[str, Any]:
    try:
        d = json.loads(value)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}
