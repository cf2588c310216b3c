"""The seed's health-check verify list with real processes, sockets and files."""

import os
import signal
import sys

import pytest
import trio

from deployfs.serve.local import LocalNode
from deployfs.node.health import Probes
from deployfs.node.runtime import LocalRuntime, marked_processes, marker_prefix, proc_start_time
from deployfs.state.store import SqliteStore

SERVICE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "web.py"))


@pytest.fixture
async def real_node(tmp_path):
    """The engine and its node agent on real processes, as ``deployfs serve`` runs them."""
    store = SqliteStore(str(tmp_path / "state"))
    probes = Probes()
    node = LocalNode(store, LocalRuntime(str(tmp_path / "state")), probes, state_dir=str(tmp_path / "state"))
    async with trio.open_nursery() as n:
        await n.start(node.run)
        yield node
        with trio.fail_after(30):
            await node.shutdown()
    await probes.aclose()


@pytest.fixture
async def real(real_node):
    return real_node.engine


def deploy(engine, text: str, name="web"):
    engine.store.put_file(name, text.encode())
    return engine.command(name, "apply", None, "uid=0")


async def until(pred, timeout=15.0):
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


def ready(svc):
    return [i for i in svc.by_slot() if i.phase.value == "ready" and not i.leaving]


async def test_file_health_check_then_kill_and_recover(real, real_node, tmp_path):
    flag = tmp_path / "up-$INSTANCE"
    deploy(real, f"image {sys.executable}\nargs {SERVICE} --touch {flag}\nreplicas 2\nport 18080\n"
                 f"health {flag}\nhealth_interval 0.2\nhealth_retries 2\n")
    svc = real.services["web"]
    await until(lambda: len(ready(svc)) == 2)
    assert svc.health() == "healthy"
    victim = svc.by_slot()[0]
    old_pid = victim.rec.pid
    t0 = trio.current_time()
    os.kill(old_pid, signal.SIGKILL)
    await until(lambda: victim.rec.pid != old_pid and victim.phase.value == "ready")
    assert trio.current_time() - t0 < 0.2 + 2  # detected within health_interval, restarted, healthy
    assert victim.rec.restarts == 1
    text = real.events.current("web").decode()
    assert "instance 0 killed by signal 9 (SIGKILL)" in text and "restarting (1/5)" in text


async def test_failing_health_restarts_after_retries_then_gives_up(real):
    deploy(real, f"image {sys.executable}\nargs {SERVICE} --fail-health-after 0.5\nreplicas 1\nport 18081\n"
                 "health http://127.0.0.1:$PORT/healthz\nhealth_interval 0.1\nhealth_retries 3\nmax_restarts 2\n")
    svc = real.services["web"]
    await until(lambda: svc.by_slot() and svc.by_slot()[0].rec.state == "failed", timeout=30)
    text = real.events.current("web").decode()
    assert "unhealthy: http 503 from 127.0.0.1:" in text and "(3 checks failed)" in text
    assert "restarting (2/2)" in text and "giving up" in text
    assert svc.health() == "unhealthy"


async def test_a_program_nobody_here_wrote(real, real_node, tmp_path):
    deploy(real, f"image {sys.executable}\nargs -m http.server $PORT --bind 127.0.0.1\ndir {tmp_path}\n"
                 "replicas 2\nport 18082\nhealth http://127.0.0.1:$PORT/\nhealth_interval 0.2\n")
    svc = real.services["web"]
    await until(lambda: len(ready(svc)) == 2)
    ports = {i.rec.port for i in svc.by_slot()}
    assert len(ports) == 2 and all(24000 <= p <= 31999 for p in ports)
    real.command("web", "scale", "1", "uid=0")
    await until(lambda: len(svc.by_slot()) == 1)
    real.command("web", "stop", None, "uid=0")
    await until(lambda: not svc.instances)
    assert svc.health() == "stopped"


async def test_no_health_line_means_healthy_after_one_interval(real):
    deploy(real, "image sleep\nargs 60\nreplicas 1\nhealth_interval 0.3\n")
    svc = real.services["web"]
    t0 = trio.current_time()
    await until(lambda: len(ready(svc)) == 1)
    assert trio.current_time() - t0 >= 0.29


