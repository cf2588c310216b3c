"""The seed's Verify list, end to end: real mount, real processes, cat/echo only."""

import sys
import threading
import time

import pytest

from tests import mount as _mount
from tests.mount import SERVICE

PORT = 18400


def manifest(version="v1", extra="", batch=1, pause=0, update="rolling", replicas=3):
    return (f"image {sys.executable}\nargs {SERVICE} --port $PORT --version {version} {extra}\n"
            f"replicas {replicas}\nport {PORT}\nhealth http://127.0.0.1:$PORT/healthz\nhealth_interval 0.2\n"
            f"health_timeout 0.5\nhealth_retries 2\nupdate_deadline 4\ndrain_timeout 0.2\nupdate {update}\n"
            f"update_batch {batch}\nupdate_pause {pause}\n")


@pytest.fixture
def m(tmp_path):
    with _mount.running(str(tmp_path)) as m:
        yield m


def pids(m):
    return {s: m.read(f"active/web/instances/{s}").split("pid=")[1].split()[0]
            for s in sorted(m.sh("ls active/web/instances").stdout.split())}


class Watcher:
    """Samples endpoints and instances during a rollout (a person watching with cat)."""

    def __init__(self, m):
        self.m, self.min_healthy, self.max_running, self.stop = m, 99, 0, threading.Event()
        self.t = threading.Thread(target=self.run)
        self.t.start()

    def run(self):
        while not self.stop.is_set():
            eps = self.m.sh("cat active/web/endpoints").stdout.split()
            n = len(self.m.sh("ls active/web/instances").stdout.split())
            self.min_healthy, self.max_running = min(self.min_healthy, len(eps)), max(self.max_running, n)
            time.sleep(0.02)

    def done(self):
        self.stop.set()
        self.t.join()
        return self


def test_seed_verify_1_to_6(m):
    # 1. deploy web v1 with 3 replicas, all healthy
    m.write_manifest("web", manifest("v1"))
    assert m.ctl("apply web").returncode == 0
    v1 = m.sh("cat active/web/wait", timeout=30).stdout.split()[1]
    assert m.read("active/web/health") == "healthy\n" and m.read("active/web/update_progress") == "3/3\n"
    # 2-4. new image, apply, one batch at a time, never fewer than 3 healthy
    m.write_manifest("web", manifest("v2"))
    w = Watcher(m)
    assert m.ctl("apply", "web").returncode == 0
    assert m.read("active/web/update_status") == "rolling\n"
    v2 = m.sh("cat active/web/wait", timeout=60).stdout.split()[1]
    w.done()
    assert w.min_healthy >= 3 and w.max_running <= 4
    assert (m.read("active/web/version"), m.read("active/web/previous_version")) == (f"{v2}\n", f"{v1}\n")
    assert sorted(pids(m)) == ["0", "1", "2"]
    assert all(f"version={v2}" in m.read(f"active/web/instances/{s}") for s in "012")
    events = m.read("active/web/events")
    assert f"rolling update started {v1}→{v2} strategy=rolling batch=1 pause=0s by uid=0" in events
    steps = [l.split(" ", 1)[1] for l in events.splitlines() if " instance " in l and l.split()[3] in ("healthy", "draining")]
    # after the first deploy's three "healthy": new healthy, old draining, three times
    assert [s.split()[2] for s in steps[3:]] == ["healthy", "draining"] * 3
    assert f"rolling update complete: {v2}" in events
    d = m.sh("diff active/web/previous_manifest active/web/manifest")
    assert d.returncode == 1 and "< args" in d.stdout and "--version v1" in d.stdout and "> args" in d.stdout
    # 5. a bad image: aborted, old instances untouched (same pids)
    before = pids(m)
    m.write_manifest("web", manifest("v3", "--exit-at-start 1"))
    assert m.ctl("apply", "web").returncode == 0
    out = m.sh("cat active/web/wait", timeout=30).stdout
    assert out.startswith("failed: instance 3 (") and "exited with status 1" in out
    assert m.read("active/web/update_status") == "failed\n"
    # the failed instance is stopped and unlisted just after `wait` answers; the old ones stay as they were
    def only_old() -> bool:
        try:
            return pids(m) == before
        except AssertionError:  # listed by `ls`, gone before its `cat`
            return False
    m.until(only_old, timeout=10, what=f"only the old instances listed, as before: {before}")
    assert "rolling update failed: instance 3" in m.read("active/web/events")
    # 6. rollback reverts to the previous manifest
    assert m.ctl("rollback", "web").returncode == 0
    assert m.sh("cat active/web/wait", timeout=30).stdout == f"done {v2}\n"
    assert pids(m) == before  # already at v2: nothing to replace
    # the broken v3 never became the rollback target: the one before v2 is
    assert m.read("active/web/previous_version") == f"{v1}\n"


