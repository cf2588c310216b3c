"""Who may run what as whom, through a real mount: the default user, a non-root
deployer (a member of --group by a supplementary group given at run time) refused root and
other users, allowed itself and --allow-users."""

import os
import subprocess
import tempfile

import pytest

from deployfs.node.cgroups import detect
from tests import mount as _mount
from tests.users import ALICE, BOB, EXTRA, extra_gid, made_users

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="useradd and switching users need root")


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Uid:")).split()[1])


def test_who_may_run_what_as_whom(tmp_path):
    mnt = tempfile.mkdtemp(prefix="deployfs-tenants-")
    os.chmod(mnt, 0o755)  # pytest's temp root is 0700: BOB must reach the mount
    with made_users() as users:
        m = _mount.start(str(tmp_path), "--allow-other", "--group", EXTRA, "--default-user", BOB,
                         "--allow-users", ALICE, mnt=mnt)
        try:
            # Root deploys a manifest that names no user: it runs as --default-user.
            m.write_manifest("plain", "image /bin/sleep\nargs 300\n")
            assert m.ctl("apply plain").returncode == 0
            m.until(lambda: "pid=-" not in m.read("active/plain/instances/0"), what="plain running")
            pid = int(m.read("active/plain/instances/0").split("pid=")[1].split()[0])
            assert uid_of(pid) == users[BOB].pw_uid

            def as_bob(cmd: str) -> subprocess.CompletedProcess:
                # BOB is in EXTRA (--group) only by the groups setpriv gives him, not by /etc/group.
                return subprocess.run(["setpriv", f"--reuid={BOB}", f"--regid={BOB}", f"--groups={extra_gid()}",
                                       "bash", "-c", cmd], capture_output=True, text=True, timeout=15, cwd=mnt)

            def bob_applies(name: str, text: str) -> subprocess.CompletedProcess:
                w = as_bob(f"printf '%s' '{text}' > manifests/{name}")
                assert w.returncode == 0, w.stderr
                return as_bob(f"echo 'apply {name}' > ctl")

            bob = users[BOB].pw_uid
            for name, text, reason in [
                ("asroot", "image /bin/sleep\nargs 300\nuser root\n", "user root: the instance would run as root"),
                ("asuid0", "image /bin/sleep\nargs 300\nuser 0\n", "user 0: the instance would run as root"),
                ("asother", "image /bin/sleep\nargs 300\nuser nobody\n",
                 f"user nobody: uid={bob} may run instances only as itself or as one of --allow-users ({ALICE})"),
                ("byroot", "image /bin/sleep\nargs 300\ngroup root\n", f"group root: {BOB} is not a member"),
            ]:
                r = bob_applies(name, text)
                assert r.returncode == 1 and "Permission denied" in r.stderr, (name, r.stderr)
                assert f"command refused (uid={bob}): {reason}" in m.read("events")
                assert not os.path.exists(m.p("active", name))  # nothing runs

            # As himself, and as a user --allow-users names: accepted.
            for name, user in (("self", BOB), ("allowed", ALICE)):
                assert bob_applies(name, f"image /bin/sleep\nargs 300\nuser {user}\n").returncode == 0
                m.until(lambda: os.path.exists(m.p("active", name, "instances", "0"))
                        and "pid=-" not in m.read(f"active/{name}/instances/0"), what=f"{name} running")
                pid = int(m.read(f"active/{name}/instances/0").split("pid=")[1].split()[0])
                assert uid_of(pid) == users[user].pw_uid
        finally:
            _mount.stop(m)
            os.rmdir(mnt)


def pids_of(m, name: str) -> list[int]:
    out = []
    for n in sorted(os.listdir(m.p("active", name, "instances"))):
        line = m.read(f"active/{name}/instances/{n}")
        if "pid=-" not in line and "state=running" in line:
            out.append(int(line.split("pid=")[1].split()[0]))
    return out