async def test_instance_logs_stay_bounded(real, real_node, tmp_path):
    # 200,000 lines of output, then quiet: what is kept on disk and shown is bounded.
    deploy(real, "image sh\nargs -c 'seq 200000; exec sleep 60'\nreplicas 1\nlog_lines 100\nhealth_interval 0.2\n")
    svc = real.services["web"]
    await until(lambda: len(ready(svc)) == 1)
    inst = svc.by_slot()[0]
    path = real_node.runtime.log_path("web", inst.rec.id)
    await until(lambda: os.path.getsize(path) < 20_000, timeout=10)
    lines = real_node.runtime.read_log("web", inst.rec.id, 100).splitlines()
    assert len(lines) <= 100
    assert os.path.getsize(path + ".1") < 2_000  # the last 100 lines, not the 1.3 MB written


async def test_an_instance_killed_at_stop_timeout_says_so(real):
    # A kill cuts whatever was in flight: the operator must be able to see it happened.
    deploy(real, f"image {sys.executable}\nargs {SERVICE} --ignore-term\nreplicas 2\nport 18083\n"
                 "health tcp 127.0.0.1:$PORT\nhealth_interval 0.1\nstop_timeout 0.3\n")
    svc = real.services["web"]
    await until(lambda: len(ready(svc)) == 2)
    real.command("web", "scale", "1", "uid=0")
    await until(lambda: len(svc.by_slot()) == 1)
    text = real.events.current("web").decode()
    assert "instance 1 stopped (killed: still running 0.3s after SIGTERM)" in text


async def test_an_unhealthy_instance_that_exits_on_term_is_replaced_at_once(real, real_node, tmp_path):
    # Issue 14.6: the restart waited the whole stop_timeout although the process
    # was gone (a zombie) a moment after SIGTERM.
    flag = tmp_path / "ready"
    flag.write_text("ok\n")
    deploy(real, f"image sleep\nargs 60\nreplicas 1\nhealth {flag}\nhealth_interval 0.1\nhealth_retries 1\n"
                 "stop_timeout 5\n")
    svc = real.services["web"]
    await until(lambda: len(ready(svc)) == 1)
    inst = svc.by_slot()[0]
    old_pid = inst.rec.pid
    t0 = trio.current_time()
    flag.unlink()
    await until(lambda: inst.rec.pid != old_pid and inst.rec.state == "running")
    assert trio.current_time() - t0 < 2  # a check, a short backoff; not stop_timeout (5 s)
    assert "instance 0 unhealthy" in real.events.current("web").decode()
    flag.write_text("ok\n")


async def _engine(state: str, nursery) -> LocalNode:
    node = LocalNode(SqliteStore(state), LocalRuntime(state), Probes(), state_dir=state)
    await nursery.start(node.run)
    return node


def _marked(state: str) -> dict[int, str]:
    return {pid: v for pid, v in marked_processes(marker_prefix(state)).items()
            if proc_start_time(pid) is not None and not v.endswith(":router:0")}


async def _crash(node: LocalNode, nursery) -> None:
    """What a SIGKILL leaves: the instances run on, the records stay as they were."""
    await node.shutdown(keep_instances=True)
    await node.agent.prober.aclose()


async def test_a_process_started_but_never_recorded_is_adopted_not_duplicated(tmp_path):
    # Issue 18.1: the server was killed after starting an instance and before
    # recording its pid. The restart must adopt that process, not start a
    # second one beside it; an instance whose process never started is started.
    state = str(tmp_path / "state")
    async with trio.open_nursery() as n:
        l1 = await _engine(state, n)
        e1 = l1.engine
        deploy(e1, "image sleep\nargs 60\nreplicas 2\nhealth_interval 0.1\n")
        await until(lambda: len(ready(e1.services["web"])) == 2)
        running, never = e1.services["web"].by_slot()
        running_pid, never_pid = running.rec.pid, never.rec.pid
        await _crash(l1, n)
        for inst in (running, never):  # the window: saved as starting, pid not yet saved
            inst.rec.pid, inst.rec.start_time, inst.rec.state, inst.rec.health = None, None, "starting", "starting"
            e1.store.put_instance(inst.rec)
        os.kill(never_pid, signal.SIGKILL)  # as if the kill came before its Popen
        await until(lambda: proc_start_time(never_pid) is None)

        l2 = await _engine(state, n)
        e2 = l2.engine
        svc = e2.services["web"]
        await until(lambda: len(ready(svc)) == 2)
        by_id = {i.rec.id: i for i in svc.instances.values()}
        assert by_id[running.rec.id].rec.pid == running_pid  # adopted, not restarted
        assert by_id[never.rec.id].rec.pid not in (None, never_pid)  # started afresh
        text = e2.events.current("web").decode()
        assert f"adopted pid={running_pid}" in text and "gone while deployfs was down" not in text
        # Exactly one process per instance, and none that no record lists.
        assert sorted(_marked(state)) == sorted(i.rec.pid for i in svc.instances.values())
        with trio.fail_after(30):
            await l2.shutdown()
        await l2.agent.prober.aclose()


