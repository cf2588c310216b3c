"""The etcd store through outages, with real members stopped, killed and frozen:
a member down is passed by; quorum lost (or the only member down) makes every call
Unavailable within the client's timeout; when etcd returns, writes carry on and a
watch resumes with no event lost or repeated, and leases kept alive survive."""

from __future__ import annotations

import signal

import pytest
import trio

from deployfs.model.errors import Kind
from deployfs.state.etcdkv import EtcdKV, Unavailable, open_etcd
from deployfs.state.cache import Cache
from deployfs.state.kv import Change, Compare, Put
from tests.etcd import Cluster, Member, cluster, etcd3  # noqa: F401  (fixture)

TIMEOUT = 1.0  # the client's deadline per call in these tests


def member_at(c: Cluster, url: str) -> Member:
    return next(m for m in c.members if m.url == url)


async def collect(changes, until_key: str, timeout: float = 10.0, *, at: int = 0) -> list[Change]:
    """Every change the watch gives until one to ``until_key`` (whole revisions), at revision ``at`` or later."""
    got: list[Change] = []
    with trio.fail_after(timeout):
        async for revision in changes:
            assert len({c.revision for c in revision}) == 1
            got += revision
            if any(c.kv.key == until_key and c.revision >= at for c in revision):
                return got
    raise AssertionError("the watch ended")


async def history_is_whole(s: EtcdKV, seen: list[Change], prefix: str) -> None:
    """What the watch delivered is exactly what the store holds: nothing lost, nothing twice."""
    revisions = [c.revision for c in seen]
    assert revisions == sorted(revisions) and len(set((c.kv.key, c.revision) for c in seen)) == len(seen)
    now = {kv.key: (kv.value, kv.mod_revision) for kv in (await s.range(prefix)).kvs}
    last: dict[str, tuple[bytes, int]] = {}
    for c in seen:
        if c.kind == "put":
            last[c.kv.key] = (c.kv.value, c.revision)
        else:
            del last[c.kv.key]
    assert last == now


async def until_writable(s: EtcdKV, key: str, value: bytes, timeout: float = 15.0) -> tuple[int, float]:
    """Put once etcd takes writes again; returns (revision, seconds it took)."""
    t0 = trio.current_time()
    with trio.fail_after(timeout):
        while True:
            try:
                return await s.put(key, value), trio.current_time() - t0
            except Unavailable:
                continue


async def test_a_dead_member_is_passed_by_and_the_watch_moves_on(etcd3: Cluster):  # noqa: F811
    async with open_etcd(etcd3.urls, timeout=TIMEOUT) as s:
        lease = await s.grant(1)
        r = await s.put("nodes/n1", b"alive", lease=lease.id)
        async with s.watch("svc/", r + 1) as changes, trio.open_nursery() as n:
            n.start_soon(s.client.keep_alive, lease.id, lease.ttl)
            await s.put("svc/0", b"0")
            seen = await collect(changes, "svc/0")
            victim = member_at(etcd3, s.client.current_endpoint)  # the watch's member, and the client's
            victim.stop(kill=True)
            for i in range(1, 6):
                await s.put(f"svc/{i}", str(i).encode())
            seen += await collect(changes, "svc/5")
            assert [c.kv.key for c in seen] == [f"svc/{i}" for i in range(6)]
            await history_is_whole(s, seen, "svc/")
            # The lease outlives the member (and the leader, if it was one) by more than its TTL.
            await trio.sleep(lease.ttl * 1.5)
            assert (await s.get("nodes/n1")).kv is not None
            etcd3.start(victim)
            etcd3.wait_healthy([victim])
            n.cancel_scope.cancel()


