"""Instances as tenants, with real processes: their user, limits and cgroup.

Users are made with useradd for the module and removed after it.  Programs run as
another user must be reachable by it: /bin/sh and /usr/bin/python3, not the venv's.
"""

import os
import signal
import stat

import pytest
import trio

from deployfs.node.cgroups import Cgroups, Layout, Limits, detect
from deployfs.node.runtime import LaunchSpec, LocalRuntime, StartError, proc_start_time
from tests.users import ALICE, BOB, EXTRA, made_users, extra_gid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users and making cgroups needs root")
LAYOUT = detect()
needs = {c: pytest.mark.skipif(c not in LAYOUT.controllers, reason=f"no {c} cgroup controller here")
         for c in ("memory", "cpu", "pids")}


@pytest.fixture(scope="module")
def users():
    with made_users() as u:
        yield u


@pytest.fixture
def rt(tmp_path):
    """A runtime whose cgroups must all be gone once the test is over (the state dir's own too)."""
    yield LocalRuntime(str(tmp_path))
    key = Cgroups(str(tmp_path)).key
    assert [b for b in LAYOUT.bases if os.path.exists(os.path.join(b, "deployfs", key))] == []


def sh(script: str, id: int = 1, **kw) -> LaunchSpec:
    return LaunchSpec("web", id, ["/bin/sh", "-c", script], {}, None, 100, **kw)


def status(pid: int) -> dict[str, list[str]]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.split() for k, _, v in (line.partition(":") for line in f)}


async def until(pred, timeout=10.0):
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


async def test_runs_as_its_user_with_its_groups_and_a_log_it_cannot_touch(rt, users):
    p = rt.start(sh("echo HOME=$HOME USER=$USER; exec sleep 60", user=ALICE))
    try:
        await until(lambda: b"HOME=" in rt.read_log("web", 1, 5))
        st = status(p.pid)
        alice = users[ALICE]
        assert st["Uid"] == [str(alice.pw_uid)] * 4 and st["Gid"] == [str(alice.pw_gid)] * 4
        assert sorted(map(int, st["Groups"])) == sorted({alice.pw_gid, extra_gid()})
        assert rt.read_log("web", 1, 5) == f"HOME={alice.pw_dir} USER={ALICE}\n".encode()
        log = os.stat(rt.log_path("web", 1))  # deployfs's: the instance writes only through its descriptor
        assert log.st_uid == os.geteuid() and stat.S_IMODE(log.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(rt.log_path("web", 1))).st_mode) & 0o077 == 0
    finally:
        await p.stop(signal.SIGTERM, 5)


async def test_group_replaces_the_primary_group_only(rt, users):
    # As systemd's Group= does (initgroups with that group): the user's own group is gone,
    # its memberships by /etc/group (EXTRA) stay.
    bob_gid = users[BOB].pw_gid
    p = rt.start(sh("exec sleep 60", user=ALICE, group=str(bob_gid)))
    try:
        st = status(p.pid)
        assert st["Gid"] == [str(bob_gid)] * 4
        assert sorted(map(int, st["Groups"])) == sorted({bob_gid, extra_gid()})
    finally:
        await p.stop(signal.SIGTERM, 5)


async def test_an_unknown_user_fails_the_start(rt):
    with pytest.raises(StartError, match="no user 'dfst_nobody_here' on this host"):
        rt.start(sh("true", user="dfst_nobody_here"))


@needs["memory"]
@needs["cpu"]
@needs["pids"]
async def test_limits_in_proc_and_in_the_cgroup_files(rt):
    p = rt.start(sh("exec sleep 60", limits=Limits(memory=64 << 20, cpus=0.5, pids=20), nofile=321))
    try:
        with open(f"/proc/{p.pid}/limits") as f:
            assert [line.split()[3:5] for line in f if line.startswith("Max open files")] == [["321", "321"]]
        assert p.cgroup is not None
        mem, cpu, pids = (p.cgroup.dir_for(c) for c in ("memory", "cpu", "pids"))
        assert all(d and d.endswith("/web@1") for d in (mem, cpu, pids))
        v2 = {c: LAYOUT.controllers[c][1] == 2 for c in ("memory", "cpu", "pids")}
        read = lambda d, name: open(os.path.join(d, name)).read().strip()  # noqa: E731
        assert read(mem, "memory.max" if v2["memory"] else "memory.limit_in_bytes") == str(64 << 20)
        assert (read(cpu, "cpu.max") == "50000 100000") if v2["cpu"] else (read(cpu, "cpu.cfs_quota_us") == "50000")
        assert read(pids, "pids.max") == "20"
        for d in p.cgroup.paths.values():
            assert read(d, "cgroup.procs").split() == [str(p.pid)]
    finally:
        await p.stop(signal.SIGTERM, 5)
    assert not any(os.path.exists(d) for d in p.cgroup.paths.values())  # removed with the instance


