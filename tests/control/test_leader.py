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
        await kv.put("leader", b'{"node": "n3"}')  # anyone else's key deposes n2 at once
        with trio.fail_after(1):
            while lost != ["n1", "n2"]:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
