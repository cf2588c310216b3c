"""The view driven directly, as a front end would: paths, handles, bytes, callers and error kinds."""

import pytest
import trio

from deployfs.model.errors import CommandError, Error, Kind
from deployfs.view.access import Who
from deployfs.view.files import OpenMode
from deployfs.view.namespace import MAX_WAITERS_PER_UID
from tests.control.harness import manifest

OWNER = Who(1000, 1000)
OTHER = Who(2000, 2000)
READ, WRITE = OpenMode(), OpenMode(write=True)


def kind(fn, *args, **kw) -> Kind:
    with pytest.raises(Error) as e:
        fn(*args, **kw)
    return e.value.kind


async def akind(fn, *args, **kw) -> Kind:
    with pytest.raises(Error) as e:
        await fn(*args, **kw)
    return e.value.kind


async def cat(ns, *path: str) -> bytes:
    h = ns.resolve(path).open(OWNER, READ)
    try:
        return await h.read(0, 65536)
    finally:
        h.release()


async def deploy(h, ns, text=None) -> str:
    h.write(text or manifest(replicas=1))
    ctl = ns.resolve(("ctl",)).open(OWNER, WRITE)
    assert await ctl.write(0, b"apply web\n") == 10
    await ns.source.settled()  # as a front end does before it answers a write
    assert (await ctl.read(10, 100)).startswith(b"ok deployed ")
    return (await cat(ns, "active", "web", "wait")).decode()


async def test_ctl_wait_and_state_files(h, ns, autojump_clock):
    assert (await deploy(h, ns)).startswith("done ")
    version = h.svc.rec.version
    assert await cat(ns, "active", "web", "version") == f"{version}\n".encode()
    assert ns.resolve(("active", "web", "version")).stat().size == len(version) + 1
    assert (await cat(ns, "active", "web", "instances", "0")).startswith(b"node=")
    assert ns.resolve(("active",)).names() == ["web"]


async def test_a_refused_command_is_a_kind_with_its_reply_and_event(h, ns, autojump_clock):
    await deploy(h, ns)
    ctl = ns.resolve(("active", "web", "ctl")).open(OWNER, WRITE)
    with pytest.raises(CommandError) as e:
        await ctl.write(0, b"pause\n")
    assert e.value.kind is Kind.BUSY
    assert await ctl.read(0, 100) == b"error: web: no rollout in flight to pause (update_status none)\n"
    assert any("command refused (uid=1000)" in line for line in h.events())
    assert await akind(ctl.write, 0, b"frobnicate\n") is Kind.INVALID
    assert await akind(ns.resolve(("ctl",)).open(OWNER, WRITE).write, 0, b"apply nosuch\n") is Kind.NOT_FOUND


async def test_a_blocked_wait_is_cancelled_by_its_front_end(h, ns, autojump_clock):
    await deploy(h, ns, manifest(replicas=2))
    h.write(manifest(replicas=2, image="/bin/v2", update_pause=600))  # stays in flight: a long pause after batch 1
    h.cmd("apply")
    await ns.source.settled()  # the view reads the records: once they show the apply
    w = ns.resolve(("active", "web", "wait")).open(OWNER, READ)
    assert ns.waits.total == 1
    assert not w.readable()
    with trio.move_on_after(5) as scope:  # what FUSE's interrupt or 9P's Tflush does
        await w.read(0, 100)
    assert scope.cancelled_caught
    nb = ns.resolve(("active", "web", "wait")).open(OWNER, OpenMode(nonblock=True))
    with pytest.raises(Error) as e:
        await nb.read(0, 100)
    assert e.value.kind is Kind.WOULD_BLOCK
    nb.release()
    async with trio.open_nursery() as n:  # the cancelled read left the handle usable: one blocked read at a time
        n.start_soon(w.read, 0, 100)
        await trio.sleep(1)
        with pytest.raises(Error) as e:
            await w.read(0, 100)
        assert e.value.kind is Kind.BUSY
        h.cmd("pause")
        h.cmd("rollback")
    w.release()
    w.release()  # twice is once
    assert ns.waits.total == 0


async def test_wait_readers_are_capped_per_uid_for_readers_only(h, ns, autojump_clock):
    await deploy(h, ns)
    wait = ns.resolve(("active", "web", "wait"))
    held = [wait.open(OTHER, READ) for _ in range(MAX_WAITERS_PER_UID)]
    assert kind(wait.open, OTHER, READ) is Kind.BUSY
    more = wait.open(OWNER, READ)  # one who may write answers to the total only
    for x in (*held, more):
        x.release()
    assert ns.waits.total == 0 and ns.waits.by_uid == {}


