"""--default-user and --allow-users are checked at start: a typo must not surface at the first deploy."""

import os

import pytest

from deployfs.cli.serve import SetupError, user_policy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="as another user deployfs may only name itself")


def test_known_users_make_the_policy():
    p = user_policy("nobody", "nobody,daemon")
    assert (p.default_user, p.allow_users) == ("nobody", frozenset({"nobody", "daemon"}))
    assert user_policy(None, "").default_user is None


@pytest.mark.parametrize("default, allow, reason", [
    ("dfst_ghost", "", "--default-user/--allow-users: no user 'dfst_ghost' on this host"),
    (None, "nobody,dfst_ghost", "--default-user/--allow-users: no user 'dfst_ghost' on this host"),
    (None, "root", "--allow-users: root is root; only root may deploy instances that run as root"),
    ("root", "", "--default-user: root is root (uid 0); name an unprivileged user, or leave it out (then instances "
                 "without a user run as deployfs itself, and only root may deploy them)"),
    ("0", "", "--default-user: 0 is root (uid 0); name an unprivileged user, or leave it out (then instances "
              "without a user run as deployfs itself, and only root may deploy them)"),
])
def test_bad_names_are_a_setup_error(default, allow, reason):
    with pytest.raises(SetupError) as e:
        user_policy(default, allow)
    assert str(e.value) == reason


def test_serve_refuses_default_user_root_at_start(tmp_path):
    """Issue 16 fix 6, with the real command: refused before anything is mounted."""
    import subprocess
    import sys
    (tmp_path / "mnt").mkdir()
    r = subprocess.run([sys.executable, "-m", "deployfs", "serve", str(tmp_path / "mnt"), "--state",
                        str(tmp_path / "s"), "--default-user", "root"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "--default-user: root is root (uid 0)" in r.stderr
    assert not os.path.ismount(tmp_path / "mnt")
