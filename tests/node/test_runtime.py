import os
import signal
import sys
import time

import pytest
import trio

from deployfs.node.runtime import (
    LaunchSpec, LocalRuntime, StartError, find_strays, marked_processes, marker_prefix, proc_start_time,
)

SERVICE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "web.py")


def spec(*args, id=1, cwd=None):
    return LaunchSpec("web", id, [sys.executable, SERVICE, *args], {"VERSION": "v1", "PORT": "0"}, cwd, 100)


def alive(pid):
    return proc_start_time(pid) is not None


async def test_start_records_identity_and_captures_output(tmp_path):
    rt = LocalRuntime(str(tmp_path))
    p = rt.start(spec())
    assert p.start_time == proc_start_time(p.pid) and os.getpgid(p.pid) == p.pid  # own group
    assert os.getsid(p.pid) == p.pid  # own session
    with trio.fail_after(10):
        while b"starting" not in rt.read_log("web", 1, 10):
            await trio.sleep(0.02)
    assert await p.stop(signal.SIGTERM, 5) is False  # exited on SIGTERM: not killed
    assert p.exited and p.exit_status == 0 and not alive(p.pid)


async def test_a_signal_death_is_told_from_an_exit_status(tmp_path):
    # 137 is both exit(137) and SIGKILL's 128 + 9: only the wait status tells them apart
    rt = LocalRuntime(str(tmp_path))
    killed = rt.start(LaunchSpec("web", 1, ["sleep", "30"], {}, None, 10))
    exited = rt.start(LaunchSpec("web", 2, ["sh", "-c", "exit 137"], {}, None, 10))
    os.kill(killed.pid, signal.SIGKILL)
    with trio.fail_after(10):
        assert await killed.wait() == 137 and await exited.wait() == 137
    assert killed.killed_by == signal.SIGKILL and exited.killed_by is None


async def test_missing_image_is_a_start_error(tmp_path):
    with pytest.raises(StartError, match="No such file"):
        LocalRuntime(str(tmp_path)).start(LaunchSpec("web", 1, ["/nonexistent/x"], {}, None, 10))


@pytest.mark.parametrize("cwd, reason", [("/nonexistent/dir", "No such file or directory"),
                                         ("/dev/null", "Not a directory")])
async def test_a_bad_dir_is_blamed_not_the_image(tmp_path, cwd, reason):
    with pytest.raises(StartError) as e:
        LocalRuntime(str(tmp_path)).start(LaunchSpec("web", 1, ["/bin/pwd"], {}, cwd, 10))
    assert str(e.value) == f"cannot start /bin/pwd: working directory (dir) {cwd}: {reason}"


async def test_exit_seen_through_pidfd(tmp_path):
    rt = LocalRuntime(str(tmp_path))
    p = rt.start(spec("--exit-at-start", "7"))
    with trio.fail_after(10):
        assert await p.wait() == 7


async def test_ignored_term_is_killed_at_stop_timeout_with_grandchildren(tmp_path):
    rt = LocalRuntime(str(tmp_path))
    p = rt.start(spec("--ignore-term", "--spawn-child"))
    with trio.fail_after(10):
        while b"starting" not in rt.read_log("web", 1, 10):
            await trio.sleep(0.02)
    await trio.sleep(0.2)
    kids = [int(t) for t in os.listdir("/proc") if t.isdigit() and _pgid(int(t)) == p.pid and int(t) != p.pid]
    assert kids, "the service should have left a grandchild"
    t0 = time.monotonic()
    assert await p.stop(signal.SIGTERM, 0.5) is True  # had to be killed
    assert 0.4 < time.monotonic() - t0 < 5
    await trio.sleep(0.1)
    assert not any(alive(k) for k in kids) and not alive(p.pid)


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


async def test_adopt_checks_start_time(tmp_path):
    rt = LocalRuntime(str(tmp_path))
    p = rt.start(spec())
    assert rt.adopt(p.pid, p.start_time + 1, "web", 1) is None  # a reused pid is never adopted
    q = rt.adopt(p.pid, p.start_time, "web", 1)
    assert q is not None and q.pid == p.pid
    assert find_strays(str(tmp_path), {("web", 1)}) == []
    # Popen returns once exec has begun; the kernel shows the new environment
    # (the marker) a moment later.
    with trio.fail_after(5):
        while find_strays(str(tmp_path), set()) != [p.pid]:
            await trio.sleep(0.01)
    await q.stop(signal.SIGTERM, 5)
    assert q.exited and q.exit_status is None  # not our child: status unknown
    with trio.fail_after(5):
        await p.wait()


