"""The view from a shell: ctl replies on one descriptor, wait's limits, names, listings.

Services here are `sleep` without a public port, so these tests need no fixed
port and start in a fraction of a second.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

from tests import mount as _mount

SLEEP = "image sleep\nargs 600\nreplicas 1\nhealth_interval 0.2\n"


def deploy(mnt, text=SLEEP, name="app"):
    mnt.write_manifest(name, text)
    assert mnt.ctl(f"apply {name}").returncode == 0
    assert mnt.sh(f"cat active/{name}/wait", timeout=30).stdout.startswith("done ")


def start_slow_rollout(mnt, name="app"):
    """A rollout that stays in flight: the first batch is followed by a long pause."""
    deploy(mnt, SLEEP.replace("replicas 1", "replicas 2"), name)
    mnt.write_manifest(name, SLEEP.replace("replicas 1", "replicas 2") + "env V=2\nupdate_pause 600\n")
    assert mnt.ctl("apply", name).returncode == 0
    assert mnt.read(f"active/{name}/update_status") == "rolling\n"


def test_ctl_reply_comes_back_whole_on_the_same_descriptor(mnt):
    deploy(mnt)
    r = mnt.sh("exec 3<>active/app/ctl; echo 'scale 2' >&3; cat <&3; echo pause >&3; cat <&3; "
               "echo 'scale 1' >&3; cat <&3")
    assert r.stdout == "ok\nerror: app: no rollout in flight to pause (update_status none)\nok\n", r.stdout
    assert "write error: Device or resource busy" in r.stderr
    version = mnt.read("active/app/version").strip()
    r = mnt.sh("exec 3<>ctl; echo 'apply app' >&3; cat <&3; printf 'apply app' >&3; cat <&3")
    assert r.stdout == f"ok unchanged {version}\nok unchanged {version}\n"
    # a line at a time, the way `read` takes it
    r = mnt.sh("exec 3<>ctl; echo 'apply app' >&3; read -r reply <&3; echo \"[$reply]\"")
    assert r.stdout == f"[ok unchanged {version}]\n"


def test_listings_have_dot_entries_and_no_events_1_before_a_rotation(mnt):
    deploy(mnt)
    for d in (".", "manifests", "active/app", "active/app/logs"):
        names = mnt.sh(f"ls -a {d}").stdout.split()
        assert names[:2] == [".", ".."], (d, names)
    assert "events.1" not in os.listdir(mnt.p("active/app"))
    r = mnt.sh("cat active/app/events.1")
    assert r.returncode == 1 and "No such file or directory" in r.stderr
    assert mnt.sh("ls -la active/app | grep -c ' \\.\\.\\?$'").stdout == "2\n"
    # the top events file before anything was deleted: empty, and dated from the start, not 1970
    assert os.stat(mnt.p("events")).st_mtime > time.time() - 3600


def test_names_too_long_and_retired_names(mnt):
    deploy(mnt)
    long = "a" * 256
    r = mnt.sh(f"echo x > manifests/{long}")
    assert r.returncode == 1 and "File name too long" in r.stderr
    r = mnt.sh(f"stat manifests/{long}")
    assert r.returncode == 1 and "File name too long" in r.stderr
    assert mnt.sh(f"echo x > manifests/{long[:255]} && rm manifests/{long[:255]}").returncode == 0
    # a rotated-away events inode has no name anyone can look up: no inode per made-up name
    r = mnt.sh("stat active/app/events@7")
    assert r.returncode == 1 and "No such file or directory" in r.stderr


NONBLOCK = """
import errno, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)
t = time.monotonic()
try:
    print(os.read(fd, 100).decode().strip(), end=" ")
except BlockingIOError:
    print("EAGAIN", end=" ")