async def test_grandchildren_of_a_leader_that_died_while_deployfs_was_down_are_killed(tmp_path):
    # Issue 18.6 (adversarial F6): they outlived a restart and then `stop`.
    state = str(tmp_path / "state")
    pids = tmp_path / "pids"
    async with trio.open_nursery() as n:
        l1 = await _engine(state, n)
        e1 = l1.engine
        deploy(e1, f"image sh\nargs -c 'sleep 1011 & setsid sleep 1012 & echo $! > {pids}; exec sleep 60'\n"
                   "replicas 1\nrestart never\nhealth_interval 0.1\n")
        await until(lambda: len(ready(e1.services["web"])) == 1 and pids.exists() and pids.read_text())
        leader = e1.services["web"].by_slot()[0].rec.pid
        await _crash(l1, n)
        os.kill(leader, signal.SIGKILL)  # dies while deployfs is down
        await until(lambda: proc_start_time(leader) is None)
        left = list(_marked(state))
        assert len(left) == 2  # both grandchildren, one in its own session

        l2 = await _engine(state, n)
        e2 = l2.engine
        await until(lambda: not any(proc_start_time(p) for p in left), timeout=5)
        with trio.fail_after(30):  # right after the start: nothing may be started behind the shutdown
            await l2.shutdown()
        await l2.agent.prober.aclose()


async def test_exec_probes_leave_nothing_behind(real, real_node, tmp_path):
    # Issue 18.6 (adversarial F7): every probe leaked the child it put in the
    # background, and `stop` did not clean them.
    pids = tmp_path / "pids"
    deploy(real, f"image sleep\nargs 60\nreplicas 1\nhealth_interval 0.05\n"
                 f"health exec sh -c 'sleep 301 & setsid sleep 302 & echo $! >> {pids}; exit 0'\n")
    svc = real.services["web"]
    await until(lambda: len(ready(svc)) == 1 and pids.exists() and len(pids.read_text().split()) >= 5)
    state = real_node.agent.state_dir
    # The backgrounded child goes with its probe's group: only the leader and
    # the setsid'd ones (which carry the instance's marker) are left.
    await until(lambda: not any("sleep 301" in _cmdline(p) for p in _marked(state)), timeout=5)
    real.command("web", "stop", None, "uid=0")
    await until(lambda: not svc.instances)
    setsid_ones = [int(p) for p in pids.read_text().split()]
    await until(lambda: not _marked(state) and not any(proc_start_time(p) for p in setsid_ones), timeout=5)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def test_a_flood_of_output_is_bounded_on_disk_all_the_time(real, real_node):
    # Issue 18.4: logs were bounded every 10 s, by reading the whole file: `yes`
    # wrote gigabytes in between and the trim got the server OOM-killed.
    deploy(real, "image yes\nargs flood-line-from-yes\nreplicas 1\nlog_lines 100\nhealth_interval 0.1\n")
    svc = real.services["web"]
    await until(lambda: len(ready(svc)) == 1)
    path = real_node.runtime.log_path("web", svc.by_slot()[0].rec.id)
    biggest = 0
    t0 = trio.current_time()
    while trio.current_time() - t0 < 2:
        sizes = [os.path.getsize(p) for p in (path, path + ".1") if os.path.exists(p)]
        biggest = max(biggest, sum(sizes))
        await trio.sleep(0.01)
    print(f"\nyes for 2 s: at most {biggest / 1e6:.1f} MB of log on disk")
    assert biggest < 128e6  # the bound plus what yes writes in a few checks (it writes ~0.7 GB/s here)
    tail = real_node.runtime.read_log("web", svc.by_slot()[0].rec.id, 100).splitlines()
    # yes writes in blocks, so a truncation can fall mid-line: pieces of the line, never anything else.
    assert 50 <= len(tail) <= 100 and all(line in b"flood-line-from-yes" for line in tail)
