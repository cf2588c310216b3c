"""The node agent acts on instance records alone: a real SQLite store, real processes.

Nothing here calls into the agent to make it act: each test writes a record (as the
controller would) and polls the store for what the agent observed.
"""

import os
import signal
import sys

import pytest
import trio

from deployfs.node.agent import NodeAgent
from deployfs.node.runtime import LocalRuntime, proc_start_time
from deployfs.state.records import InstanceRecord, decode, encode, instance_key, version_key
from deployfs.state.sqlitekv import open_sqlite

NODE = "node-a"
SLEEP = "image sleep\nargs 60\nstop_timeout 2\n"
EXITS = "image sh\nargs -c 'exit 3'\n"


def alive(pid):
    return proc_start_time(pid) is not None


@pytest.fixture
async def kv(tmp_path):
    async with open_sqlite(str(tmp_path / "kv.db")) as s:
        yield s


@pytest.fixture
def runtime(tmp_path):
    return LocalRuntime(str(tmp_path / "state"))


async def desire(kv, id, desired="run", *, manifest=SLEEP, node=NODE, version="v1", restarts=None):
    """Write an instance record as the controller does: read it, change the intent, write it back."""
    await kv.put(version_key("web", version), manifest.encode())
    read = await kv.get(instance_key("web", id))
    rec = decode(InstanceRecord, read.kv.value) if read.kv else InstanceRecord("web", id, id, version, node=node)
    rec.desired = desired
    if restarts is not None:
        rec.restarts = restarts
    await kv.put(instance_key("web", id), encode(rec))


async def until(kv, id, ok, timeout=10):
    """Poll the record until ``ok(rec)`` holds; return it."""
    with trio.fail_after(timeout):
        while True:
            read = await kv.get(instance_key("web", id))
            rec = decode(InstanceRecord, read.kv.value) if read.kv else None
            if ok(rec):
                return rec
            await trio.sleep(0.02)


async def gone(pid, timeout=10):
    with trio.fail_after(timeout):
        while alive(pid):
            await trio.sleep(0.02)


async def start_agent(nursery, kv, runtime):
    agent = NodeAgent(kv, runtime, NODE)
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await agent.run(task_status=task_status)

    await nursery.start(run)
    return agent, scope


async def test_run_restart_stop_through_records(kv, runtime):
    async with trio.open_nursery() as n:
        _, scope = await start_agent(n, kv, runtime)
        await desire(kv, 1)
        rec = await until(kv, 1, lambda r: r.state == "running")
        first = rec.pid
        assert alive(first) and rec.start_time == proc_start_time(first) and rec.incarnation == 0
        await desire(kv, 1, restarts=1)  # a fresh process, please
        rec = await until(kv, 1, lambda r: r.state == "running" and r.incarnation == 1)
        assert rec.pid != first and alive(rec.pid)
        await gone(first)
        second = rec.pid
        await desire(kv, 1, "stop")
        rec = await until(kv, 1, lambda r: r.state == "stopped")
        assert rec.pid is None and not alive(second)
        scope.cancel()


async def test_an_exit_is_recorded_and_not_restarted_by_the_agent(kv, runtime):
    async with trio.open_nursery() as n:
        _, scope = await start_agent(n, kv, runtime)
        await desire(kv, 2, manifest=EXITS)
        rec = await until(kv, 2, lambda r: r.state == "exited")
        assert (rec.why, rec.exit_ok, rec.phase) == ("exited with status 3", False, "exited")
        assert rec.last_exit is not None and rec.incarnation == 0
        # The controller decides restarts; until it asks, the instance stays down.
        await trio.sleep(0.3)
        assert (await until(kv, 2, lambda r: True)).state == "exited"
        await desire(kv, 2, manifest=SLEEP, restarts=1)
        rec = await until(kv, 2, lambda r: r.state == "running")
        assert alive(rec.pid)
        await desire(kv, 2, "stop")
        await until(kv, 2, lambda r: r.state == "stopped")
        scope.cancel()


async def test_records_of_other_nodes_and_of_the_engine_are_left_alone(kv, runtime):
    async with trio.open_nursery() as n:
        _, scope = await start_agent(n, kv, runtime)
        await desire(kv, 3, node="node-b")
        await desire(kv, 4, "")  # no intent: the engine supervises it in-process
        await desire(kv, 5)  # a record the agent does act on: once it runs, the others were seen too
        await until(kv, 5, lambda r: r.state == "running")
        for id in (3, 4):
            rec = await until(kv, id, lambda r: True)
            assert (rec.pid, rec.state, rec.incarnation) == (None, "starting", -1)
        await desire(kv, 5, "stop")
        await until(kv, 5, lambda r: r.state == "stopped")
        scope.cancel()