print(round(time.monotonic() - t, 2))
"""


def test_nonblocking_read_of_wait_is_eagain_during_a_rollout(mnt):
    deploy(mnt)
    idle = subprocess.run([sys.executable, "-c", NONBLOCK, mnt.p("active/app/wait")], capture_output=True,
                          text=True, timeout=10)
    assert idle.stdout.startswith("done "), idle.stdout + idle.stderr
    start_slow_rollout(mnt)
    r = subprocess.run([sys.executable, "-c", NONBLOCK, mnt.p("active/app/wait")], capture_output=True,
                       text=True, timeout=10)
    word, took = r.stdout.split()
    assert word == "EAGAIN" and float(took) < 1.0, r.stdout + r.stderr
    assert mnt.ctl("rollback", "app").returncode == 0


def test_killed_reader_of_a_shared_wait_descriptor_is_freed(mnt):
    """The shell opens `wait`, cat reads it: killing cat must free cat (not only killing the shell)."""
    start_slow_rollout(mnt)
    sh = subprocess.Popen(["bash", "-c", f"exec 3< {mnt.p('active/app/wait')}; cat <&3 & echo $!; wait"],
                          stdout=subprocess.PIPE, text=True)
    try:
        cat = int(sh.stdout.readline())
        deadline = time.monotonic() + 5
        while _wchan(cat) != "request_wait_answer":  # blocked in the FUSE read
            assert time.monotonic() < deadline, _wchan(cat)
            time.sleep(0.05)
        t0 = time.monotonic()
        os.kill(cat, signal.SIGKILL)
        while os.path.exists(f"/proc/{cat}") and _state(cat) != "Z":
            assert time.monotonic() - t0 < 2.0, f"cat still {_state(cat)} in {_wchan(cat)}"
            time.sleep(0.02)
        sh.wait(timeout=5)
    finally:
        sh.kill()
        sh.wait()
    assert mnt.ctl("rollback", "app").returncode == 0


def _wchan(pid):
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except OSError:
        return ""


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _open_mountpoint():
    """pytest's temp root is 0700: mount where another user can reach."""
    d = tempfile.mkdtemp(prefix="deployfs-view-")
    os.chmod(d, 0o755)
    return d


FLOOD = """
import errno, os, sys, threading
fds, busy = [], 0
for _ in range(int(sys.argv[2])):
    try:
        fds.append(os.open(sys.argv[1], os.O_RDONLY))
    except OSError as e:
        assert e.errno == errno.EBUSY, e
        busy += 1
threads = [threading.Thread(target=os.read, args=(fd, 100), daemon=True) for fd in fds for _ in range(2)]
for t in threads:
    t.start()
print(len(fds), busy, flush=True)
threading.Event().wait()
"""


def test_wait_flood_by_another_user_is_capped_and_starves_nobody(tmp_path):
    m = _mount.start(str(tmp_path), "--allow-other", mnt=_open_mountpoint())
    flood = None
    try:
        start_slow_rollout(m)
        flood = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                                  sys.executable, "-c", FLOOD, m.p("active/app/wait"), "200"],
                                 stdout=subprocess.PIPE, text=True, cwd="/")
        opened, busy = map(int, flood.stdout.readline().split())
        assert (opened, busy) == (64, 136)  # counted at open, per uid; two threads per descriptor block once
        t0 = time.monotonic()
        for _ in range(10):
            assert m.read("active/app/update_status") == "rolling\n"
        assert (time.monotonic() - t0) / 10 < 0.25
        assert m.ctl("pause", "app").returncode == 0  # the owner still acts
        assert m.sh("cat active/app/wait", timeout=10).stdout == "paused\n"  # and has its own share
    finally:
        if flood is not None:
            flood.kill()
            flood.wait()
        _mount.stop(m)
        os.rmdir(m.path)


def test_group_member_by_supplementary_group_may_write(tmp_path):
    m = _mount.start(str(tmp_path), "--allow-other", "--group", "users", mnt=_open_mountpoint())
    try:
        deploy(m)

        def as_nobody(*groups):
            return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", *groups, "bash", "-c",
                                   f"echo 'scale app 2' > {m.p('ctl')}"], capture_output=True, text=True,
                                  timeout=15, cwd="/")
        r = as_nobody("--clear-groups")
        assert r.returncode == 1 and "Permission denied" in r.stderr
        r = as_nobody("--groups=users")
        assert r.returncode == 0, r.stderr
        assert "scaled to 2 by uid=65534" in m.read("active/app/events")
    finally:
        _mount.stop(m)
        os.rmdir(m.path)


TICKER = ('image /bin/sh\nargs -c "while :; do echo tick $$ $(date +%s%N); sleep 0.05; done"\n'
          "replicas 2\nhealth_interval 0.5\n")