async def test_who_may_write(h, ns, autojump_clock):
    await deploy(h, ns)
    assert kind(ns.resolve(("ctl",)).open, OTHER, READ) is Kind.PERMISSION
    assert kind(ns.resolve(("manifests", "web")).open, OTHER, WRITE) is Kind.PERMISSION
    assert kind(ns.resolve(("manifests",)).create, OTHER, b"x", False, False) is Kind.PERMISSION
    assert kind(ns.resolve(("active", "web", "version")).open, OWNER, WRITE) is Kind.PERMISSION
    assert kind(ns.resolve(("active", "web", "version")).setattr, OWNER, 0, False) is Kind.NOT_PERMITTED
    assert kind(ns.resolve(("manifests", "web")).setattr, OTHER, None, False) is Kind.NOT_PERMITTED
    assert (await ns.resolve(("manifests", "web")).open(OTHER, READ).read(0, 5)) == b"image"
    assert await akind(ns.resolve(("manifests", "web")).open(OWNER, READ).write, 0, b"x") is Kind.BAD_HANDLE


async def test_names_and_manifests(h, ns, autojump_clock):
    await deploy(h, ns)
    root, mdir = ns.resolve(()), ns.resolve(("manifests",))
    assert kind(root.lookup, b"a" * 256) is Kind.NAME_TOO_LONG
    assert kind(root.lookup, b"nope") is Kind.NOT_FOUND
    assert kind(ns.resolve(("active", "web")).lookup, b"events@0") is Kind.NOT_FOUND  # an inode's own name
    assert kind(ns.resolve(("active", "web", "version")).lookup, b"x") is Kind.NOT_A_DIRECTORY
    assert kind(mdir.create, OWNER, b"web", True, False) is Kind.EXISTS
    assert kind(mdir.create, OWNER, b"a/b", False, False) is Kind.INVALID
    name, entry, fh = mdir.create(OWNER, b"api", False, False)
    await ns.source.settled()  # as a front end does before it answers a write
    assert name == "api" and entry.stat().size == 0
    assert await akind(fh.write, 1 << 20, b"x") is Kind.TOO_BIG
    assert await akind(fh.write, 0, b"x") is Kind.TOO_BIG  # a refused write abandons the edit: nothing more is taken
    assert kind(fh.commit) is Kind.TOO_BIG  # and close says so, committing nothing
    fh = entry.open(OWNER, WRITE)
    assert await fh.write(0, b"image x\n") == 8
    await ns.source.settled()
    # What a handle writes is its own until it is closed: readers see the committed (empty) bytes.
    assert await fh.read(0, 100) == b"image x\n" and entry.stat().size == 0
    fh.commit()
    await ns.source.settled()
    assert entry.stat().size == 8
    assert kind(mdir.rename, OWNER, b"api", b"web", noreplace=True) is Kind.EXISTS
    assert kind(mdir.rename, OWNER, b"api", b"web", elsewhere=True) is Kind.CROSS_DIRECTORY
    assert mdir.rename(OWNER, b"api", b"api2") == ("api", "api2")
    await ns.source.settled()
    assert await ns.resolve(("manifests", "api2")).open(OWNER, READ).read(0, 100) == b"image x\n"
    assert mdir.unlink(OWNER, b"api2") == "api2"
    await ns.source.settled()
    assert kind(mdir.unlink, OWNER, b"api2") is Kind.NOT_FOUND


async def test_events_follow_waits_for_the_next_event_and_is_cancellable(h, ns, autojump_clock):
    await deploy(h, ns)
    events = ns.resolve(("active", "web", "events")).open(OWNER, READ)
    end = ns.resolve(("active", "web", "events")).stat().size
    assert (await events.follow(0, 10)) == (await events.read(0, 10))  # bytes there: at once
    with trio.move_on_after(5) as scope:  # nothing new: it waits until its front end gives up
        await events.follow(end, 4096)
    assert scope.cancelled_caught
    got = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _follow(events, end, got))
        await trio.sleep(1)
        h.cmd("scale", "2")
    assert got[-1].split(b"\n")[0].endswith(b" scaled to 2 by uid=0"), got  # (and whatever came with it)


async def _follow(handle, off, out):
    out.append(await handle.follow(off, 4096))


async def test_an_instance_record_from_before_nodes_shows_this_node(h, ns, autojump_clock):
    from deployfs.state.kv import Put
    from deployfs.state.records import InstanceRecord, ServiceRecord, encode, instance_key, service_key
    old = InstanceRecord("old", 1, 0, "v1", pid=123, state="running")  # node "": written before nodes were
    await h.store.kv.txn([], [Put(service_key("old"), encode(ServiceRecord("old", version="v1", replicas=1))),
                              Put(instance_key("old", 1), encode(old))])
    await ns.source.settled()
    assert (await cat(ns, "active", "old", "instances", "0")).startswith(f"node={h.engine.node} ".encode())
