"""`deployfs serve` refuses what it cannot use with one clear line, and exits 2."""

import os
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