def test_tail_f_follows_an_instance_log(mnt):
    deploy(mnt, TICKER)
    tail = subprocess.Popen(["tail", "-n", "0", "-f", "-s", "0.1", mnt.p("active/app/logs/0")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [tail.stdout.readline() for _ in range(5)]  # the pytest timeout backstops a tail that sees nothing
        assert all(line.startswith("tick ") for line in lines), lines
        assert len(set(lines)) == 5
    finally:
        tail.kill()
        tail.wait()


def test_logs_of_a_failed_rollout_and_of_stopped_instances_stay_readable(mnt):
    deploy(mnt, TICKER)
    mnt.write_manifest("app", 'image /bin/sh\nargs -c "echo boom-$INSTANCE; exit 3"\nreplicas 2\n')
    assert mnt.ctl("apply", "app").returncode == 0
    outcome = mnt.sh("cat active/app/wait", timeout=30).stdout
    slot = outcome.split("instance ")[1].split()[0]
    assert outcome.startswith("failed: ") and f"failed-{slot}" in os.listdir(mnt.p("active/app/logs")), outcome
    assert mnt.read(f"active/app/logs/failed-{slot}") == f"boom-{slot}\n"
    assert mnt.ctl("stop", "app").returncode == 0
    mnt.until(lambda: os.listdir(mnt.p("active/app/instances")) == [], what="stopped")
    assert sorted(os.listdir(mnt.p("active/app/logs"))) == ["stopped-0", "stopped-1"]  # replaces failed-N
    assert mnt.read("active/app/logs/stopped-1").startswith("tick ")
    assert mnt.ctl("rollback", "app").returncode == 0  # the next rollout starts afresh
    assert mnt.sh("cat active/app/wait", timeout=30).stdout.startswith("done ")
    assert sorted(os.listdir(mnt.p("active/app/logs"))) == ["0", "1"]


def test_deploy_logs_follow_prints_each_line_once_across_renumbering(mnt):
    deploy(mnt, TICKER)
    follow = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "deploy"), "--mount", mnt.path,
                               "logs", "app", "-f"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.6)
        assert mnt.ctl("restart", "app").returncode == 0  # new instances on slots 2, 3, renumbered to 0, 1
        assert mnt.sh("cat active/app/wait", timeout=30).stdout.startswith("done ")
        time.sleep(1.2)
    finally:
        follow.terminate()
        out, _ = follow.communicate(timeout=10)
    lines = [line.split(" ", 1)[1] for line in out.splitlines()]
    assert len(lines) > 20 and {line.split(" ", 1)[0] for line in out.splitlines()} >= {"[app/0]", "[app/2]"}
    assert len(lines) == len(set(lines)), [line for line in lines if lines.count(line) > 1][:5]


def test_tail_f_keeps_following_a_log_rotated_under_it(mnt):
    """The runtime bounds logs copytruncate-style (live file -> .1, live truncated): tail -f carries on."""
    deploy(mnt, TICKER.replace("replicas 2", "replicas 1"))
    tail = subprocess.Popen(["tail", "-n", "0", "-f", "-s", "0.1", mnt.p("active/app/logs/0")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        before = [tail.stdout.readline() for _ in range(3)]
        logs = os.path.join(mnt.state, "logs", "app")
        live = os.path.join(logs, next(n for n in os.listdir(logs) if n.endswith(".log")))
        with open(live, "r+b") as f:  # what a size-bounded runtime does, done by hand
            data = f.read()
            with open(live + ".1", "wb") as old:
                old.write(data[-200:])
            f.truncate(0)
        stamp = int(before[-1].split()[2])
        deadline = time.monotonic() + 10
        while True:  # what was kept may come again ("file truncated"); new lines must follow
            line = tail.stdout.readline()
            if line.startswith("tick ") and int(line.split()[2]) > stamp + 500_000_000:
                break
            assert time.monotonic() < deadline
    finally:
        tail.kill()
        tail.wait()


def test_sigterm_frees_blocked_wait_readers(tmp_path):
    m = _mount.start(str(tmp_path))
    try:
        start_slow_rollout(m)
        cat = subprocess.Popen(["cat", m.p("active/app/wait")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while _wchan(cat.pid) != "request_wait_answer":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        m.proc.send_signal(signal.SIGTERM)
        assert cat.wait(timeout=10) != 0  # EINTR, not an outcome
        assert m.proc.wait(timeout=30) == 0
    finally:
        _mount.stop(m)
