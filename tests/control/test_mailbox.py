"""Commands and events from any node reach the one controller through the records
(control/mailbox.py): the controller on a ClusterStore over the SQLite KV, a fake runtime."""

from __future__ import annotations

import pytest
import trio

from deployfs.control.engine import Engine
from deployfs.control.mailbox import Mailbox, Outbox
from deployfs.model.errors import CommandError, Kind
from deployfs.node.agent import NodeAgent
from deployfs.state.cache import Cache
from deployfs.state.clusterstore import ClusterStore
from deployfs.state.events import EventLog
from deployfs.state.records import COMMANDS, EVENTS, INSTANCES, REPLIES, SAY, VERSIONS
from deployfs.state.sqlitekv import open_sqlite
from tests.control.harness import manifest
from tests.fakes import FakeProber, FakeRuntime


async def test_commands_wait_for_a_controller_and_are_carried_out_once_with_the_events_said(tmp_path, autojump_clock):
    async with open_sqlite(str(tmp_path / "kv.db")) as kv, trio.open_nursery() as n:
        view = Cache(kv, "", skip=(EVENTS, VERSIONS))  # a node's: what its mount reads
        await n.start(view.run)
        outbox = Outbox(kv, view, "n2")
        n.start_soon(outbox.run)
        mine = ClusterStore(kv, view, give_up=True)
        n.start_soon(mine.run)
        mine.put_file("web", manifest(replicas=2))
        await mine.settled()
        replies: list[str] = []

        async def send() -> None:
            replies.append(await outbox.command("web", "apply", None, "uid=0"))
        n.start_soon(send)
        outbox.say("web", 1.0, "said on n2 before any controller")
        await trio.sleep(5)
        assert replies == [] and view.range(COMMANDS)  # no controller yet: it waits in the records

        main = Cache(kv, "")
        await n.start(main.run)
        store = ClusterStore(kv, main)
        n.start_soon(store.run)
        engine = Engine(store, events=EventLog(store))
        engine.nodes.cluster = True
        rt = FakeRuntime()
        agent = NodeAgent(kv, rt, engine.node, prober=FakeProber(rt), events=engine.events, cache=Cache(kv, INSTANCES))
        engine.prepare()
        await n.start(agent.run)
        await n.start(engine.run)
        await n.start(Mailbox(engine, store).run)
        with trio.fail_after(10):
            while not replies:
                await trio.sleep(0.01)
        assert replies[0].startswith("ok deployed ")
        with pytest.raises(CommandError) as e:
            await outbox.command("nosuch", "apply", None, "uid=0")
        assert e.value.kind is Kind.NOT_FOUND
        outbox.say("web", 2.0, "said long ago, heard now")  # (a node's clock behind, or a takeover between)
        with trio.fail_after(10):
            while view.range(COMMANDS) or view.range(REPLIES) or view.range(SAY):
                await trio.sleep(0.01)  # each command, reply and event handed on is gone once done
        lines = engine.events.current("web").decode().splitlines()
        assert lines == sorted(lines)  # dated in the order written, though said before the controller was there
        assert "said on n2 before any controller" in lines[0]
        assert sum("deployed" in line for line in lines) == 1  # once, though it waited
        n.cancel_scope.cancel()
