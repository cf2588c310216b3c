import os
import subprocess
import sys

from tests.serve.test_mount import deploy


def test_fuzz_ctl_and_manifests_through_the_mount(mnt):
    deploy(mnt)
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "fuzz_child.py"), mnt.path, "2000"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)
    ctl, manifests = (int(w) for w in r.stdout.split() if w.isdigit())
    assert ctl >= 1500 and manifests >= 500
    assert os.path.ismount(mnt.path) and mnt.proc.poll() is None
    assert "bug in" not in mnt.server_log()  # no handler exception escaped
