"""One controller at a time (control/leader.py), on the SQLite KV's real leases."""

from __future__ import annotations

import trio

from deployfs.control.leader import Leadership
from deployfs.state.cache import Cache
from deployfs.state.kv import Put
from deployfs.state.sqlitekv import open_sqlite


async def test_one_leads_the_next_takes_over_when_its_lease_ends_and_the_fence_is_the_key(tmp_path):
    async with open_sqlite(str(tmp_path / "kv.db")) as kv, trio.open_nursery() as n:
        cache = Cache(kv, "")
        await n.start(cache.run)
        leases = {name: (await kv.grant(0.3)).id for name in ("n1", "n2")}
        leading: list[str] = []
        lost: list[str] = []

        def lead(name: str):
            async def run(fence) -> None:
                leading.append(name)
                assert (await kv.get("leader")).kv.mod_revision == fence.mod_revision
                try:
                    await trio.sleep_forever()
                finally:
                    lost.append(name)
            return run

        async def keep(name: str) -> None:
            while True:
                await trio.sleep(0.1)
                await kv.keepalive(leases[name])

        first = Leadership(kv, cache, "n1", lambda: leases["n1"])
        n.start_soon(first.run, lead("n1"))
        keeper = trio.CancelScope()

        async def keep_n1() -> None:
            with keeper:
                await keep("n1")
        n.start_soon(keep_n1)
        with trio.fail_after(2):
            while first.holder() != "n1":
                await trio.sleep(0.01)
        second = Leadership(kv, cache, "n2", lambda: leases["n2"])
        n.start_soon(second.run, lead("n2"))
        n.start_soon(keep, "n2")
        await trio.sleep(0.5)
        assert leading == ["n1"] and second.holder() == "n1"  # n1's lease is kept: n2 waits

        keeper.cancel()  # n1 stands still: its lease runs out, its key goes
        with trio.fail_after(0.3 + 1.5):
            while leading != ["n1", "n2"]:
                await trio.sleep(0.01)
        assert lost == ["n1"] and cache.get("leader") is not None and second.holder() == "n2"
        assert second.take_lapsed() == "n1" and second.take_lapsed() is None  # n1 is known dead, once
        await kv.put("leader", b'{"node": "n3"}')  # anyone else's key deposes n2 at once
        with trio.fail_after(1):
            while lost != ["n1", "n2"]:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()


async def test_a_server_restarted_within_its_ttl_takes_the_lead_its_last_run_held(tmp_path):
    """A crashed leader's restart adopts its node's lease (node/membership.py), so the key it
    held never lapses: the new server takes it over (fenced on the key's revision) instead of
    waiting for ever, while another node's key under another lease is still respected."""
    async with open_sqlite(str(tmp_path / "kv.db")) as kv, trio.open_nursery() as n:
        cache = Cache(kv, "")
        await n.start(cache.run)
        mine, theirs = (await kv.grant(30)).id, (await kv.grant(30)).id
        await kv.put("leader", b'{"node": "n1", "pid": 1}', lease=mine)  # this node's last run (pid 1 is not us)
        held = (await kv.get("leader")).kv.mod_revision
        fences: list[int] = []

        async def lead(fence) -> None:
            fences.append(fence.mod_revision)
            await trio.sleep_forever()

        other = Leadership(kv, cache, "n2", lambda: theirs)
        n.start_soon(other.run, lead)
        await trio.sleep(0.2)
        assert fences == [] and other.holder() == "n1"  # not n2's to take: n1's lease lives
        restarted = Leadership(kv, cache, "n1", lambda: mine)
        n.start_soon(restarted.run, lead)
        with trio.fail_after(2):
            while not fences:
                await trio.sleep(0.01)
        now = (await kv.get("leader")).kv
        assert fences == [now.mod_revision] and now.mod_revision > held and now.lease == mine
        assert restarted.holder() == "n1" and b'"pid": 1,' not in now.value
        n.cancel_scope.cancel()