def test_pause_step_resume_on_the_mount(m):
    m.write_manifest("web", manifest("v1"))
    m.ctl("apply web")
    m.sh("cat active/web/wait", timeout=30)
    m.write_manifest("web", manifest("v2", pause=1))
    assert m.ctl("apply", "web").returncode == 0
    assert m.ctl("pause", "web").returncode == 0
    assert m.sh("cat active/web/wait", timeout=30).stdout == "paused\n"
    assert m.read("active/web/update_status") == "paused\n"
    progress = m.read("active/web/update_progress")
    time.sleep(1.5)
    assert m.read("active/web/update_progress") == progress  # nothing moves while paused
    assert m.ctl("step", "web").returncode == 0
    assert m.sh("cat active/web/wait", timeout=30).stdout == "paused\n"
    assert int(m.read("active/web/update_progress")[0]) == int(progress[0]) + 1
    assert m.ctl("resume", "web").returncode == 0
    assert m.sh("cat active/web/wait", timeout=60).stdout.startswith("done")
    assert m.read("active/web/update_progress") == "3/3\n"


def test_rollover_replace_and_restart(m):
    m.write_manifest("web", manifest("v1"))
    m.ctl("apply web")
    v1 = m.sh("cat active/web/wait", timeout=30).stdout.split()[1]
    m.write_manifest("web", manifest("v2", "--slow-start 0.5"))
    m.ctl("apply", "web")
    time.sleep(0.3)
    m.write_manifest("web", manifest("v3"))
    w = Watcher(m)
    m.ctl("apply", "web")
    v3 = m.sh("cat active/web/wait", timeout=60).stdout.split()[1]
    w.done()
    assert w.max_running <= 4
    assert m.read("active/web/version") == f"{v3}\n"
    assert m.read("active/web/previous_version") == f"{v1}\n"
    m.write_manifest("web", manifest("v4", update="replace"))
    m.ctl("apply", "web")
    assert m.sh("cat active/web/wait", timeout=60).stdout.startswith("done")
    assert m.ctl("scale 4", "web").returncode == 0
    m.until(lambda: len(pids(m)) == 4 and m.read("active/web/health") == "healthy\n", what="scaled to 4")
    before = pids(m)
    m.ctl("restart", "web")
    assert m.sh("cat active/web/wait", timeout=60).stdout.startswith("done")
    after = pids(m)
    # restart keeps what scale set (it used to go back to the applied manifest's 3)
    assert sorted(after) == ["0", "1", "2", "3"] and not set(before.values()) & set(after.values())
    assert m.read("active/web/replicas") == "4\n"


def test_a_release_that_passes_then_fails_gets_the_good_version_back(m):
    m.write_manifest("web", manifest("v1"))
    m.ctl("apply web")
    v1 = m.sh("cat active/web/wait", timeout=30).stdout.split()[1]
    # healthy, retires old instance 0, then fails its checks during the pause after that batch
    m.write_manifest("web", manifest("v2", "--fail-health-after 1.5", pause=3))
    m.ctl("apply", "web")
    out = m.sh("cat active/web/wait", timeout=30).stdout
    assert out.startswith("failed: instance 3") and "unhealthy" in out
    assert "instance 0 draining (replaced)" in m.read("active/web/events")
    # at once, without a person: three healthy v1 instances serve again
    m.until(lambda: m.read("active/web/health") == "healthy\n" and len(pids(m)) == 3
            and all(f"version={v1}" in m.read(f"active/web/instances/{s}") for s in pids(m)),
            timeout=10, what="v1 back at 3 healthy")
    assert len(m.read("active/web/endpoints").split()) == 3
    assert m.read("active/web/update_status") == "failed\n"
