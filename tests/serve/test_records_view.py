"""The view reads the records (through the cache the store's watch feeds), not the engine.

A real FUSE mount served from this process, so the test can write into the very store the view
reads: records put straight into the store with a transaction -- the engine never told, not even
running -- are what `cat` and `ls` show.  (Run under the test lock: it mounts.)
"""

import os

import pyfuse3
import pytest
import trio

from deployfs.serve.fuse import Access, DeployFS
from deployfs.serve.local import LocalNode, local_source
from deployfs.state.kv import Delete, Put
from deployfs.state.records import InstanceRecord, ServiceRecord, encode, instance_key, service_key
from deployfs.state.store import SqliteStore
from tests.fakes import FakeProber, FakeRuntime

MANIFEST = "image /bin/sleep\nargs infinity\nreplicas 2\n"


@pytest.fixture
async def mounted(tmp_path):
    store = SqliteStore(str(tmp_path / "state"))
    rt = FakeRuntime()
    node = LocalNode(store, rt, FakeProber(rt))  # never run: it knows no service, whatever the records say
    source, cache = local_source(node)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ops = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            ops = DeployFS(source, access=Access())
            pyfuse3.init(ops, str(mnt), set(pyfuse3.default_options) | {"fsname=deployfs-test"})
            ops.mounted = True
            nursery.start_soon(pyfuse3.main)
            try:
                yield store, node.engine, str(mnt)
            finally:
                pyfuse3.terminate()
                nursery.cancel_scope.cancel()
    finally:
        if ops is not None and ops.mounted:
            pyfuse3.close(unmount=True)
        store.close()


async def sh(cmd: str, cwd: str) -> str:
    """A real shell's view of the mount (in a child: this process serves the requests meanwhile)."""
    r = await trio.run_process(["bash", "-c", cmd], cwd=cwd, capture_stdout=True, capture_stderr=True, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


async def test_a_record_put_straight_into_the_store_is_what_cat_shows(mounted):
    store, engine, mnt = mounted
    assert await sh("ls active", mnt) == ""
    svc = ServiceRecord("web", version="v1", manifest=MANIFEST, replicas=2, update_status="rolling")
    inst = InstanceRecord("web", 7, 0, "v1", pid=os.getpid(), port=20850, node="n2", address="10.0.0.2",
                          state="running", health="healthy", phase="ready")
    await store.kv.txn([], [Put(service_key("web"), encode(svc)), Put(instance_key("web", 7), encode(inst))])
    assert not engine.services  # the engine was never told
    out = await sh("ls active; cat active/web/status active/web/instances/0 active/web/endpoints", mnt)
    assert out.startswith("web\nservice web\nversion v1\n")
    assert "update_status rolling\nupdate_progress 1/2\nreplicas 2\nrunning 1\nhealth degraded\n" in out
    assert f"node=n2 address=10.0.0.2 slot=0 version=v1 state=running health=healthy pid={os.getpid()} port=20850" in out
    assert out.endswith("10.0.0.2:20850\n")

    # Another writer's next revision: an instance exits, the rollout completes.
    inst.state, inst.phase, inst.health = "exited", "exited", "stopped"
    svc.update_status = "none"
    await store.kv.txn([], [Put(service_key("web"), encode(svc)), Put(instance_key("web", 7), encode(inst))])
    out = await sh("cat active/web/health active/web/wait active/web/endpoints; cat active/web/instances/0", mnt)
    assert out.startswith("unhealthy\ndone v1\n") and " pid=- " in out  # a dead process shows no pid

    await store.kv.txn([], [Delete(service_key("web")), Delete("instances/web/", prefix=True)])
    assert await sh("ls active", mnt) == ""


SLEEPY = "image /bin/sleep\nargs {}\nreplicas 2\nhealth_interval 0.2\nupdate_pause 600\n"


def test_a_cat_right_after_an_echo_reads_the_commands_effect(mnt):
    """Read-your-writes through a real `deployfs serve`: 100 commands, each followed at once by a
    `cat status` in the same shell, and not one stale answer (the view's cache is fed by the watch,
    a scheduling step after commit: the ctl write is answered only once the cache shows it)."""
    mnt.write_manifest("rw", SLEEPY.format("1000"))
    assert mnt.ctl("apply rw").returncode == 0
    mnt.until(lambda: mnt.read("active/rw/wait").startswith("done"), what="deploy")
    mnt.write_manifest("rw", SLEEPY.format("2000"))  # a rollout that holds: 600 s after its first batch
    assert mnt.ctl("apply rw").returncode == 0
    out = mnt.sh("for i in $(seq 50); do echo pause > active/rw/ctl; cat active/rw/status; "
                 "echo resume > active/rw/ctl; cat active/rw/status; done", timeout=60, check=True).stdout
    seen = [line.split()[1] for line in out.splitlines() if line.startswith("update_status ")]
    assert seen == ["paused", "rolling"] * 50
