"""Who may run what as whom: the policy with real users from useradd."""

import os

import pytest

from deployfs.model.errors import CommandError, Kind
from deployfs.model.manifest import ManifestError, parse
from deployfs.node.identity import UserPolicy, deployer_uid, resolve
from tests.users import ALICE, BOB, EXTRA, extra_gid, made_users

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="useradd needs root")


@pytest.fixture(scope="module")
def users():
    with made_users() as u:
        yield u


def check(policy: UserPolicy, text: str, deployer: int | None) -> None:
    policy.check(parse("image /bin/sleep\n" + text, name="web"), "manifests/web", deployer)


def refused(policy: UserPolicy, text: str, deployer: int | None) -> str:
    with pytest.raises(CommandError) as e:
        check(policy, text, deployer)
    assert e.value.kind is Kind.PERMISSION
    return e.value.message


def test_resolve_gives_uid_gid_and_the_groups_of_the_database(users):
    ident = resolve(ALICE)
    assert (ident.uid, ident.gid) == (users[ALICE].pw_uid, users[ALICE].pw_gid)
    assert set(ident.groups) == {users[ALICE].pw_gid, extra_gid()}
    assert resolve(ALICE, EXTRA).gid == extra_gid() and resolve(str(users[BOB].pw_uid)).user == BOB


def test_an_unknown_user_or_group_refuses_the_manifest_with_its_line(users):
    for text, line, reason in [("args 1\nuser dfst_ghost\n", 3, "no user 'dfst_ghost' on this host"),
                               (f"user {ALICE}\ngroup dfst_ghost\n", 3, "no group 'dfst_ghost' on this host")]:
        with pytest.raises(ManifestError) as e:
            check(UserPolicy(), text, 0)
        assert (e.value.line, e.value.reason) == (line, reason)
        assert str(e.value) == f"manifests/web line {line}: {reason}"


def test_root_may_name_anyone(users):
    for text in ("", "user root\n", f"user {ALICE}\n", f"user {BOB}\ngroup {EXTRA}\n"):
        check(UserPolicy(), text, 0)


def test_a_non_root_deployer_never_runs_anything_as_root(users):
    alice = users[ALICE].pw_uid
    assert "names no user and deployfs has no --default-user" in refused(UserPolicy(), "", alice)
    assert "user root: the instance would run as root" in refused(UserPolicy(allow_users=frozenset({"root"})),
                                                                  "user root\n", alice)
    assert "would run as root" in refused(UserPolicy(), "user 0\n", None)  # who it is unknown: not root


def test_a_non_root_deployer_runs_as_itself_an_allowed_user_or_the_default(users):
    alice, bob = users[ALICE].pw_uid, users[BOB].pw_uid
    check(UserPolicy(), f"user {ALICE}\n", alice)  # itself
    assert f"uid={alice} may run instances only as itself or as one of --allow-users (none)" in \
        refused(UserPolicy(), f"user {BOB}\n", alice)
    check(UserPolicy(allow_users=frozenset({BOB})), f"user {BOB}\n", alice)
    check(UserPolicy(default_user=BOB), "", alice)  # the operator's choice, not the deployer's
    check(UserPolicy(default_user=BOB), "", bob)


def test_a_non_root_deployer_may_pick_only_a_group_the_user_is_in(users):
    alice, bob = users[ALICE].pw_uid, users[BOB].pw_uid
    check(UserPolicy(), f"user {ALICE}\ngroup {EXTRA}\n", alice)
    assert f"group {EXTRA}: {BOB} is not a member" in refused(UserPolicy(), f"user {BOB}\ngroup {EXTRA}\n", bob)
    assert "group root" in refused(UserPolicy(), f"user {BOB}\ngroup root\n", bob)


def test_deployer_uid_from_who():
    assert [deployer_uid(w) for w in ("uid=0", "uid=1000", "test", "uid=x")] == [0, 1000, None, None]


def test_the_default_user_is_recorded_and_may_be_named_back_by_a_deployer(users):
    """A version records the user --default-user chose; rolling back to it (a manifest that
    names that user) is allowed to the non-root deployer who could have omitted it."""
    policy = UserPolicy(default_user=BOB)
    parsed, text = policy.record(parse("image /bin/sleep\n", name="web"), "image /bin/sleep\n", "web")
    assert parsed.manifest.user == BOB and text.endswith(f"user {BOB}  # --default-user when applied\n")
    alice = users[ALICE].pw_uid
    policy.check(parsed, "manifests/web", alice)
    assert "may run instances only as itself" in refused(UserPolicy(), f"user {BOB}\n", alice)
    # A manifest that names its user is recorded as written.
    named = parse(f"image /bin/sleep\nuser {ALICE}\n", name="web")
    assert policy.record(named, "t", "web") == (named, "t")
