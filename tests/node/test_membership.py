"""A node's membership (node/membership.py) on the SQLite store with short leases: the name
is claimed once, refused to a second server while its lease lives, kept alive, given up
on leave, and claimed again after a lost lease.  The same against etcd: tests/cluster."""

from __future__ import annotations

import json

import pytest
import trio

from deployfs.node.membership import Membership, NameTaken
from deployfs.state.sqlitekv import open_sqlite

TTL = 0.3


@pytest.fixture
async def store(tmp_path):
    async with open_sqlite(str(tmp_path / "kv.db")) as s:
        yield s


async def test_a_name_is_held_while_its_lease_lives(store):
    a = Membership(store, "n1", "127.0.1.1", TTL)
    await a.join()
    alive = (await store.get("alive/n1")).kv
    assert alive is not None and alive.lease == a.lease and json.loads(alive.value)["address"] == "127.0.1.1"
    record = json.loads((await store.get("nodes/n1")).kv.value)
    assert record["address"] == "127.0.1.1" and record["cordoned"] is False

    before = (await store.range("")).revision
    b = Membership(store, "n1", "127.0.1.2", TTL)
    with pytest.raises(NameTaken) as e:
        await b.join()
    assert "node name 'n1' is taken" in e.value.message and "address=127.0.1.1" in e.value.message
    assert (await store.range("")).revision == before and b.lease == 0  # refused, nothing written

    async with trio.open_nursery() as n:
        await n.start(a.run)
        await trio.sleep(TTL * 3)  # renewed every TTL/3
        assert (await store.get("alive/n1")).kv is not None
        n.cancel_scope.cancel()

    await a.leave()
    assert (await store.get("alive/n1")).kv is None  # at once, not after the TTL
    await b.join()
    record = json.loads((await store.get("nodes/n1")).kv.value)
    assert record["address"] == "127.0.1.2"  # the record stays, under the new holder


async def test_a_dead_servers_name_is_free_after_its_ttl(store):
    await Membership(store, "n1", "127.0.1.1", TTL).join()  # joins, then is never kept alive
    b = Membership(store, "n1", "127.0.1.2", TTL)
    with pytest.raises(NameTaken):
        await b.join()
    with trio.fail_after(TTL * 4):
        while (await store.get("alive/n1")).kv is not None:
            await trio.sleep(0.02)
    await b.join()


async def test_a_lost_lease_is_claimed_again_keeping_the_record(store):
    a = Membership(store, "n1", "127.0.1.1", TTL)
    await a.join()
    node = (await store.get("nodes/n1")).kv
    await store.put("nodes/n1", json.dumps({**json.loads(node.value), "cordoned": True}).encode())
    async with trio.open_nursery() as n:
        await n.start(a.run)
        lost = a.lease
        await store.revoke(lost)  # as after an outage longer than the TTL
        with trio.fail_after(TTL * 4):
            while a.rejoins == 0:
                await trio.sleep(0.02)
        assert a.lease not in (0, lost) and (await store.get("alive/n1")).kv.lease == a.lease
        assert json.loads((await store.get("nodes/n1")).kv.value)["cordoned"] is True
        n.cancel_scope.cancel()


async def test_two_servers_racing_for_a_name_one_wins(store):
    racers = [Membership(store, "n1", f"127.0.1.{i}", TTL) for i in (1, 2, 3)]
    outcomes: list[str] = []

    async def race(m: Membership) -> None:
        try:
            await m.join()
            outcomes.append("won")
        except NameTaken:
            outcomes.append("refused")

    async with trio.open_nursery() as n:
        for m in racers:
            n.start_soon(race, m)
    assert sorted(outcomes) == ["refused", "refused", "won"]


async def test_a_restarted_server_takes_its_own_name_back(store, tmp_path):
    remembered = str(tmp_path / "cluster-lease")
    first = Membership(store, "n1", "127.0.1.1", TTL, lease_file=remembered)
    await first.join()
    # Another machine (another state dir) is refused; this node's next server is not.
    with pytest.raises(NameTaken):
        await Membership(store, "n1", "127.0.1.2", TTL, lease_file=str(tmp_path / "elsewhere")).join()
    again = Membership(store, "n1", "127.0.1.1", TTL, lease_file=remembered)
    await again.join()
    assert again.adopted and again.lease == first.lease
    alive = (await store.get("alive/n1")).kv
    assert alive.lease == first.lease
    await again.leave()
    assert (await store.get("alive/n1")).kv is None and not (tmp_path / "cluster-lease").exists()
    # A remembered lease that ran out is no claim: a fresh one is taken.
    await first.join()
    await store.revoke(first.lease)
    late = Membership(store, "n1", "127.0.1.1", TTL, lease_file=remembered)
    await late.join()
    assert not late.adopted and late.lease != first.lease
