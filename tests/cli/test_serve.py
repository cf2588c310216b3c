"""`deployfs serve` refuses what it cannot use with one clear line, and exits 2."""

import os
import re
import sqlite3
import subprocess
import sys

SERVE = [sys.executable, "-m", "deployfs", "serve"]


def serve(*args, timeout=20):
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=timeout)


def test_missing_and_non_empty_mountpoints(tmp_path):
    r = serve(str(tmp_path / "nope"), "--state", str(tmp_path / "s"))
    assert r.returncode == 2 and f"mountpoint {tmp_path / 'nope'} does not exist: create it with" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = serve(str(tmp_path / "full"), "--state", str(tmp_path / "s"))
    assert r.returncode == 2 and "is not empty" in r.stderr


def test_already_mounted(tmp_path):
    from tests import mount as _mount
    m = _mount.start(str(tmp_path))
    try:
        r = serve(m.path, "--state", str(tmp_path / "other"))
        assert r.returncode == 2 and "is already mounted" in r.stderr
    finally:
        _mount.stop(m)


def test_state_from_a_newer_deployfs(tmp_path):
    (tmp_path / "mnt").mkdir()
    (tmp_path / "s").mkdir()
    db = sqlite3.connect(tmp_path / "s" / "deployfs.db")
    db.execute("PRAGMA user_version = 99")
    db.close()
    r = serve(str(tmp_path / "mnt"), "--state", str(tmp_path / "s"))
    assert r.returncode == 2 and "written by a newer deployfs" in r.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_version():
    r = subprocess.run([sys.executable, "-m", "deployfs", "--version"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and r.stdout.startswith("deployfs 0.")


SLEEPY = "image /bin/sleep\nargs infinity\nreplicas 2\nhealth_interval 0.2\n"


def pid_of(m, slot):
    pid = m.read(f"active/sleepy/instances/{slot}").split("pid=")[1].split()[0]
    return None if pid == "-" else int(pid)  # `-` between an exit and the restart


def test_a_full_state_disk(tmp_path):
    """Issue 18.5 on a real 2 MiB tmpfs: refuse with ENOSPC, keep supervising, start degraded, lose nothing."""
    from tests import mount as _mount
    from tests.disk import fill, free, small_disk
    with small_disk(str(tmp_path / "disk")) as disk:
        state = os.path.join(disk, "state")
        m = _mount.start(str(tmp_path), state=state)
        try:
            m.write_manifest("sleepy", SLEEPY)
            assert m.ctl("apply sleepy").returncode == 0
            assert m.read("active/sleepy/wait").startswith("done")
            fill(disk)
            r = m.ctl("scale 3", "sleepy")
            assert r.returncode != 0 and "No space left on device" in r.stderr
            reply = m.sh("exec 3<>active/sleepy/ctl; echo 'scale 3' >&3; cat <&3").stdout
            assert reply.startswith("error: the state disk is full") and "nothing was changed" in reply
            r = m.sh("echo 'image /bin/true' > manifests/other")
            assert r.returncode != 0 and "No space left on device" in r.stderr
            assert m.read("active/sleepy/replicas") == "2\n"
            for events in ("active/sleepy/events", "events"):  # the service's and /deploy/events
                m.until(lambda: "supervision goes on" in m.read(events), what=f"the full-disk event in {events}")

            pids = [pid_of(m, 0), pid_of(m, 1)]
            _mount.kill9(m)  # a crash on the full disk: the next start must still work
            m = _mount.start(str(tmp_path), state=state)
            assert "starting in degraded mode: the state disk is full" in m.server_log()
            m.until(lambda: "supervision goes on" in m.read("active/sleepy/events"), what="the event after a restart")
            assert [pid_of(m, 0), pid_of(m, 1)] == pids  # adopted

            os.kill(pids[0], 9)  # supervision goes on: the instance is restarted, its record kept in memory
            m.until(lambda: pid_of(m, 0) != pids[0] and "state=running" in m.read("active/sleepy/instances/0"),
                    what="instance 0 restarted on the full disk")
            new_pid = pid_of(m, 0)
            assert m.proc.poll() is None

            free(disk)
            m.until(lambda: "the state disk has room again" in m.read("active/sleepy/events"), what="room again")
            _mount.kill9(m)  # what was kept in memory is in SQLite now: a crash loses none of it
            m = _mount.start(str(tmp_path), state=state)
            assert "degraded" not in m.server_log()
            assert [pid_of(m, 0), pid_of(m, 1)] == [new_pid, pids[1]]
            events = m.read("active/sleepy/events")
            # (what the first server kept in memory died with it: it was killed while the disk was full)
            for line in ("deployed", "the state disk is full", "instance 0 exited", "has room again"):
                assert line in events, f"{line!r} missing:\n{events}"
            assert m.ctl("scale 3", "sleepy").returncode == 0
            assert m.read("active/sleepy/wait").startswith("done")
            assert m.read("active/sleepy/replicas") == "3\n"
        finally:
            _mount.stop(m)


def test_a_crash_on_a_full_disk_leaves_no_orphan(tmp_path):
    """An instance restarted on a full disk has its record in memory only; after a crash, its
    process must not live on beside the one started again for the same instance."""
    from deployfs.node.runtime import marked_processes, marker_prefix, proc_start_time
    from tests import mount as _mount
    from tests.disk import fill, small_disk
    with small_disk(str(tmp_path / "disk")) as disk:
        state = os.path.join(disk, "state")
        m = _mount.start(str(tmp_path), state=state)
        try:
            m.write_manifest("sleepy", SLEEPY)
            assert m.ctl("apply sleepy").returncode == 0
            assert m.read("active/sleepy/wait").startswith("done")
            fill(disk)
            old = pid_of(m, 0)
            os.kill(old, 9)
            m.until(lambda: pid_of(m, 0) != old and "state=running" in m.read("active/sleepy/instances/0"),
                    what="instance 0 restarted on the full disk")
            unrecorded = pid_of(m, 0)
            _mount.kill9(m)
            m = _mount.start(str(tmp_path), state=state)

            def instances():
                return sorted(v for v in marked_processes(marker_prefix(state)).values() if ":router:" not in v)
            m.until(lambda: all(proc_start_time(pid_of(m, slot)) for slot in (0, 1)), what="two instances again")
            assert len(instances()) == len(set(instances())) == 2, instances()  # one process per instance id
            assert proc_start_time(unrecorded) is None or pid_of(m, 0) == unrecorded  # (gone, or a zombie)
        finally:
            _mount.stop(m)


# -- the state directory: private, and trusted only if nobody else wrote it (18.8, 18.9) --------

def plant_state(state, manifest: str) -> None:
    """A state dir holding a deployed service, as a previous deployfs (or someone else) left it."""
    from deployfs.state.store import ServiceRecord, SqliteStore
    s = SqliteStore(str(state))
    s.put_service(ServiceRecord("innocent", version="0123456789ab", manifest=manifest, replicas=1))
    s.close()


def test_a_state_dir_another_user_wrote_is_refused(public_tmp):
    pwned = public_tmp / "pwned"
    state = public_tmp / "shared" / "state"
    plant_state(state, f'image /bin/sh\nargs -c "id > {pwned}; exec sleep infinity"\nreplicas 1\n')
    (public_tmp / "shared").chmod(0o1777)  # a shared, sticky directory, as /tmp: nobody made the state dir
    subprocess.run(["chown", "-R", "nobody:nogroup", str(state)], check=True)
    (public_tmp / "mnt").mkdir()
    r = serve(str(public_tmp / "mnt"), "--state", str(state))
    assert r.returncode == 2, r.stderr
    assert f"deployfs: {state} belongs to nobody, not to root who runs deployfs" in r.stderr
    assert not pwned.exists() and not os.path.ismount(public_tmp / "mnt")


def test_planted_symlinks_are_refused_and_never_followed(tmp_path):
    state = tmp_path / "state"
    plant_state(state, "image /bin/sleep\nargs infinity\n")
    victims = []
    for name in ("router.pid", "router.log", "logs/innocent/1.log"):
        victim = tmp_path / f"victim-{len(victims)}"
        victim.write_text("IMPORTANT\n")
        (state / name).parent.mkdir(parents=True, exist_ok=True)
        (state / name).symlink_to(victim)
        victims.append(victim)
        (tmp_path / "mnt").mkdir(exist_ok=True)
        r = serve(str(tmp_path / "mnt"), "--state", str(state))
        assert r.returncode == 2 and f"{state / name} is a symbolic link" in r.stderr, r.stderr
        (state / name).unlink()
    assert all(v.read_text() == "IMPORTANT\n" for v in victims)


def test_the_state_dir_is_private(tmp_path, public_tmp):
    from tests import mount as _mount
    from tests.conftest import as_nobody
    state = public_tmp / "state"  # reachable by nobody, so only the modes keep them out
    plant_state(state, "image /bin/true\n")  # as an older deployfs left it: 0755 and 0644
    for dirpath, dirs, files in os.walk(state):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    m = _mount.start(str(tmp_path), state=str(state))
    try:
        assert "entries other users could read are now owner-only" in m.server_log()
        m.write_manifest("secret", "image /bin/sh\nargs -c 'echo token=hunter2; exec sleep infinity'\n"
                                   "env DB_PASSWORD=hunter2\nhealth_interval 0.2\n")
        assert m.ctl("apply secret").returncode == 0
        assert m.read("active/secret/wait").startswith("done")
        m.until(lambda: "token=hunter2" in m.read("active/secret/logs/0"), what="the instance's output")
        modes = {}
        for dirpath, dirs, files in os.walk(state):
            modes[dirpath] = os.stat(dirpath).st_mode & 0o777
            for f in files:
                modes[os.path.join(dirpath, f)] = os.stat(os.path.join(dirpath, f)).st_mode & 0o777
        loose = {p: oct(mode) for p, mode in modes.items() if mode & 0o077}
        assert loose == {}, loose
        assert {os.path.relpath(p, state) for p in modes} >= {
            "deployfs.db", "deployfs.db-wal", "logs/secret", "router.log", "router.pid"}
        r = as_nobody("sh", "-c", f"cat {state}/logs/secret/*.log; cat {state}/deployfs.db-wal", check=False)
        assert r.returncode != 0 and "hunter2" not in r.stdout and "Permission denied" in r.stderr
    finally:
        _mount.stop(m)


def test_bad_ports_are_refused_by_the_parser():
    for bad, why in (("abc", "wants LOW-HIGH, got 'abc'"), ("30000-20000", "wants LOW-HIGH with 1 <= LOW <= HIGH <= 65535")):
        r = serve("/nonexistent", "--state", "/nonexistent", "--ports", bad)
        assert r.returncode == 2 and f"argument --ports: {why}" in r.stderr, r.stderr


def test_an_error_from_inside_serve_is_not_blamed_on_ports(monkeypatch, tmp_path):
    # a regression: a ManifestError (a ValueError) escaping serve was printed as "--ports wants LOW-HIGH"
    import pytest

    from deployfs.cli import serve as serve_cli
    from deployfs.model.manifest import ManifestError

    def boom(*args):
        raise ManifestError("manifests/web", 1, "no image")
    monkeypatch.setattr(serve_cli.trio, "run", boom)
    monkeypatch.setattr(serve_cli, "check_mountpoint", lambda mnt: None)
    with pytest.raises(ManifestError, match="no image"):
        serve_cli.main(["serve", str(tmp_path / "mnt"), "--state", str(tmp_path / "state")])


def test_a_second_server_on_the_same_state_is_refused(tmp_path):
    """Two servers on one state dir adopted each other's router and instances; the second must refuse at once."""
    from tests import mount as _mount
    m = _mount.start(str(tmp_path), "--9p", "tcp!127.0.0.1!20510")
    try:
        m.write_manifest("sleepy", SLEEPY)
        assert m.ctl("apply sleepy").returncode == 0
        assert m.read("active/sleepy/wait").startswith("done")
        before = m.read("active/sleepy/instances/0")
        r = serve("--no-mount", "--state", m.state, "--9p", "tcp!127.0.0.1!20511")
        assert r.returncode == 2, r.stderr
        assert f"is in use by pid {m.proc.pid} (another deployfs serve)" in r.stderr, r.stderr
        assert m.proc.poll() is None and m.read("active/sleepy/instances/0") == before
    finally:
        _mount.stop(m)
    # the lock goes with its holder, also with a killed one
    m = _mount.start(str(tmp_path))
    _mount.kill9(m)
    _mount.stop(_mount.start(str(tmp_path)))


def test_a_refused_start_creates_no_database(tmp_path):
    from deployfs.state.statedir import lock, prepare
    state = prepare(str(tmp_path / "s"))
    fd = lock(state)  # as a running server holds it
    try:
        (tmp_path / "mnt").mkdir()
        r = serve(str(tmp_path / "mnt"), "--state", state)
        assert r.returncode == 2 and f"is in use by pid {os.getpid()}" in r.stderr, r.stderr
        assert os.listdir(state) == ["serve.lock"] and not os.path.ismount(tmp_path / "mnt")
    finally:
        os.close(fd)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_make_run_after_a_kill_9_cleans_the_dead_mount(tmp_path):
    """`mkdir -p ./deploy` failed on the dead mount (ENOTCONN): make run must start again."""
    import errno
    import signal
    import time
    import urllib.request

    import pytest

    from tests import mount as _mount
    mnt, state = str(tmp_path / "deploy"), str(tmp_path / "state")

    def make_run() -> subprocess.Popen:
        # -o: never reinstall the venv from a test; ARGS: options passed through to deployfs serve
        argv = ["make", "-s", "-C", REPO, "-o", ".venv/.installed", "run", f"MOUNT={mnt}", f"STATE={state}",
                "ARGS=--metrics 127.0.0.1:20530 --idle-timeout 60"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(mnt, "ctl")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"make run did not mount: {proc.communicate(timeout=5)[0]}")
            time.sleep(0.02)
        return proc

    def server_pid() -> int:
        with open(os.path.join(state, "serve.lock")) as f:
            return int(f.read())

    proc = make_run()
    try:
        os.kill(server_pid(), signal.SIGKILL)  # the server, not make
        proc.wait(timeout=20)
        with pytest.raises(OSError) as dead:  # at once: the root's attributes are never cached
            os.stat(mnt)
        assert dead.value.errno == errno.ENOTCONN
        assert subprocess.run(["mkdir", "-p", mnt], capture_output=True).returncode != 0  # what make run did
        proc = make_run()
        with urllib.request.urlopen("http://127.0.0.1:20530/metrics", timeout=5) as r:
            assert b"deployfs_router_up" in r.read()
        with open("/proc/self/mounts") as f:  # fsname: which state it serves, not a path under cwd
            assert [line.split()[0] for line in f if line.split()[1] == mnt] == [f"deployfs:{os.path.realpath(state)}"]
        os.kill(server_pid(), signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        assert "cleaning up the dead mount" in out and f"unmounted {mnt}" in out, out
        assert not os.path.ismount(mnt)
    finally:
        if proc.poll() is None:
            os.kill(server_pid(), signal.SIGTERM)
            proc.wait(timeout=60)
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False, capture_output=True)
        _mount.reap(state)


def test_metrics_addresses():
    import argparse

    import pytest

    from deployfs.cli.serve import _address, _url_host
    assert _address("[::1]:9465") == ("::1", 9465) and _url_host("::1") == "[::1]"
    assert _address("127.0.0.1:9465") == ("127.0.0.1", 9465) and _url_host("127.0.0.1") == "127.0.0.1"
    for bad, why in (("::1:9465", "an IPv6 HOST in brackets"), ("127.0.0.1:9465:1", "an IPv6 HOST in brackets"),
                     (":9465", "127.0.0.1:9465 (this host only) or 0.0.0.0:9465"), ("9465", "wants HOST:PORT")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(why)):
            _address(bad)
