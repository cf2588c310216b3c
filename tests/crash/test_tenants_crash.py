"""Adoption after a crash with cgroups: a server killed with -9 and started again
adopts a limited instance running as its user, and a stop then reaches the grandchild that
left the session and cleared its environment (only the cgroup still knows it)."""

import os
import time

import pytest

from deployfs.node.cgroups import Cgroups, detect
from deployfs.node.runtime import proc_start_time
from tests import mount as _mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or "memory" not in detect().controllers,
                                reason="needs root and a memory cgroup controller")

MANIFEST = ("image /bin/sh\nargs -c \"setsid env -i /bin/sh -c 'echo $$; exec sleep 300' & exec sleep 300\"\n"
            "user nobody\nmemory 64M\nhealth_interval 0.2\n")


def pid_field(line: str) -> int:
    return int(line.split("pid=")[1].split()[0])


def test_adopted_after_a_crash_and_stopped_through_its_cgroup(tmp_path):
    m = _mount.start(str(tmp_path))
    try:
        m.write_manifest("web", MANIFEST)
        assert m.ctl("apply web").returncode == 0
        assert m.sh("cat active/web/wait", timeout=20).stdout.startswith("done ")
        leader = pid_field(m.read("active/web/instances/0"))
        m.until(lambda: m.read("active/web/logs/0").strip().isdigit(), what="the grandchild's pid")
        grandchild = int(m.read("active/web/logs/0"))
        cgroup = Cgroups(m.state).find("web", 1)
        assert cgroup is not None and grandchild in cgroup.pids()
        _mount.kill9(m)
        m = _mount.start(str(tmp_path), state=m.state, mnt=m.path)
        m.until(lambda: "instance 0 adopted pid=" in m.read("active/web/events"), what="adoption")
        assert pid_field(m.read("active/web/instances/0")) == leader  # the same process, not restarted
        assert m.ctl("stop", "web").returncode == 0
        m.until(lambda: proc_start_time(grandchild) is None and proc_start_time(leader) is None, what="all gone")
        deadline = time.monotonic() + 5
        while Cgroups(m.state).find("web", 1) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Cgroups(m.state).find("web", 1) is None  # removed with the instance
    finally:
        _mount.stop(m)
