"""The state directory is private, and trusted only if nobody else could have written it.

Real files, a real second user (nobody, through setpriv) and real symlinks.
"""

import errno
import os
import stat

import pytest

from deployfs.state import statedir
from deployfs.state.statedir import StateDirError, open_file, prepare
from tests.conftest import as_nobody


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_open_file_never_follows_a_link_and_creates_owner_only(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("IMPORTANT\n")
    (tmp_path / "router.pid").symlink_to(victim)
    with pytest.raises(OSError) as e:
        open_file(str(tmp_path / "router.pid"), "w")
    assert e.value.errno == errno.ELOOP and "symbolic link" in str(e.value)
    assert victim.read_text() == "IMPORTANT\n"
    with open_file(str(tmp_path / "new.log"), "ab") as f:
        f.write(b"x")
    assert mode(tmp_path / "new.log") == 0o600


def test_the_resolved_path_is_the_one_used(tmp_path):
    # --state through a link: what was checked is the directory itself, and deployfs uses that
    # path from then on, so re-pointing the link later cannot lead it to another directory.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    used = prepare(str(tmp_path / "link" / "state"))
    assert used == str(tmp_path / "real" / "state") and mode(used) == 0o700
    (tmp_path / "link").unlink()
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "other")
    assert prepare(used) == used and not (tmp_path / "other" / "state").exists()


def test_a_new_state_dir_is_owner_only(tmp_path):
    prepare(str(tmp_path / "a" / "state"))
    assert mode(tmp_path / "a" / "state") == 0o700


def test_readable_by_others_is_tightened_and_logged(tmp_path, caplog):
    s = tmp_path / "state"
    (s / "logs" / "web").mkdir(parents=True)
    (s / "deployfs.db").write_text("")
    (s / "logs" / "web" / "1.log").write_text("secret\n")
    for p in (s, s / "logs", s / "logs" / "web"):
        p.chmod(0o755)
    (s / "logs" / "web" / "1.log").chmod(0o644)
    prepare(str(s))
    assert [mode(p) for p in (s, s / "logs", s / "logs" / "web", s / "logs" / "web" / "1.log", s / "deployfs.db")] \
        == [0o700, 0o700, 0o700, 0o600, 0o600]
    assert "are now owner-only" in caplog.text


def test_a_state_dir_written_by_another_user_is_refused(public_tmp):
    shared = public_tmp / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    as_nobody("mkdir", str(shared / "state"))
    as_nobody("touch", str(shared / "state" / "deployfs.db"))
    with pytest.raises(StateDirError, match=r"belongs to nobody, not to root who runs deployfs.*chown -R"):
        prepare(str(shared / "state"))


def test_a_file_planted_by_another_user_is_refused(public_tmp):
    s = public_tmp / "state"
    s.mkdir()
    (s / "deployfs.db").write_text("")
    (s / "logs").mkdir()
    s.chmod(0o711)
    (s / "logs").chmod(0o777)  # for a moment: long enough to plant a file
    as_nobody("touch", str(s / "logs" / "planted"))
    s.chmod(0o700)
    (s / "logs").chmod(0o700)
    with pytest.raises(StateDirError, match="planted belongs to nobody"):
        prepare(str(s))


def test_writable_by_others_is_refused_and_nothing_changes(tmp_path):
    s = tmp_path / "state"
    s.mkdir()
    (s / "deployfs.db").write_text("")
    (s / "deployfs.db").chmod(0o666)
    s.chmod(0o755)
    with pytest.raises(StateDirError, match=r"deployfs.db is writable by its group.*chmod -R go-w"):
        prepare(str(s))
    assert mode(s) == 0o755 and mode(s / "deployfs.db") == 0o666  # refused before tightening anything


@pytest.mark.parametrize("name", ["router.pid", "router.log", "logs/web/1.log"])
def test_a_planted_symlink_is_refused(tmp_path, name):
    s = tmp_path / "state"
    (s / "logs" / "web").mkdir(parents=True)
    (s / "deployfs.db").write_text("")
    (s / name).symlink_to(tmp_path / "victim")
    with pytest.raises(StateDirError, match=f"{name} is a symbolic link"):
        prepare(str(s))


def test_a_parent_others_can_change_is_refused(tmp_path):
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)  # not sticky: anyone could swap the state dir
    with pytest.raises(StateDirError, match="a parent of the state directory, is writable by other users"):
        prepare(str(tmp_path / "open" / "state"))
    (tmp_path / "open").chmod(0o1777)  # sticky, as /tmp: fine
    prepare(str(tmp_path / "open" / "state"))


def test_a_directory_deployfs_did_not_make_is_never_touched(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "other.conf").write_text("x")
    (tmp_path / "lib" / "other.conf").chmod(0o644)
    with pytest.raises(StateDirError, match="holds no deployfs.db"):
        prepare(str(tmp_path / "lib"))
    assert mode(tmp_path / "lib" / "other.conf") == 0o644


def test_makedirs_is_owner_only(tmp_path):
    statedir.makedirs(str(tmp_path / "logs" / "web"))
    assert mode(tmp_path / "logs") == mode(tmp_path / "logs" / "web") == 0o700


def test_instance_logs_are_never_written_or_read_through_a_link(tmp_path):
    from deployfs.node.runtime import LocalRuntime
    rt = LocalRuntime(str(tmp_path))
    path = rt.log_path("web", 1)
    statedir.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"line\n" * 50_000)  # big enough to be bounded
    victim = tmp_path / "victim"
    victim.write_text("IMPORTANT\n")
    os.symlink(victim, path + ".1")  # where the bounded tail would go
    with pytest.raises(OSError) as e:
        rt.trim_log("web", 1, 100)
    assert e.value.errno == errno.ELOOP and victim.read_text() == "IMPORTANT\n"
    with pytest.raises(OSError):
        rt.read_log("web", 1, 10)