async def test_quorum_lost_is_unavailable_then_everything_resumes(etcd3: Cluster):  # noqa: F811
    async with open_etcd(etcd3.urls, timeout=TIMEOUT) as s:
        lease = await s.grant(1)
        r = await s.put("nodes/n1", b"alive", lease=lease.id)
        cache = Cache(s, "svc/")  # what readers (the view) read
        async with s.watch("svc/", r + 1) as changes, trio.open_nursery() as n:
            n.start_soon(s.client.keep_alive, lease.id, lease.ttl)
            await n.start(cache.run)
            await cache.wait_for(await s.put("svc/before", b"1"))
            seen = await collect(changes, "svc/before")
            lost = etcd3.members[:2]
            for m in lost:
                m.stop(kill=True)
            for attempt in (s.put("svc/x", b"?"), s.get("svc/before"),
                            s.txn([Compare("svc/y", 0)], [Put("svc/y", b"?")])):
                t0 = trio.current_time()
                with pytest.raises(Unavailable) as e:
                    await attempt
                assert trio.current_time() - t0 < TIMEOUT + 0.5
                assert e.value.kind is Kind.UNAVAILABLE and e.value.message == "cluster store unreachable"
            assert cache.get("svc/before").value == b"1"  # reads show the last known state
            # A watch opened now (from a known revision) waits for etcd instead of failing.
            async with s.watch("svc/", seen[-1].revision + 1) as late:
                await trio.sleep(lease.ttl * 1.5)  # out longer than the lease's TTL
                for m in lost:
                    etcd3.start(m)
                after, took = await until_writable(s, "svc/after", b"2")
                print(f"\nwrites again {took:.2f}s after the members' restart")
                # (an earlier try that timed out may have been applied too: collect up to this one)
                seen += await collect(changes, "svc/after", at=after)
                late_seen = await collect(late, "svc/after", at=after)
            # The writes that timed out may or may not have been applied (etcd queued them):
            # either way the watches show exactly what the store holds.
            await history_is_whole(s, seen, "svc/")
            assert late_seen == seen[1:]
            with trio.fail_after(5):
                await cache.wait_for(after)  # and the copy catches up
            assert [kv.key for kv in cache.range("svc/")] == [kv.key for kv in (await s.range("svc/")).kvs]
            assert (await s.get("nodes/n1")).kv is not None  # no leader, no lease expiry
            n.cancel_scope.cancel()


async def test_the_only_member_stopped_and_restarted():
    with cluster(1) as c:
        async with open_etcd(c.urls, timeout=TIMEOUT) as s:
            r = await s.put("svc/0", b"0")
            async with s.watch("svc/", r) as changes:
                seen = await collect(changes, "svc/0")
                c.members[0].stop()
                with pytest.raises(Unavailable):
                    await s.get("svc/0")
                c.start()
                c.wait_healthy()
                await until_writable(s, "svc/1", b"1")
                await s.delete("svc/0")
                seen += await collect(changes, "svc/0")
                assert [(ch.kind, ch.kv.key) for ch in seen] == [("put", "svc/0"), ("put", "svc/1"), ("delete", "svc/0")]
                await history_is_whole(s, seen, "svc/")


async def test_a_frozen_member_is_passed_by(etcd3: Cluster):  # noqa: F811
    # A member that is SIGSTOPped (or a hung machine) accepts connections and answers nothing.
    async with open_etcd(etcd3.urls, timeout=3 * TIMEOUT) as s:
        s.client.watch_idle = 1.0
        r = await s.put("svc/0", b"0")
        async with s.watch("svc/", r) as changes:
            seen = await collect(changes, "svc/0")
            frozen = member_at(etcd3, s.client.current_endpoint)
            frozen.signal(signal.SIGSTOP)
            try:
                t0 = trio.current_time()
                await s.put("svc/1", b"1")  # its share of the deadline on the frozen one, then another
                assert trio.current_time() - t0 < 3 * TIMEOUT
                seen += await collect(changes, "svc/1", timeout=5)
                await history_is_whole(s, seen, "svc/")
            finally:
                frozen.signal(signal.SIGCONT)
