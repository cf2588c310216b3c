"""The namespace on a real FUSE mount, driven by real cat, echo, tail, editors."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.mount import SERVICE

WEB = f"""image {sys.executable}
args {SERVICE} --port $PORT
replicas 2
port 18090
health http://127.0.0.1:$PORT/healthz
health_interval 0.2
"""


def deploy(mnt, text=WEB, name="web"):
    mnt.write_manifest(name, text)
    r = mnt.ctl(f"apply {name}")
    assert r.returncode == 0, r.stderr
    mnt.until(lambda: mnt.read(f"active/{name}/wait") .startswith("done"), what="deploy")


def test_layout_and_state_files(mnt):
    assert sorted(os.listdir(mnt.path)) == ["active", "cluster", "ctl", "events", "manifests", "metrics", "nodes"]
    deploy(mnt)
    d = "active/web/"
    version = mnt.read(d + "version")
    assert len(version) == 13 and version.endswith("\n")
    assert mnt.read(d + "previous_version") == "\n"
    assert mnt.read(d + "update_status") == "none\n"
    assert mnt.read(d + "update_progress") == "2/2\n"
    assert mnt.read(d + "replicas") == "2\n"
    assert mnt.read(d + "health") == "healthy\n"
    assert mnt.read(d + "manifest") == WEB
    assert mnt.sh(f'[ "$(cat {d}update_status)" = none ]').returncode == 0
    status = dict(l.split(" ", 1) for l in mnt.read(d + "status").splitlines() if " " in l)
    assert status["version"] == version.strip() and status["health"] == "healthy"
    eps = mnt.read(d + "endpoints").split()
    assert len(eps) == 2 and all(e.startswith("127.0.0.1:") for e in eps)
    assert sorted(os.listdir(mnt.p("active/web/instances"))) == ["0", "1"]
    inst = mnt.read(d + "instances/0")
    assert f"slot=0 version={version.strip()} state=running health=healthy pid=" in inst and inst.endswith("\n")
    assert "starting pid=" in mnt.read(d + "logs/0")
    # sizes are true: wc -c agrees with stat
    for f in ("version", "status", "events", "instances/1"):
        size = int(mnt.sh(f"stat -c %s {d}{f}").stdout)
        assert size == int(mnt.sh(f"wc -c < {d}{f}").stdout), f


def test_state_file_is_never_stale(mnt):
    deploy(mnt)
    assert mnt.read("active/web/replicas") == "2\n"
    assert mnt.ctl("scale 3", "web").returncode == 0
    assert mnt.read("active/web/replicas") == "3\n"  # at once, same length as before
    assert "replicas 3" in mnt.read("manifests/web")


def test_ctl_errors_reach_the_shell(mnt):
    r = mnt.ctl("apply nosuch")
    assert r.returncode == 1 and "No such file or directory" in r.stderr
    r = mnt.ctl("frobnicate web")
    assert r.returncode == 1 and "Invalid argument" in r.stderr
    deploy(mnt)
    r = mnt.ctl("resume", "web")
    assert r.returncode == 1 and "Device or resource busy" in r.stderr
    r = mnt.ctl("scale many", "web")
    assert r.returncode == 1 and "Invalid argument" in r.stderr
    assert "command refused (uid=0): scale: expected a whole number" in mnt.read("active/web/events")


def test_reply_read_back_from_the_same_descriptor(mnt):
    deploy(mnt)
    code = (
        "import os,sys\n"
        "fd=os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n  os.write(fd, sys.argv[2].encode())\nexcept OSError as e:\n  print('errno', e.errno)\n"
        "print(os.pread(fd, 4096, 0).decode(), end='')\n")
    ok = subprocess.run([sys.executable, "-c", code, mnt.p("active/web/ctl"), "pause\n"], capture_output=True, text=True, timeout=10)
    assert ok.stdout.startswith("errno 16\nerror: web: no rollout in flight to pause")
    ok = subprocess.run([sys.executable, "-c", code, mnt.p("ctl"), "scale web 1\n"], capture_output=True, text=True, timeout=10)
    assert ok.stdout == "ok\n"
    assert "scaled to 1 by uid=0" in mnt.read("active/web/events")


def test_tail_f_sees_a_new_event_within_2s(mnt):
    deploy(mnt)
    tail = subprocess.Popen(["tail", "-n", "0", "-f", mnt.p("active/web/events")], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.2)  # let tail take its first fstat (it polls once a second on FUSE)
        t0 = time.monotonic()
        assert mnt.ctl("scale 3", "web").returncode == 0
        line = tail.stdout.readline()
        assert "scaled to 3 by uid=0" in line
        assert time.monotonic() - t0 < 2
    finally:
        tail.kill()
        tail.wait()


def test_tail_n_and_grep(mnt):
    deploy(mnt)
    last = mnt.sh("tail -n 1 active/web/events").stdout
    assert " deploy complete: " in last and last.endswith("s\n")
    assert mnt.sh("grep -c started active/web/events").stdout == "2\n"


def test_wait_blocks_until_the_rollout_ends(mnt):
    deploy(mnt)
    slow = WEB.replace("--port $PORT", "--port $PORT --slow-start 1.5")
    mnt.write_manifest("web", slow)
    assert mnt.ctl("apply", "web").returncode == 0
    t0 = time.monotonic()
    out = mnt.sh("cat active/web/wait", timeout=60).stdout
    assert out == f"done {mnt.read('active/web/version').strip()}\n"
    assert time.monotonic() - t0 > 1.5


def test_ctrl_c_of_a_blocked_wait_returns_within_1s(mnt):
    deploy(mnt)
    mnt.write_manifest("web", WEB.replace("--port $PORT", "--port $PORT --slow-start 30"))
    assert mnt.ctl("apply", "web").returncode == 0
    cat = subprocess.Popen(["cat", mnt.p("active/web/wait")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    assert cat.poll() is None, "wait should block during a rollout"
    t0 = time.monotonic()
    cat.send_signal(signal.SIGINT)
    cat.wait(timeout=5)
    assert time.monotonic() - t0 < 1.0
    v1 = mnt.read("active/web/previous_version")
    assert mnt.ctl("rollback", "web").returncode == 0  # abandon the slow rollout
    assert mnt.sh("cat active/web/wait", timeout=30).stdout == f"done {v1}"


def test_300_waiters_do_not_freeze_the_filesystem(mnt):
    deploy(mnt)
    mnt.write_manifest("web", WEB.replace("--port $PORT", "--port $PORT --slow-start 30"))
    assert mnt.ctl("apply", "web").returncode == 0
    waiters = [subprocess.Popen(["cat", mnt.p("active/web/wait")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(300)]
    try:
        time.sleep(1.0)
        assert sum(w.poll() is None for w in waiters) == 300
        t0 = time.monotonic()
        for _ in range(20):
            assert mnt.read("active/web/update_status") == "rolling\n"
        assert (time.monotonic() - t0) / 20 < 0.25  # a `cat` process each; a frozen fs would time out
    finally:
        for w in waiters:
            w.send_signal(signal.SIGINT)
        for w in waiters:
            w.wait(timeout=20)
    assert mnt.ctl("stop", "web").returncode == 0


EDITORS = {
    "cat >": "printf 'image /bin/true\\nreplicas 1\\n' > manifests/ed",
    "echo >>": "printf 'image /bin/true\\n' > manifests/ed && echo 'replicas 1' >> manifests/ed",
    "cp": "printf 'image /bin/true\\nreplicas 1\\n' > /tmp/_src_$$ && cp /tmp/_src_$$ manifests/ed",
    "install": "printf 'image /bin/true\\nreplicas 1\\n' > /tmp/_src_$$ && install -m 644 /tmp/_src_$$ manifests/ed",
    "mv": "printf 'image /bin/true\\nreplicas 1\\n' > manifests/.tmp && mv manifests/.tmp manifests/ed",
    "python": f"{sys.executable} -c \"open('manifests/ed','w').write('image /bin/true\\nreplicas 1\\n')\"",
}


@pytest.mark.parametrize("how", sorted(EDITORS))
def test_editors_write_manifests(mnt, how):
    mnt.sh("printf 'image /bin/false\\nreplicas 9\\n# a long old tail that must not survive\\n' > manifests/ed", check=True)
    mnt.sh(EDITORS[how], check=True)
    assert mnt.read("manifests/ed") == "image /bin/true\nreplicas 1\n"
    assert sorted(os.listdir(mnt.p("manifests"))) == ["ed"]


def test_sed_perl_vim_edit_in_place(mnt):
    mnt.write_manifest("ed", "image /bin/true\nreplicas 1\n# keep me\n")
    mnt.sh("sed -i 's/replicas 1/replicas 2/' manifests/ed", check=True)
    mnt.sh("perl -pi -e 's/replicas 2/replicas 3/' manifests/ed", check=True)
    r = mnt.sh("vim -u NONE -i NONE -es -c '%s/replicas 3/replicas 4/' -c 'wq' manifests/ed", timeout=20)
    assert r.returncode == 0, r.stderr
    assert mnt.read("manifests/ed") == "image /bin/true\nreplicas 4\n# keep me\n"
    assert sorted(os.listdir(mnt.p("manifests"))) == ["ed"]  # no temp or swap file left
    mnt.sh("rm manifests/ed", check=True)
    assert os.listdir(mnt.p("manifests")) == []


def test_oversize_and_hostile_writes_refused(mnt):
    r = mnt.sh("head -c 70000 /dev/zero | tr '\\0' x > manifests/big")
    assert r.returncode != 0 and "File too large" in r.stderr
    r = mnt.sh("echo hi > manifests/$'bad\\tname'")
    assert r.returncode != 0
    r = mnt.sh("mkdir manifests/sub")
    assert r.returncode != 0
    r = mnt.sh("echo x > active/nope")
    assert r.returncode != 0
    r = mnt.sh("head -c 5000 /dev/zero | tr '\\0' a > ctl")
    assert r.returncode == 1 and "Invalid argument" in r.stderr


def test_state_files_are_read_only(mnt):
    deploy(mnt)
    for f in ("version", "status", "events", "wait"):
        r = mnt.sh(f"echo x > active/web/{f}")
        assert r.returncode != 0, f
    modes = {f: oct(os.stat(mnt.p("active/web", f)).st_mode & 0o777) for f in ("ctl", "version", "events")}
    assert modes == {"ctl": "0o600", "version": "0o444", "events": "0o444"}
    assert oct(os.stat(mnt.p("manifests/web")).st_mode & 0o777) == "0o644"


POLLER = """
import os, select, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
p = select.poll()
p.register(fd, select.POLLIN)
print("ready-at-once" if p.poll(0) else "blocked", flush=True)
t = time.monotonic()
events = p.poll(60000)
print("woke" if events else "timeout", round(time.monotonic() - t, 2), os.read(fd, 200).decode().strip(), flush=True)
"""


def test_poll_on_wait_wakes_when_the_rollout_ends(mnt):
    deploy(mnt)
    idle = subprocess.run([sys.executable, "-c", POLLER, mnt.p("active/web/wait")], capture_output=True,
                          text=True, timeout=20)
    assert idle.stdout.startswith("ready-at-once\nwoke")  # nothing in flight: readable at once
    mnt.write_manifest("web", WEB.replace("--port $PORT", "--port $PORT --slow-start 1"))
    assert mnt.ctl("apply", "web").returncode == 0
    r = subprocess.run([sys.executable, "-c", POLLER, mnt.p("active/web/wait")], capture_output=True,
                       text=True, timeout=60)
    first, second = r.stdout.splitlines()
    assert first == "blocked", r.stdout + r.stderr
    word, waited, outcome = second.split(" ", 2)
    assert word == "woke" and float(waited) >= 0.5 and outcome.startswith("done ")
