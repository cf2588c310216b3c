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
])
def test_bad_names_are_a_setup_error(default, allow, reason):
    with pytest.raises(SetupError) as e:
        user_policy(default, allow)
    assert str(e.value) == reason