FORKS = """
import os, time
ok = failed = 0
for _ in range(8):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        ok += 1
    except BlockingIOError:  # EAGAIN: the pids limit
        failed += 1
print(ok, failed, flush=True)
time.sleep(60)
"""


@needs["pids"]
async def test_pids_limit_holds(rt):
    p = rt.start(LaunchSpec("web", 1, ["/usr/bin/python3", "-c", FORKS], {}, None, 100, limits=Limits(pids=4)))
    try:
        await until(lambda: rt.read_log("web", 1, 5).strip() != b"")
        assert rt.read_log("web", 1, 5) == b"3 5\n"  # the leader and 3 children
    finally:
        await p.stop(signal.SIGTERM, 5)


async def test_a_setsid_grandchild_that_cleared_its_environment_is_stopped(rt):
    """It left the group (killpg misses it) and dropped the marker (the sweep misses it): only the cgroup knows."""
    p = rt.start(sh("setsid env -i /bin/sh -c 'echo $$; exec sleep 300' & exec sleep 300"))
    await until(lambda: rt.read_log("web", 1, 5).strip().isdigit())
    grandchild = int(rt.read_log("web", 1, 5))
    assert os.getsid(grandchild) == grandchild and b"DEPLOYFS" not in open(f"/proc/{grandchild}/environ", "rb").read()
    await p.stop(signal.SIGTERM, 5)
    await until(lambda: proc_start_time(grandchild) is None, timeout=5)


async def test_an_adopted_instance_is_stopped_through_its_cgroup(rt, tmp_path):
    """A server restarted after a crash finds the cgroup by the instance's name."""
    first = rt
    p = first.start(sh("setsid env -i /bin/sh -c 'echo $$; exec sleep 300' & exec sleep 300", id=7))
    await until(lambda: first.read_log("web", 7, 5).strip().isdigit())
    grandchild = int(first.read_log("web", 7, 5))
    adopted = LocalRuntime(str(tmp_path)).adopt(p.pid, p.start_time, "web", 7)
    assert adopted is not None and adopted.cgroup is not None
    await adopted.stop(signal.SIGTERM, 5)
    await until(lambda: proc_start_time(grandchild) is None, timeout=5)
    p._reap()  # our own child: let Popen reap it


async def test_a_limit_the_host_cannot_apply_fails_the_start_and_nothing_runs(tmp_path):
    rt = LocalRuntime(str(tmp_path), cgroups=Cgroups(str(tmp_path), Layout({}, None)))
    with pytest.raises(StartError, match=r"^memory 64M cannot be applied: this host has no memory cgroup controller"):
        rt.start(sh("exec sleep 60", limits=Limits(memory=64 << 20)))
    # Without a limit asked for it runs, with no cgroup (the marker sweep still stops it).
    p = rt.start(sh("exec sleep 60"))
    assert p.cgroup is None
    await p.stop(signal.SIGTERM, 5)


@needs["memory"]
async def test_an_oom_kill_is_counted(rt):
    p = rt.start(LaunchSpec("web", 1, ["/usr/bin/python3", "-c", "x = [bytearray(1 << 20) for _ in range(200)]"],
                            {}, None, 100, limits=Limits(memory=32 << 20)))
    with trio.fail_after(20):
        status = await p.wait()
    assert status == 128 + signal.SIGKILL and p.oom_kills >= 1
    await p.stop(signal.SIGTERM, 1)


async def test_an_instance_that_exits_alone_leaves_no_cgroup(rt):
    p = rt.start(sh("exit 3"))
    with trio.fail_after(10):
        assert await p.wait() == 3
    assert p.cgroup is not None and not any(os.path.exists(d) for d in p.cgroup.paths.values())


def test_the_runtime_names_the_directive_a_host_cannot_apply(tmp_path):
    rt = LocalRuntime(str(tmp_path), cgroups=Cgroups(str(tmp_path), Layout({}, None)))
    assert rt.limit_problem(Limits()) is None
    directive, reason = rt.limit_problem(Limits(cpus=0.5))
    assert directive == "cpus" and reason.startswith("cpus 0.5 cannot be applied: this host has no cpu cgroup controller")


def test_nofile_above_the_kernels_nr_open_is_a_limit_problem_even_for_root(tmp_path):
    rt = LocalRuntime(str(tmp_path), cgroups=Cgroups(str(tmp_path), Layout({}, None)))
    with open("/proc/sys/fs/nr_open") as f:
        nr_open = int(f.read())
    assert rt.limit_problem(Limits(), nofile=64) is None
    assert rt.limit_problem(Limits(), nofile=nr_open + 1) == (
        "nofile", f"nofile {nr_open + 1} cannot be applied: above this host's fs.nr_open {nr_open}")
    with pytest.raises(StartError, match="fs.nr_open"):
        rt.start(sh("exit 0", nofile=nr_open + 1))