def test_ports_are_private_and_free(tmp_path):
    import socket
    # Below the kernel's ephemeral range: an outgoing connection elsewhere on the
    # host must not take one of these ports in the middle of the test.
    rt = LocalRuntime(str(tmp_path), ports=(23990, 23993))
    s = socket.socket()
    s.bind(("127.0.0.1", 23990))
    try:
        got = [rt.allocate_port() for _ in range(3)]
        assert got == [23991, 23992, 23993]
        with pytest.raises(StartError, match="no free port"):
            rt.allocate_port()
        rt.release_port(23992)
        assert rt.allocate_port() == 23992
    finally:
        s.close()


def test_logs_are_bounded(tmp_path):
    rt = LocalRuntime(str(tmp_path))
    path = rt.log_path("web", 1)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"".join(b"line %d\n" % i for i in range(50000)))  # past the 64 KiB bound
    assert rt.trim_log("web", 1, 100) is True
    assert os.path.getsize(path) == 0
    with open(path, "ab") as f:
        f.write(b"fresh\n")
    tail = rt.read_log("web", 1, 100).splitlines()
    assert len(tail) == 100 and tail[-1] == b"fresh" and tail[-2] == b"line 49999"


async def test_stop_returns_at_once_when_the_monitor_was_just_cancelled(tmp_path):
    # Issue 14.6: the engine cancels the monitor (which sits in wait()) and stops
    # the process in the same breath; the process exits on the signal at once,
    # so the stop must return at once, not after stop_timeout.
    rt = LocalRuntime(str(tmp_path))
    p = rt.start(LaunchSpec("web", 1, ["sleep", "60"], {}, None, 10))
    async with trio.open_nursery() as n:
        watcher = trio.CancelScope()

        async def monitor():
            with watcher:
                await p.wait()
        n.start_soon(monitor)
        await trio.sleep(0.1)
        watcher.cancel()  # no checkpoint between this and the stop, as in Service._restart
        t0 = time.monotonic()
        with trio.fail_after(5):
            assert await p.stop(signal.SIGTERM, 10) is False
        assert time.monotonic() - t0 < 1
    assert p.exited and p.exit_status == 128 + signal.SIGTERM and not alive(p.pid)


async def gone(pids, timeout=5.0):
    """SIGKILL is delivered asynchronously: poll until every pid is gone (or a zombie)."""
    with trio.move_on_after(timeout):
        while any(alive(pid) for pid in pids):
            await trio.sleep(0.01)
    return not any(alive(pid) for pid in pids)


async def _pids_in(path, n):
    with trio.fail_after(10):
        while not (os.path.exists(path) and len(open(path).read().split()) >= n):
            await trio.sleep(0.02)
    return [int(x) for x in open(path).read().split()]


async def test_stop_kills_a_grandchild_that_left_the_group(tmp_path):
    # Issue 18.6: a setsid'd grandchild escapes the group kill; it still carries the marker.
    rt = LocalRuntime(str(tmp_path))
    pids = tmp_path / "pids"
    p = rt.start(LaunchSpec("web", 1, ["sh", "-c", f"setsid sleep 61 & echo $! > {pids}; exec sleep 60"], {}, None, 10))
    [grandchild] = await _pids_in(pids, 1)
    with trio.fail_after(5):
        while os.getsid(grandchild) != grandchild:  # it leaves the session just after the echo
            await trio.sleep(0.01)
    with trio.fail_after(10):
        await p.stop(signal.SIGTERM, 5)
    assert await gone([grandchild])