def test_the_user_chosen_at_apply_survives_a_restart_without_default_user(tmp_path):
    """Issue 16 fix 1: --default-user chose the user at apply; a server restarted without it (or with
    another) still starts that version, restarts and a later scale by the member, as that user."""
    mnt = tempfile.mkdtemp(prefix="deployfs-tenants-")
    os.chmod(mnt, 0o755)
    state = str(tmp_path / "state")
    with made_users() as users:
        def as_alice(cmd: str) -> subprocess.CompletedProcess:
            # ALICE is in EXTRA (--group) by /etc/group.
            return subprocess.run(["setpriv", f"--reuid={ALICE}", f"--regid={ALICE}", "--init-groups",
                                   "bash", "-c", cmd], capture_output=True, text=True, timeout=15, cwd=mnt)

        bob = users[BOB].pw_uid
        m = _mount.start(str(tmp_path), "--allow-other", "--group", EXTRA, "--default-user", BOB,
                         state=state, mnt=mnt)
        try:
            w = as_alice("printf 'image /bin/sleep\\nargs 300\\nhealth_interval 0.2\\n' > manifests/dev && echo 'apply dev' > ctl")
            assert w.returncode == 0, w.stderr
            m.until(lambda: len(pids_of(m, "dev")) == 1, what="dev running")
            assert [uid_of(p) for p in pids_of(m, "dev")] == [bob]
            assert f"user {BOB}" in m.read("active/dev/manifest")  # the operator sees who it runs as
        finally:
            _mount.stop(m)
        m = _mount.start(str(tmp_path), "--allow-other", "--group", EXTRA, state=state, mnt=mnt)
        try:
            m.until(lambda: len(pids_of(m, "dev")) == 1, what="dev running after the restart")
            assert [uid_of(p) for p in pids_of(m, "dev")] == [bob]
            s = as_alice("echo 'scale 2' > active/dev/ctl")
            assert s.returncode == 0, s.stderr
            m.until(lambda: len(pids_of(m, "dev")) == 2, what="dev scaled to 2")
            assert [uid_of(p) for p in pids_of(m, "dev")] == [bob, bob]
            assert m.read("active/dev/wait").startswith("done")
            # A supervisor restart of a killed instance: still BOB.
            first = pids_of(m, "dev")[0]
            os.kill(first, 9)
            m.until(lambda: len(pids_of(m, "dev")) == 2 and first not in pids_of(m, "dev"), what="restarted")
            assert [uid_of(p) for p in pids_of(m, "dev")] == [bob, bob]
        finally:
            _mount.stop(m)
            os.rmdir(mnt)


def test_nofile_above_what_deployfs_may_raise_is_refused_at_apply_with_its_line(tmp_path):
    """Issue 16 fix 2: root without CAP_SYS_RESOURCE (a container; setpriv drops it here) cannot
    raise the hard limit: the manifest is refused with the line and the host's limit, nothing runs."""
    import resource
    import sys
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit here")
    mnt, state = str(tmp_path / "mnt"), str(tmp_path / "state")
    os.makedirs(mnt)
    argv = ["setpriv", "--bounding-set=-sys_resource", "--inh-caps=-sys_resource",
            sys.executable, "-m", "deployfs", "serve", mnt, "--state", state]
    m = _mount.start(str(tmp_path), argv=argv, mnt=mnt, state=state)
    try:
        m.write_manifest("many", f"image /bin/sleep\nargs 300\nnofile {hard + 1}\n")
        r = m.ctl("apply many")
        assert r.returncode == 1 and "Invalid argument" in r.stderr, r.stderr
        assert (f"manifests/many line 3: nofile {hard + 1} cannot be applied: above deployfs's own hard limit "
                f"{hard}, which only a process with CAP_SYS_RESOURCE may raise") in m.read("events")
        assert not os.path.exists(m.p("active", "many"))
        m.write_manifest("some", f"image /bin/sleep\nargs 300\nnofile {hard}\nhealth_interval 0.2\n")  # up to it: runs
        assert m.ctl("apply some").returncode == 0
        assert m.read("active/some/wait").startswith("done")
    finally:
        _mount.stop(m)