async def test_a_new_agent_adopts_what_the_last_one_left_running(kv, runtime, tmp_path):
    async with trio.open_nursery() as n:
        _, scope = await start_agent(n, kv, runtime)
        await desire(kv, 6)
        pid = (await until(kv, 6, lambda r: r.state == "running")).pid
        scope.cancel()  # the agent goes; its instances stay
    assert alive(pid)
    async with trio.open_nursery() as n:
        agent, scope = await start_agent(n, kv, LocalRuntime(str(tmp_path / "state")))
        assert agent.pid("web", 6) == pid  # adopted, not started again
        assert (await until(kv, 6, lambda r: True)).pid == pid
        os.kill(pid, signal.SIGKILL)  # the adopted process is watched: its end is recorded
        rec = await until(kv, 6, lambda r: r.state == "exited")
        assert rec.why == "exited" and not rec.exit_ok
        scope.cancel()


async def test_an_instance_that_died_while_no_agent_ran_is_recorded_gone(kv, runtime, tmp_path):
    async with trio.open_nursery() as n:
        _, scope = await start_agent(n, kv, runtime)
        await desire(kv, 7)
        pid = (await until(kv, 7, lambda r: r.state == "running")).pid
        scope.cancel()
    os.killpg(pid, signal.SIGKILL)
    await gone(pid)
    async with trio.open_nursery() as n:
        _, scope = await start_agent(n, kv, LocalRuntime(str(tmp_path / "state")))
        rec = await until(kv, 7, lambda r: r.state == "exited")
        assert rec.why == "gone while deployfs was down" and rec.pid is None
        scope.cancel()


async def test_a_deleted_record_stops_its_process(kv, runtime):
    async with trio.open_nursery() as n:
        _, scope = await start_agent(n, kv, runtime)
        await desire(kv, 8)
        pid = (await until(kv, 8, lambda r: r.state == "running")).pid
        await kv.delete(instance_key("web", 8))
        await gone(pid)
        scope.cancel()


async def test_what_cannot_start_is_recorded_and_the_agent_carries_on(kv, runtime):
    async with trio.open_nursery() as n:
        _, scope = await start_agent(n, kv, runtime)
        await desire(kv, 9, manifest="image /nonexistent/prog\n")
        rec = await until(kv, 9, lambda r: r.state == "exited")
        assert "cannot start /nonexistent/prog" in rec.why
        # A record naming a version with no manifest, and one whose manifest does not parse.
        await kv.put(instance_key("web", 10), encode(InstanceRecord("web", 10, 0, "nosuch", node=NODE, desired="run")))
        assert (await until(kv, 10, lambda r: r.state == "exited")).why == "no manifest for version nosuch"
        await desire(kv, 11, manifest="replicas lots\n", version="v2")
        assert (await until(kv, 11, lambda r: r.state == "exited")).why.startswith("manifests/web")
        await desire(kv, 12)  # and the agent still runs what it can
        rec = await until(kv, 12, lambda r: r.state == "running")
        await desire(kv, 12, "stop")
        await until(kv, 12, lambda r: r.state == "stopped")
        scope.cancel()


WEB = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "web.py")


async def test_the_agent_probes_and_records_health_and_phase(kv, runtime):
    fails = (f"image {sys.executable}\nargs {WEB} --fail-health-after 1.5\nhealth http://127.0.0.1:$PORT/healthz\n"
             "health_interval 0.1\nhealth_retries 2\nmin_healthy 0.2\nstop_timeout 2\n")
    async with trio.open_nursery() as n:
        _, scope = await start_agent(n, kv, runtime)
        rec = InstanceRecord("web", 20, 0, "v3", port=20801, node=NODE, desired="run")
        await kv.put(version_key("web", "v3"), fails.encode())
        await kv.put(instance_key("web", 20), encode(rec))
        rec = await until(kv, 20, lambda r: r.phase == "ready")
        assert rec.health == "healthy" and rec.state == "running"
        rec = await until(kv, 20, lambda r: r.phase == "unhealthy")
        assert rec.health == "unhealthy" and rec.why == "http 503 from 127.0.0.1:20801/healthz (2 checks failed)"
        assert rec.state == "running"  # unhealthy is reported, not acted on: stopping it is the controller's call
        # No health check: alive for one health_interval, then the min_healthy soak.
        await desire(kv, 21, manifest="image sleep\nargs 60\nhealth_interval 0.2\nmin_healthy 0.2\n")
        rec = await until(kv, 21, lambda r: r.phase == "ready")
        assert rec.health == "healthy"
        for id in (20, 21):
            await desire(kv, id, "stop")
            await until(kv, id, lambda r: r.state == "stopped")
        scope.cancel()


async def test_a_new_agent_keeps_how_an_instance_ended(kv, runtime, tmp_path):
    async with trio.open_nursery() as n:
        _, scope = await start_agent(n, kv, runtime)
        await desire(kv, 22, manifest=EXITS)
        await until(kv, 22, lambda r: r.state == "exited")
        scope.cancel()
    async with trio.open_nursery() as n:
        _, scope = await start_agent(n, kv, LocalRuntime(str(tmp_path / "state")))
        await desire(kv, 23)  # once this runs, the new agent has seen record 22 too
        await until(kv, 23, lambda r: r.state == "running")
        assert (await until(kv, 22, lambda r: True)).why == "exited with status 3"
        await desire(kv, 23, "stop")
        await until(kv, 23, lambda r: r.state == "stopped")
        scope.cancel()


