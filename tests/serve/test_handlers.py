"""Handler logic without a mount: the Operations object called directly."""

import errno
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from deployfs.serve.fuse import Access, DeployFS
from deployfs.serve.local import local_source
from tests.control.harness import Harness, manifest

ROOT = pyfuse3.ROOT_INODE


def ctx(uid=0, gid=0, pid=None):
    return SimpleNamespace(uid=uid, gid=gid, pid=pid or os.getpid(), umask=0o022)


@pytest.fixture
async def fs(tmp_path, nursery):
    h = Harness(tmp_path)
    await nursery.start(h.node.run)
    source, cache = local_source(h.node)
    await nursery.start(cache.run)
    return DeployFS(source, access=Access(uid=1000, gid=1000))


async def lookup(fs, *names):
    ino = ROOT
    for n in names:
        ino = (await fs.lookup(ino, n.encode(), ctx())).st_ino
    return ino


async def cat(fs, *names):
    fi = await fs.open(await lookup(fs, *names), os.O_RDONLY, ctx())
    try:
        return await fs.read(fi.fh, 0, 65536)
    finally:
        await fs.release(fi.fh)


async def test_root_listing_and_modes(fs):
    assert (await fs.getattr(ROOT, ctx())).st_mode & stat.S_IFDIR
    ctl = await fs.lookup(ROOT, b"ctl", ctx())
    assert stat.S_IMODE(ctl.st_mode) == 0o600 and ctl.st_uid == 1000
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.lookup(ROOT, b"nope", ctx())
    assert e.value.errno == errno.ENOENT


async def test_write_then_apply_through_ctl(fs, autojump_clock):
    mdir = await lookup(fs, "manifests")
    fi, attrs = await fs.create(mdir, b"web", 0o644, os.O_WRONLY | os.O_CREAT, ctx())
    await fs.write(fi.fh, 0, manifest(replicas=1))
    await fs.release(fi.fh)
    fi = await fs.open(await lookup(fs, "ctl"), os.O_RDWR, ctx())
    assert await fs.write(fi.fh, 0, b"apply web\n") == 10
    assert (await fs.read(fi.fh, 0, 100)).startswith(b"ok deployed ")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.write(fi.fh, 0, b"apply ../etc\n")
    assert e.value.errno == errno.EINVAL
    assert await fs.read(fi.fh, 0, 100) == b"error: bad service name '../etc'\n"
    await fs.release(fi.fh)
    with trio.fail_after(30):
        assert await cat(fs, "active", "web", "wait") == b"done " + (await cat(fs, "active", "web", "version"))


async def test_state_files_refuse_writes_and_strangers_refused_ctl(fs):
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.open(await lookup(fs, "ctl"), os.O_WRONLY, ctx(uid=4242, gid=4242))
    assert e.value.errno == errno.EACCES
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.create(await lookup(fs, "manifests"), b"x", 0o644, os.O_WRONLY, ctx(uid=4242, gid=4242))
    assert e.value.errno == errno.EACCES


async def test_o_trunc_is_honoured_at_open(fs):
    mdir = await lookup(fs, "manifests")
    fi, _ = await fs.create(mdir, b"m", 0o644, os.O_WRONLY, ctx())
    await fs.write(fi.fh, 0, b"a long first version\n")
    await fs.release(fi.fh)
    fi = await fs.open(await lookup(fs, "manifests", "m"), os.O_WRONLY | os.O_TRUNC, ctx())
    await fs.write(fi.fh, 0, b"short\n")
    await fs.release(fi.fh)
    assert await cat(fs, "manifests", "m") == b"short\n"


async def test_unexpected_exception_becomes_eio(fs, monkeypatch):
    monkeypatch.setattr(fs.ns, "resolve", lambda path: 1 / 0)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.getattr(ROOT, ctx())
    assert e.value.errno == errno.EIO


async def test_inodes_are_dropped_when_the_kernel_forgets(fs):
    before = len(fs._paths)
    inos = {(await fs.lookup(ROOT, b"manifests", ctx())).st_ino for _ in range(3)}
    assert len(inos) == 1 and len(fs._paths) == before + 1
    ino = inos.pop()
    await fs.forget([(ino, 2)])
    assert ino in fs._paths  # the kernel still holds one reference
    await fs.forget([(ino, 1)])
    assert len(fs._paths) == before and len(fs._inos) == before
    await fs.forget([(ROOT, 1), (12345, 1)])  # never the root; unknown inodes are no error
    assert (await fs.getattr(ROOT, ctx())).st_ino == ROOT


def test_every_error_kind_has_its_errno():
    from deployfs.model.errors import Kind
    from deployfs.serve.fuse import ERRNO
    assert set(ERRNO) == set(Kind) and len(set(ERRNO.values())) == len(Kind)