HOG = "x = [bytearray(1 << 20) for _ in range(200)]; import time; time.sleep(60)"


@pytest.mark.skipif("memory" not in detect().controllers, reason="no memory cgroup controller here")
def test_an_oom_kill_while_deployfs_was_down_is_reported_after_its_restart(tmp_path):
    """Issue 16 fix 3: the instance's cgroup outlives it and the server; recovery reads its OOM count."""
    go = str(tmp_path / "go")
    state, mnt = str(tmp_path / "state"), str(tmp_path / "mnt")
    m = _mount.start(str(tmp_path), state=state, mnt=mnt)
    try:
        # Healthy first; allocates in steps once told to, so the kernel kills it at the limit.
        m.write_manifest("hog", f"image /bin/sh\nargs -c 'while [ ! -e {go} ]; do sleep 0.05; done; "
                                f"exec /usr/bin/python3 -c \"{HOG}\"'\nmemory 32M\nhealth_interval 0.2\n")
        assert m.ctl("apply hog").returncode == 0, m.read("events")
        assert m.read("active/hog/wait").startswith("done")
        pid = pids_of(m, "hog")[0]
        _mount.kill9(m)
        open(go, "w").close()
        m.until(lambda: not os.path.exists(f"/proc/{pid}"), what="the instance OOM-killed")
        m = _mount.start(str(tmp_path), state=state, mnt=mnt)
        m.until(lambda: "instance 0 killed: out of memory (limit 32M) while deployfs was down"
                in m.read("active/hog/events"), what="the OOM reported")
        assert " oom_kills=" in m.read("active/hog/instances/0")
    finally:
        _mount.stop(m)


def test_instances_n_shows_the_id_its_cgroup_and_marker_use_and_no_pid_once_dead(tmp_path):
    """Issue 16 fixes 4 and 8: `id=` leads an operator to the cgroup and the marker; an instance that
    is over shows pid=- (its pid may be another process's by now)."""
    from deployfs.node.cgroups import Cgroups
    with _mount.running(tmp_path) as m:
        m.write_manifest("web", "image /bin/sleep\nargs 300\nreplicas 2\nmemory 64M\nrestart never\n"
                                "health_interval 0.2\n")
        assert m.ctl("apply web").returncode == 0
        assert m.read("active/web/wait").startswith("done")
        m.ctl("scale 1", "web")
        m.until(lambda: len(os.listdir(m.p("active/web/instances"))) == 1, what="scaled to 1")
        m.ctl("restart", "web")  # a replacement: slot 0 under a new id
        assert m.read("active/web/wait").startswith("done")
        line = m.read("active/web/instances/0")
        ident, pid = int(line.split(" id=")[1].split()[0]), int(line.split("pid=")[1].split()[0])
        assert ident != 0
        cg = Cgroups(m.state).find("web", ident)
        assert cg is not None and pid in cg.pids()
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert f"DEPLOYFS_INSTANCE={os.path.abspath(m.state)}:web:{ident}".encode() in f.read().split(b"\0")
        os.kill(pid, 9)
        m.until(lambda: "state=exited" in m.read("active/web/instances/0") or
                "state=failed" in m.read("active/web/instances/0"), what="the instance over")
        assert " pid=- " in m.read("active/web/instances/0")


def test_group_without_allow_other_warns_at_start(tmp_path):
    """Issue 16 fix 7: members would get Permission denied on the whole mount; say so at start."""
    with _mount.running(tmp_path, "--group", "root") as m:
        assert ("--group root without --allow-other: the kernel lets no user but deployfs's own into the mount"
                in m.server_log())
    with _mount.running(tmp_path, "--group", "root", "--allow-other") as m:
        assert "without --allow-other" not in m.server_log()
