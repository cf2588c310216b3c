"""A manifest edit takes effect when the file is closed, never one write() at a time (real mount)."""

import errno
import os
import shlex

import pytest

from tests import mount as _mount

V1 = "image /bin/sleep\nargs infinity\nreplicas 1\nhealth_interval 0.2\n"
V2 = "image /bin/sleep\nargs infinity\nreplicas 2\nhealth_interval 0.2\n"


def test_an_open_edit_is_invisible_until_close_and_apply_deploys_the_old_bytes(mnt, tmp_path):
    mnt.write_manifest("web", V1)
    out = tmp_path / "seen"
    out.mkdir()
    os.mkfifo(out / "ready")
    os.mkfifo(out / "go")
    half, rest = shlex.quote(V2[:20]), shlex.quote(V2[20:])
    # A writer holds the manifest open (O_TRUNC) across partial writes, blocked in the middle.
    # Builtins only, and no redirection of its stdout: `cmd >&3` or a child would close a
    # duplicate of the descriptor, and every close(2) commits (docs/namespace.md).
    script = f"""
    {{ printf %s {half}; : 4> {out}/ready; read -r _ < {out}/go; printf %s {rest}; }} > manifests/web &
    writer=$!
    read -r _ < {out}/ready
    cat manifests/web > {out}/during
    echo 'apply web' > ctl || exit 7
    cat active/web/wait > /dev/null
    echo go > {out}/go
    wait $writer
    cat manifests/web > {out}/after
    """
    mnt.sh(script, check=True, timeout=30)
    assert (out / "during").read_text() == V1  # neither truncated nor half-written
    assert mnt.read("active/web/manifest") == V1  # the apply raced the edit: it deployed the old version
    assert (out / "after").read_text() == V2
    assert mnt.ctl("apply web").returncode == 0
    mnt.until(lambda: mnt.read("active/web/manifest") == V2, what="the closed edit deployed")
    assert mnt.ctl("stop", "web").returncode == 0


def test_a_handle_reads_its_own_edit_and_each_close_commits_what_changed(mnt):
    mnt.write_manifest("web", V1)
    path = mnt.p("manifests/web")

    def committed() -> str:  # read in this process: a fork would close (FLUSH) our descriptor at exec
        with open(path) as f:
            return f.read()
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"9", V1.index("1\nhealth"))
        assert os.pread(fd, 100, 0).decode() == V1.replace("replicas 1", "replicas 9")  # its own bytes
        assert committed() == V1  # everyone else's
        os.ftruncate(fd, len("image /bin/sleep\n"))  # on the edit too, not on the manifest
        assert committed() == V1
        dup = os.dup(fd)
        os.close(dup)  # FLUSH: the edit is committed by this close
        assert committed() == "image /bin/sleep\n"
        with open(path, "w") as other:  # someone else writes after that commit...
            other.write(V2)
        os.fsync(fd)  # ...and nothing changed here since: nothing to commit
        assert committed() == V2
        os.pwrite(fd, b"image /bin/true\n", 0)
        os.fsync(fd)  # fsync commits, as close does
        assert committed() == "image /bin/true\n\n"  # its tail kept, as on a disk
    finally:
        os.close(fd)


def test_a_write_that_makes_the_manifest_too_big_fails_at_write_and_commits_nothing(mnt):
    mnt.write_manifest("web", V1)
    r = mnt.sh("head -c 70000 /dev/zero | tr '\\0' x > manifests/web")
    assert r.returncode != 0 and "File too large" in r.stderr
    assert mnt.read("manifests/web") == V1  # not emptied by O_TRUNC, not the first 64 KiB
    fd = os.open(mnt.p("manifests/web"), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"image /bin/true\n")
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", 70000)
        assert e.value.errno == errno.EFBIG
    finally:
        with pytest.raises(OSError) as e:
            os.close(fd)  # the edit was abandoned at the refused write, and close says so again
    assert e.value.errno == errno.EFBIG
    assert mnt.read("manifests/web") == V1


def test_on_a_full_disk_close_says_enospc_and_the_old_bytes_stay(tmp_path):
    from tests.disk import fill, free, small_disk
    with small_disk(str(tmp_path / "disk")) as disk:
        m = _mount.start(str(tmp_path), state=os.path.join(disk, "state"))
        try:
            m.write_manifest("web", V1)
            fd = os.open(m.p("manifests/web"), os.O_WRONLY | os.O_TRUNC)
            closed = False
            try:
                os.write(fd, V2.encode())  # the disk still has room: accepted, kept in the open file
                fill(disk)
                with pytest.raises(OSError) as e:
                    closed = True
                    os.close(fd)
                assert e.value.errno == errno.ENOSPC
            finally:
                if not closed:
                    os.close(fd)
            assert m.read("manifests/web") == V1
            # Now the store knows its disk is full: a write is refused at once, before any close.
            r = m.sh("echo 'replicas 3' >> manifests/web")
            assert r.returncode != 0 and "No space left on device" in r.stderr
            assert m.read("manifests/web") == V1
            free(disk)
            m.write_manifest("web", V2)
            assert m.read("manifests/web") == V2
        finally:
            _mount.stop(m)


def test_appends_that_overlap_in_time_all_land_whole(mnt):
    # `>>` from ten shells at once, and one descriptor opened for append before another's append
    # commits: on a disk every line survives, none is cut or padded with NULs
    mnt.write_manifest("web", "image /bin/sleep\n")
    mnt.sh("for i in $(seq 1 10); do echo \"env K$i=1\" >> manifests/web & done; wait", check=True, timeout=30)
    lines = mnt.read("manifests/web").splitlines()
    assert lines[0] == "image /bin/sleep" and sorted(lines[1:]) == sorted(f"env K{i}=1" for i in range(1, 11))
    path = mnt.p("manifests/web")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        mnt.sh("echo 'env B=2' >> manifests/web", check=True)  # commits while fd is open
        os.write(fd, b"env A=1\n")
    finally:
        os.close(fd)
    text = mnt.read("manifests/web")
    assert "\0" not in text and text.endswith("env B=2\nenv A=1\n")