async def test_find_unrecorded_adopts_the_leader_not_its_setsid_child(tmp_path):
    # Issue 18.1: a process started but never recorded is found by its marker.
    rt = LocalRuntime(str(tmp_path))
    pids = tmp_path / "pids"
    p = rt.start(LaunchSpec("web", 7, ["sh", "-c", f"setsid sleep 61 & echo $! > {pids}; exec sleep 60"], {}, None, 10))
    await _pids_in(pids, 1)
    found = rt.find_unrecorded({("web", 7), ("web", 8)})
    assert list(found) == [("web", 7)]
    q = found[("web", 7)]
    assert (q.pid, q.start_time) == (p.pid, p.start_time)
    with trio.fail_after(10):
        await q.stop(signal.SIGTERM, 5)
    assert await gone(marked_processes(marker_prefix(str(tmp_path))))
    with trio.fail_after(5):
        await p.wait()


async def test_sweep_kills_what_a_dead_leader_left(tmp_path):
    rt = LocalRuntime(str(tmp_path))
    pids = tmp_path / "pids"
    p = rt.start(LaunchSpec("web", 3, ["sh", "-c", f"sleep 61 & setsid sleep 62 & echo $! > {pids}; exit 0"],
                            {}, None, 10))
    with trio.fail_after(5):
        await p.wait()
    with trio.fail_after(5):  # both sleeps outlived their leader (each visible once it has exec'd)
        while len(left := marked_processes(marker_prefix(str(tmp_path)))) != 2:
            await trio.sleep(0.01)
    other = rt.start(LaunchSpec("web", 4, ["sleep", "60"], {}, None, 10))
    with trio.fail_after(10):
        await rt.sweep([("web", 3)])
    assert await gone(left)
    assert alive(other.pid)  # another instance's process is never touched
    await other.stop(signal.SIGTERM, 5)


def runtime_with_big_log(tmp_path, chunks: int) -> tuple[LocalRuntime, str]:
    """A runtime whose instance web/1 wrote ~100 KB a chunk: "chunk C line L" lines."""
    rt = LocalRuntime(str(tmp_path))
    path = rt.log_path("web", 1)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        for i in range(chunks):
            f.write(b"".join(b"chunk %d line %d\n" % (i, j) for j in range(5000)))
    return rt, path


def test_bounding_a_huge_log_reads_only_its_tail(tmp_path):
    # Issue 18.4: the trim read the whole file into memory (4 GB for `yes`).
    import tracemalloc
    rt, path = runtime_with_big_log(tmp_path, chunks=400)  # ~40 MB
    tracemalloc.start()
    try:
        assert rt.trim_log("web", 1, 100) is True
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak  # the tail (twice the bound at most), not the 40 MB
    assert os.path.getsize(path) == 0
    kept = open(path + ".1", "rb").read().splitlines()
    assert len(kept) == 100 and kept[-1] == b"chunk 399 line 4999"
    assert rt.trim_log("web", 1, 100) is False  # under its bound: nothing to do


async def test_bounding_a_flooded_log_does_not_hold_the_loop(tmp_path):
    # A trim reads up to twice the bound (32 MiB with a large log_lines): in a worker thread,
    # so FUSE requests, probes and the router feeder go on meanwhile.
    rt, path = runtime_with_big_log(tmp_path, chunks=700)  # ~70 MB
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0)
            ticks += 1

    async with trio.open_nursery() as n:
        n.start_soon(tick)
        await trio.sleep(0)
        assert await rt.bound_log("web", 1, 65536) is True
        n.cancel_scope.cancel()
    assert ticks > 10, ticks  # the loop ran while the copy did
    assert os.path.getsize(path) == 0 and await rt.bound_log("web", 1, 65536) is False


def test_two_servers_on_one_host_never_give_out_the_same_port(tmp_path):
    # The second server sees the port free (nothing listens yet) but another server gave it out
    from deployfs.node.portlocks import PortLocks

    locks = str(tmp_path / "locks")
    one = LocalRuntime(str(tmp_path / "a"), ports=(20890, 20892), port_locks=PortLocks(locks))
    two = LocalRuntime(str(tmp_path / "b"), ports=(20890, 20892), port_locks=PortLocks(locks))
    assert one.allocate_port() == 20890
    assert two.allocate_port() == 20891
    one.release_port(20890)
    assert [two.allocate_port(), two.allocate_port()] == [20892, 20890]  # given back: free for the other
    with pytest.raises(StartError, match="no free port"):
        one.allocate_port()  # all three are the other server's
