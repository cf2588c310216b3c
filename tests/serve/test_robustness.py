"""A handler bug answers EIO and the mount survives; only the owner writes."""

import os
import subprocess
import sys
import tempfile

from tests import mount as _mount


def test_injected_handler_bug_is_eio_and_the_mount_survives(tmp_path):
    mnt_dir, state = str(tmp_path / "mnt"), str(tmp_path / "state")
    m = _mount.start(str(tmp_path), argv=[sys.executable, os.path.join(os.path.dirname(__file__), "faulty_serve.py"),
                                         "serve", mnt_dir, "--state", state])
    try:
        m.write_manifest("web", "image sleep\nargs 30\nreplicas 1\n")
        assert m.ctl("apply web").returncode == 0
        r = m.sh("cat active/web/health")
        assert r.returncode == 1 and "Input/output error" in r.stderr
        assert "bug in lookup handler" in m.server_log() and "injected bug" in m.server_log()
        assert os.path.ismount(mnt_dir)
        assert m.read("active/web/replicas") == "1\n"  # everything else still works
    finally:
        _mount.stop(m)


def _open_mountpoint():
    """pytest's temp root is 0700: mount where another user can reach."""
    d = tempfile.mkdtemp(prefix="deployfs-acl-")
    os.chmod(d, 0o755)
    return d


def test_others_may_read_but_not_write(tmp_path):
    m = _mount.start(str(tmp_path), "--allow-other", mnt=_open_mountpoint())
    try:
        m.write_manifest("web", "image sleep\nargs 30\nreplicas 1\n")
        assert m.ctl("apply web").returncode == 0

        def as_nobody(cmd):
            return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "bash", "-c", cmd],
                                  capture_output=True, text=True, timeout=15, cwd="/")
        r = as_nobody(f"cat {m.p('active/web/replicas')}")
        assert r.returncode == 0 and r.stdout == "1\n"
        r = as_nobody(f"cat {m.p('manifests/web')}")
        assert r.returncode == 0 and "image sleep" in r.stdout
        for cmd in (f"echo stop > {m.p('active/web/ctl')}", f"echo 'stop web' > {m.p('ctl')}",
                    f"echo 'image /bin/evil' > {m.p('manifests/web')}", f"echo x > {m.p('manifests/new')}",
                    f"rm -f {m.p('manifests/web')}", f"mv {m.p('manifests/web')} {m.p('manifests/x')}"):
            r = as_nobody(cmd)
            assert r.returncode != 0 and "Permission denied" in r.stderr, cmd
        assert m.read("manifests/web") == "image sleep\nargs 30\nreplicas 1\n"
        assert m.read("active/web/health") != "stopped\n"
    finally:
        _mount.stop(m)
        os.rmdir(m.path)


def test_without_allow_other_others_see_nothing(tmp_path):
    m = _mount.start(str(tmp_path), mnt=_open_mountpoint())
    try:
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "ls", m.path],
                           capture_output=True, text=True, timeout=15)
        assert r.returncode != 0 and "Permission denied" in r.stderr
    finally:
        _mount.stop(m)
        os.rmdir(m.path)