async def test_the_engines_store_drives_the_agent(tmp_path, runtime):
    """The controller's side as deployfs serve has it: the synchronous SQLite facade. Its commits
    reach the agent through the same connection's after-commit watch, with no call in between."""
    from deployfs.state.store import SqliteStore

    store = SqliteStore(str(tmp_path / "db"))
    try:
        async with trio.open_nursery() as n:
            _, scope = await start_agent(n, store.kv, runtime)

            async def record(ok):
                with trio.fail_after(10):
                    while not ok(rec := store.list_instances("web")[0]):
                        await trio.sleep(0.02)
                return rec

            with store.transaction():
                store.put_version("web", "v1", SLEEP)
                store.put_instance(InstanceRecord("web", store.next_instance_id(), 0, "v1", node=NODE, desired="run"))
            rec = await record(lambda r: r.state == "running")
            assert alive(rec.pid)
            rec.desired = "stop"  # (read after the agent wrote: a blind write would undo what it observed)
            store.put_instance(rec)
            assert (await record(lambda r: r.state == "stopped")).pid is None
            assert not alive(rec.pid)
            scope.cancel()
    finally:
        store.close()


async def test_an_event_is_said_only_once_the_record_it_tells_of_is_written(kv, runtime):
    """Events appear after the commit of what they say: whoever reads the event then the record
    (a shell, `wait`) never finds the record behind it."""
    said: list[tuple[str, str]] = []

    class Said:  # the event log, noting what the record said when each event was emitted
        listeners: list = []

        def emit(self, service: str, text: str) -> None:
            id = int(text.split()[1])
            [(value,)] = kv._db.execute("SELECT value FROM kv WHERE key = ?", (instance_key("web", id),)).fetchall()
            said.append((text, decode(InstanceRecord, value).state))

    agent = NodeAgent(kv, runtime, NODE, events=Said())  # type: ignore[arg-type]
    async with trio.open_nursery() as n:
        await n.start(agent.run)
        await desire(kv, 1, manifest=EXITS)
        await desire(kv, 2, manifest="image /nonexistent/prog\n", version="v2")
        await desire(kv, 3, version="v3")
        await until(kv, 3, lambda r: r.state == "running")
        await desire(kv, 3, "stop", version="v3")
        for id, state in ((1, "exited"), (2, "exited"), (3, "stopped")):
            await until(kv, id, lambda r, state=state: r.state == state)
        n.cancel_scope.cancel()
    told = {text.split(" ", 2)[2].split(":")[0]: state for text, state in said}
    assert told["exited with status 3"] == "exited"
    assert told["failed to start"] == "exited"
    assert told["stopped"] == "stopped"


async def test_the_agent_gives_ports_records_them_and_frees_them_with_the_record(kv, tmp_path):
    """Where an instance listens is its node's to say (docs/architecture.md "Ports"): the
    controller writes no port; the agent gives a free one of its range at the first start,
    records it with the pid (nothing routes to the instance before), keeps it across restarts,
    and frees it when the record goes."""
    import socket

    runtime = LocalRuntime(str(tmp_path / "state"), ports=(20750, 20751))
    wants_port = SLEEP + "port 20790\n"
    with socket.socket() as other:  # another program holds the first port of the range
        other.bind(("127.0.0.1", 20750))
        async with trio.open_nursery() as n:
            _, scope = await start_agent(n, kv, runtime)
            await desire(kv, 1, manifest=wants_port)
            rec = await until(kv, 1, lambda r: r.state == "running")
            assert rec.port == 20751  # the held one skipped
            await desire(kv, 1, restarts=1, manifest=wants_port)
            rec = await until(kv, 1, lambda r: r.state == "running" and r.incarnation == 1)
            assert rec.port == 20751  # a restart keeps its port
            await desire(kv, 2, manifest=wants_port)
            rec = await until(kv, 2, lambda r: r.state == "exited")
            assert rec.port is None and rec.why == "no free port in 20750-20751"
            await desire(kv, 1, "stop", manifest=wants_port)
            await until(kv, 1, lambda r: r.state == "stopped")
            await kv.delete(instance_key("web", 1))  # (the controller deletes a stopped instance)
            # As the controller would: restart what exited, until the port is free (the agent acts
            # on the deletion and on the restart in no set order).
            for restarts in range(1, 50):
                await desire(kv, 2, restarts=restarts, manifest=wants_port)
                rec = await until(kv, 2, lambda r: r.incarnation == restarts and r.state in ("running", "exited"))
                if rec.state == "running":
                    break
            assert rec.state == "running" and rec.port == 20751  # freed with instance 1's record
            await desire(kv, 2, "stop")
            await until(kv, 2, lambda r: r.state == "stopped")
            scope.cancel()
