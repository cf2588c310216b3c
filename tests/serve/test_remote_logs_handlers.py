"""Another node's logs through the FUSE handlers, without a mount: the records name where each
instance runs, n2's log server (node/logserver.py, a real socket on 127.0.3.4) serves its files,
and the view finds them -- a running instance's by its record, a gone instance's kept log
(logs/failed-N) on whichever node has it -- and `ls -l` asks n2 once for all of them."""

import errno

import pyfuse3
import pytest
import trio

from deployfs.node.logserver import LogServer
from deployfs.serve.fuse import Access, DeployFS
from deployfs.serve.local import local_source
from deployfs.state.logclient import RemoteLogs
from deployfs.state.records import InstanceRecord, NodeRecord, ServiceRecord
from tests.control.harness import Harness
from tests.serve.test_handlers import cat, ctx, lookup

ADDRESS = "127.0.3.4"


@pytest.fixture
async def two(tmp_path, nursery):
    """n1's view (no engine running: the records are written here) and n2's log server."""
    logs = tmp_path / "n2-logs" / "web"
    logs.mkdir(parents=True)
    (logs / "7.log").write_bytes(b"seven runs on n2\n")
    (logs / "9.log.1").write_bytes(b"nine failed")
    (logs / "9.log").write_bytes(b" on n2\n")
    server = LogServer(str(tmp_path / "n2-logs"), ADDRESS, 0)
    n2 = trio.CancelScope()  # cancelled: n2 is gone

    async def serve(*, task_status=trio.TASK_STATUS_IGNORED):
        with n2:
            await server.run(task_status=task_status)
    await nursery.start(serve)
    h = Harness(tmp_path / "n1")
    h.local(node="n1", address="127.0.3.5")
    store = h.store
    store.put_node(NodeRecord("n1", "127.0.3.5"))
    store.put_node(NodeRecord("n2", ADDRESS, log_port=server.port))
    store.put_service(ServiceRecord("web", replicas=1, kept_logs={"failed-0": 9}))
    store.put_instance(InstanceRecord("web", 7, 0, "v1", node="n2", address=ADDRESS, state="running"))
    remote = RemoteLogs()
    source, cache = local_source(h.node, remote_logs=remote)
    await nursery.start(cache.run)
    yield DeployFS(source, access=Access(uid=1000, gid=1000)), remote, n2
    await remote.aclose()


async def listing(fs, *names):
    """readdir as `ls -l` gets it: names with their attributes."""
    fh = await fs.opendir(await lookup(fs, *names), ctx())
    got = {}

    def reply(token, name, attrs, next_id):
        got[name.decode()] = attrs.st_size
        return True
    real, pyfuse3.readdir_reply = pyfuse3.readdir_reply, reply
    try:
        await fs.readdir(fh, 0, None)
    finally:
        pyfuse3.readdir_reply = real
        await fs.releasedir(fh)
    return got


async def test_a_running_instance_and_a_kept_log_are_read_from_the_node_that_has_them(two):
    fs, remote, _ = two
    assert await cat(fs, "active", "web", "logs", "0") == b"seven runs on n2\n"
    assert await cat(fs, "active", "web", "logs", "failed-0") == b"nine failed on n2\n"
    attrs = await fs.lookup(await lookup(fs, "active", "web", "logs"), b"failed-0", ctx())
    assert attrs.st_size == len(b"nine failed on n2\n")


async def test_ls_l_asks_the_owner_once_for_all_of_its_logs(two):
    fs, remote, _ = two
    before = remote.requests
    assert await listing(fs, "active", "web", "logs") == {".": 0, "..": 0, "0": 17, "failed-0": 18}
    assert remote.requests - before == 1


async def test_the_owner_gone_is_eio_and_the_listing_leaves_its_logs_out(two):
    fs, remote, n2 = two
    assert await cat(fs, "active", "web", "logs", "0") == b"seven runs on n2\n"
    n2.cancel()  # its listener and the connection the client keeps close
    await trio.sleep(remote.ttl)
    logs = await lookup(fs, "active", "web", "logs")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.lookup(logs, b"0", ctx())
    assert e.value.errno == errno.EIO
    assert "0" not in await listing(fs, "active", "web", "logs")
