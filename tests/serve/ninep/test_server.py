"""The namespace over 9P2000.L from a real `deployfs serve --9p`, read by diod's own clients
(diodcat, diodls) and, for writes, flush and bounds, by the small client beside this file."""

from __future__ import annotations

import errno
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployfs.serve.ninep import codec as c
from tests import mount as _mount
from tests.mount import Mount

from .client import Client, NinepError, connect_when_up

PORT = 20200
ADDR = ("127.0.0.1", PORT)
TCP = f"127.0.0.1:{PORT}"

pytestmark = pytest.mark.skipif(shutil.which("diodcat") is None, reason="diod's clients are not installed (make test installs diod)")

# Healthy after one interval without a health line; says one line, then holds still.
SVC = "image sh\nargs -c 'echo hello from $INSTANCE; exec sleep 600'\nreplicas 1\nhealth_interval 0.2\n"


@pytest.fixture
def open_dir():
    """A directory other uids may enter (pytest's tmp_path is owner-only): only the socket's own mode decides."""
    d = tempfile.mkdtemp(prefix="deployfs-ninep-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(tmp_path):
    with _mount.running(str(tmp_path), "--9p", f"tcp!127.0.0.1!{PORT}") as m:
        yield m


def deploy(m: Mount, name: str = "web", text: str = SVC) -> None:
    m.write_manifest(name, text)
    assert m.ctl(f"apply {name}").returncode == 0
    m.until(lambda: m.read(f"active/{name}/wait").startswith("done"), what="deploy")


def diod(tool: str, *args: str, server: str = TCP, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run([tool, "-t", "10", "-s", server, "-a", "deploy", *args], capture_output=True,
                          timeout=20, **kw)  # type: ignore[call-overload]


def fuse_errno(m: Mount, path: str, data: bytes) -> tuple[int, str]:
    """What a write of ``data`` to ``path`` does over FUSE: (errno or 0, the reply read back)."""
    code = ("import os,sys\nfd=os.open(sys.argv[1],os.O_RDWR)\ntry:\n os.write(fd,sys.argv[2].encode()); e=0\n"
            "except OSError as x:\n e=x.errno\nprint(e); print(os.pread(fd,4096,0).decode(),end='')")
    r = subprocess.run([sys.executable, "-c", code, m.p(path), data.decode()], capture_output=True, text=True,
                       timeout=15, check=True)
    err, _, reply = r.stdout.partition("\n")
    return int(err), reply


def test_every_file_reads_the_same_over_9p_as_over_fuse(served):
    m = served
    deploy(m)
    m.until(lambda: "hello" in m.read("active/web/logs/0"), what="the instance's output")
    files, dirs = [], []
    for root, dnames, fnames in os.walk(m.path):
        rel = os.path.relpath(root, m.path)
        dirs.append("" if rel == "." else rel)
        files += [os.path.normpath(os.path.join(rel, f)) for f in fnames]
    assert {"ctl", "events", "manifests/web", "active/web/version", "active/web/instances/0", "active/web/logs/0",
            "active/web/wait", "active/web/ctl", "active/web/leader", "cluster"} <= set(files)
    assert any(f.startswith("nodes/") for f in files)
    for d in dirs:
        r = diod("diodls", d or "/")
        assert r.returncode == 0, r.stderr
        assert sorted(r.stdout.decode().split()) == sorted(os.listdir(m.p(d))), d
    r = diod("diodls", "-l", "active/web")
    assert r.returncode == 0, r.stderr
    modes = {line.split()[-1]: line.split()[0] for line in r.stdout.decode().splitlines()}
    for name in os.listdir(m.p("active/web")):
        assert modes[name].rstrip(".") == stat.filemode(os.stat(m.p("active/web", name)).st_mode), name
    for f in files:
        over_fuse = subprocess.run(["cat", m.p(f)], capture_output=True, timeout=15).stdout
        r = diod("diodcat", f)
        assert r.returncode == 0, (f, r.stderr)
        if f == "metrics":  # counters move between two reads: the same series, in the same order
            over_fuse, r.stdout = (re.sub(rb" [0-9.e+-]+\n", b"\n", x) for x in (over_fuse, r.stdout))
        if f.startswith("nodes/"):  # a live node is seen at every read
            over_fuse, r.stdout = (re.sub(rb"seen=\S+", b"seen=T", x) for x in (over_fuse, r.stdout))
        assert r.stdout == over_fuse, f
    with Client(ADDR) as cl:
        for f in files:
            a = cl.getattr(f)
            st = os.stat(m.p(f))
            assert (a.mode, a.size, a.uid, a.nlink) == (st.st_mode, st.st_size, st.st_uid, st.st_nlink), f


def test_manifests_are_editable_and_ctl_answers_as_over_fuse(served):
    m = served
    deploy(m)
    with Client(ADDR) as cl:
        d = cl.walk("manifests")
        cl.rpc(c.Tlcreate(d, "api", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, 0))
        assert cl.write(d, SVC.encode() + b"# scratch that runs past the end\n") > len(SVC)
        cl.clunk(d)
        with pytest.raises(NinepError) as e:
            cl.rpc(c.Tlcreate(cl.walk("manifests"), "api", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, 0))
        assert e.value.errno == errno.EEXIST
        f = cl.walk("manifests/api")
        cl.rpc(c.Tsetattr(f, c.SETATTR_SIZE, 0, 0, 0, len(SVC), 0, 0, 0, 0))  # truncate
        cl.clunk(f)
        assert m.read("manifests/api") == SVC  # FUSE sees the edit
        root = cl.walk("manifests")
        cl.rpc(c.Trenameat(root, "api", root, "api.new"))
        assert sorted(os.listdir(m.p("manifests"))) == ["api.new", "web"]
        cl.rpc(c.Trenameat(root, "api.new", root, "api"))

        # ctl: the reply is read back from the same fid; a refusal is an Rlerror with FUSE's errno.
        ctl = cl.open("ctl", os.O_RDWR)
        assert cl.write(ctl, b"apply api\n") == 10
        assert cl.read(ctl, 10).startswith(b"ok")
        node = os.listdir(m.p("nodes"))[0].encode()
        for command in (b"frobnicate api\n", b"apply nosuch\n", b"resume web\n", b"scale web many\n",
                        b"cordon nosuch\n", b"drain " + node + b"\n", b"cordon\n"):
            with pytest.raises(NinepError) as e:
                cl.write(ctl, command)
            reply = cl.read(ctl, 0).decode()
            assert reply.startswith("error: ")
            assert (e.value.errno, reply) == fuse_errno(m, "ctl", command), command
        # The node verbs, and the node's file, as over FUSE.
        assert cl.write(ctl, b"cordon " + node + b"\n") and cl.read(ctl, 0) == b"ok cordoned\n"
        assert b" state=cordoned " in cl.cat("nodes/" + node.decode())
        assert cl.cat("cluster").startswith(b"store=ok\nnodes=1\nready=0\n")
        assert cl.write(ctl, b"uncordon " + node + b"\n") and cl.read(ctl, 0) == b"ok uncordoned\n"
        assert b" state=ready " in cl.cat("nodes/" + node.decode())
        # A state file is rendered at open; events grows under an open fid.
        replicas, events = cl.open("active/web/replicas"), cl.open("active/web/events")
        seen = cl.read_all(events)
        cl.write(ctl, b"scale web 2\n")
        assert cl.read(replicas) == b"1\n" and cl.cat("active/web/replicas") == b"2\n"
        assert b"scaled to 2 by uid=0" in cl.read(events, len(seen))
        cl.clunk(ctl)
        assert "command refused (uid=0): scale: expected a whole number" in m.read("active/web/events")
        m.until(lambda: cl.cat("active/api/wait").startswith(b"done"), what="api deployed over 9P")

        for path, flags in (("active/web/version", os.O_WRONLY), ("active/web/events", os.O_RDWR)):
            with pytest.raises(NinepError) as e:
                cl.open(path, flags)
            assert e.value.errno == errno.EACCES
        cl.rpc(c.Tunlinkat(root, "api", 0))
        assert sorted(os.listdir(m.p("manifests"))) == ["web"]
        with pytest.raises(NinepError) as e:
            cl.rpc(c.Tunlinkat(root, "api", 0))
        assert e.value.errno == errno.ENOENT


def test_wait_is_a_deferred_reply_that_flush_cancels(served, tmp_path):
    m = served
    flag = tmp_path / "healthy"
    deploy(m)
    # The next version becomes healthy only once `flag` has content: the rollout is held in flight.
    m.write_manifest("web", SVC + f"health {flag}\nhealth_timeout 0.2\n")
    assert m.ctl("apply web").returncode == 0
    with Client(ADDR) as cl:
        wait = cl.open("active/web/wait")
        cl.send(5, c.Tread(wait, 0, 4096))
        assert cl.cat("active/web/update_status") == b"rolling\n"  # the connection goes on meanwhile
        assert not select.select([cl.sock], [], [], 0.3)[0]  # tag 5 is still unanswered
        cl.send(6, c.Tflush(5))
        assert cl.recv() == c.Frame(6, c.Rflush())  # and tag 5 is never answered
        second = cl.open("active/web/wait")
        cl.send(5, c.Tread(second, 0, 4096))  # the tag is free again
        flag.write_text("ok\n")
        frame = cl.recv()
        assert frame.tag == 5 and isinstance(frame.msg, c.Rread)
        assert frame.msg.data == f"done {m.read('active/web/version').strip()}\n".encode()
        assert frame.msg.data.decode() == m.read("active/web/wait")  # the same bytes as over FUSE
        assert cl.read(second, len(frame.msg.data)) == b""


def test_over_tcp_the_attach_uid_decides_what_may_be_written(served):
    m = served
    deploy(m)
    with Client(ADDR, uid=12345) as cl:
        assert cl.cat("active/web/replicas") == b"1\n"
        for path in ("ctl", "active/web/ctl"):
            with pytest.raises(NinepError) as e:
                cl.open(path, os.O_RDWR)
            assert e.value.errno == errno.EACCES
        with pytest.raises(NinepError) as e:
            cl.open("manifests/web", os.O_WRONLY)
        assert e.value.errno == errno.EACCES
        with pytest.raises(NinepError) as e:
            cl.rpc(c.Tlcreate(cl.walk("manifests"), "x", os.O_WRONLY | os.O_CREAT, 0o644, 0))
        assert e.value.errno == errno.EACCES
        with pytest.raises(NinepError) as e:
            cl.rpc(c.Tsetattr(cl.walk("manifests/web"), c.SETATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0))
        assert e.value.errno == errno.EPERM
    assert m.read("manifests/web") == SVC


def test_bounds_on_fids_requests_and_connections_and_garbage(served):
    from deployfs.serve.ninep import server as srv
    m = served
    deploy(m)
    with Client(ADDR) as cl:
        # fids: walks that are never clunked run out, and clunking gives them back
        fids = []
        with pytest.raises(NinepError) as e:
            for _ in range(srv.MAX_FIDS + 1):
                fids.append(cl.walk("active/web/version"))
        assert e.value.errno == errno.EMFILE and len(fids) == srv.MAX_FIDS - 1  # the root is one
        for fid in fids:
            cl.send(fid & 0x7FFF, c.Tclunk(fid))
        for _ in fids:
            assert isinstance(cl.recv().msg, c.Rclunk)
        # requests in flight: blocked `wait` reads up to the bound, then EAGAIN, and a flush still gets through
        m.write_manifest("web", SVC + "health /nonexistent\n")
        assert m.ctl("apply web").returncode == 0
        waits = [cl.open("active/web/wait") for _ in range(srv.MAX_OUTSTANDING + 1)]
        for tag, fid in enumerate(waits[:-1]):
            cl.send(tag, c.Tread(fid, 0, 100))
        cl.send(1000, c.Tread(waits[-1], 0, 100))
        assert cl.recv() == c.Frame(1000, c.Rlerror(errno.EAGAIN))
        for tag in range(srv.MAX_OUTSTANDING):
            cl.send(2000 + tag, c.Tflush(tag))
            assert cl.recv() == c.Frame(2000 + tag, c.Rflush())
    # connections: the one over the bound is closed at once; the others carry on
    # (from several loopback addresses: one address gets only MAX_PER_PEER)
    clients = [Client(ADDR, source=f"127.0.0.{2 + i // srv.MAX_PER_PEER}") for i in range(srv.MAX_CONNECTIONS)]
    try:
        extra = socket.create_connection(ADDR, timeout=10)
        assert _closed(extra)
    finally:
        for cl in clients:
            cl.close()
    # garbage: the connection closes, the server keeps serving
    for junk in (b"\xff" * 64, c.encode(1, c.Tclunk(0)) + b"\x03\x00\x00\x00\x64\x00\x00"):
        s = socket.create_connection(ADDR, timeout=10)
        s.sendall(c.encode(c.NOTAG, c.Tversion(8192, c.VERSION_L)) + junk)
        assert _closed(s)  # after the replies to what came before the junk
    # a peer that resets the connection with a reply on its way
    s = socket.create_connection(ADDR, timeout=10)
    s.sendall(c.encode(c.NOTAG, c.Tversion(8192, c.VERSION_L)) + c.encode(0, c.Tattach(0, c.NOFID, "", "", 0))
              + b"".join(c.encode(1 + i, c.Twalk(0, 1 + i, ("active", "web", "status"))) for i in range(200)))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    with connect_when_up(ADDR) as cl:
        assert cl.cat("active/web/replicas") == b"1\n"
    assert "bug in" not in m.server_log()


def _closed(s: socket.socket) -> bool:
    """Read until the server closes (a FIN, or a reset when it closed with our bytes unread)."""
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    s.close()
    return True


def test_no_mount_over_a_unix_socket(tmp_path, open_dir):
    sock = os.path.join(open_dir, "deployfs.9p")
    state = str(tmp_path / "state")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "deployfs", "serve", "--no-mount", "--state", state,
                             "--9p", f"unix!{sock}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with connect_when_up(sock) as cl:
            assert sorted(cl.listdir("/")) == ["active", "cluster", "ctl", "events", "manifests", "metrics", "nodes"]
            d = cl.walk("manifests")
            cl.rpc(c.Tlcreate(d, "web", os.O_WRONLY | os.O_CREAT, 0o644, 0))
            cl.write(d, SVC.encode())
            cl.clunk(d)  # the manifest is committed at clunk, not at each write
            ctl = cl.open("ctl", os.O_RDWR)
            cl.write(ctl, b"apply web\n")
            deadline = time.monotonic() + 20
            while not cl.cat("active/web/wait").startswith(b"done"):
                assert time.monotonic() < deadline, open(tmp_path / "serve.log").read()
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600  # the socket's permissions are the door
        r = diod("diodcat", "active/web/replicas", server=sock)
        assert (r.returncode, r.stdout) == (0, b"1\n"), r.stderr
        other = subprocess.run(["setpriv", "--reuid=12345", "--regid=12345", "--clear-groups", "diodcat", "-t", "5",
                                "-s", sock, "-a", "deploy", "active/web/replicas"], capture_output=True, timeout=20)
        assert other.returncode != 0 and b"ermission denied" in other.stderr
        assert not any(line.split()[1].startswith(str(tmp_path)) for line in open("/proc/self/mounts"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
        _mount.reap(state)
    assert proc.returncode == 0
    assert not os.path.exists(sock)  # removed on the way out


def test_bad_9p_flags_are_refused_before_anything_starts(tmp_path):
    state = str(tmp_path / "state")
    for args, why in (([str(tmp_path), "--9p", "tcp!host!http"], "--9p wants tcp!HOST!PORT or unix!PATH"),
                      (["--no-mount"], "--no-mount serves nothing without --9p"),
                      (["--no-mount", str(tmp_path), "--9p", "tcp!5640"], "--no-mount takes no mountpoint"),
                      (["--9p", "tcp!5640"], "a mountpoint is needed")):
        r = subprocess.run([sys.executable, "-m", "deployfs", "serve", "--state", state, *args], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and why in r.stderr, (args, r.stderr)
    assert not os.path.exists(state)  # refused before the state directory was made


PEER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from tests.serve.ninep.client import Client, NinepError
with Client(sys.argv[2], uid=0) as cl:  # claims root in its attach: the socket's credentials win
    fid = cl.open("ctl", os.O_RDWR)
    try:
        cl.write(fid, b"apply nosuch\n")
    except NinepError as e:
        print(e.errno, cl.read(fid).decode().strip())
"""


def test_a_unix_peer_is_who_the_kernel_says(tmp_path, open_dir):
    """--group: the socket is 0660 for that group; a member writes as itself, whatever uid its attach claims."""
    sock, state = os.path.join(open_dir, "9p"), str(tmp_path / "state")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "deployfs", "serve", "--no-mount", "--state", state,
                             "--group", "nogroup", "--9p", f"unix!{sock}"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        connect_when_up(sock).close()
        st = os.stat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, 65534)
        as_member = ["setpriv", "--reuid=12345", "--regid=12345", "--groups=65534"]
        r = subprocess.run([*as_member, sys.executable, "-c", PEER, os.getcwd(), sock], capture_output=True,
                           text=True, timeout=20)
        assert r.stdout.startswith(f"{errno.ENOENT} error: "), r.stderr  # allowed to write: the command was refused
        with Client(sock) as cl:
            assert b"command refused (uid=12345)" in cl.cat("events")
        outsider = subprocess.run(["setpriv", "--reuid=12345", "--regid=12345", "--clear-groups", "diodcat", "-t", "5",
                                   "-s", sock, "-a", "deploy", "events"], capture_output=True, timeout=20)
        assert outsider.returncode != 0 and b"ermission denied" in outsider.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
        _mount.reap(state)


_names = st.sampled_from(["active", "web", "version", "ctl", "manifests", "events", "instances", "logs", "0", "..", ".",
                          "x", "metrics", "status", "\udcff", "a" * 300])
_fids = st.integers(0, 6)
_requests = st.one_of(
    st.builds(c.Twalk, _fids, _fids, st.lists(_names, max_size=4).map(tuple)),
    st.builds(c.Tlopen, _fids, st.sampled_from([0, 1, 2, 0o1001, 0o4000, 0o200000])),
    st.builds(c.Tread, _fids, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    st.builds(c.Treaddir, _fids, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    st.builds(c.Twrite, _fids, st.integers(0, 70000), st.binary(max_size=64)),
    st.builds(c.Tgetattr, _fids, st.just(c.GETATTR_BASIC)),
    st.builds(c.Tclunk, _fids), st.builds(c.Tremove, _fids), st.builds(c.Tstatfs, _fids),
    st.builds(c.Tlcreate, _fids, _names, st.sampled_from([0o101, 0o301, 0o1101]), st.just(0o644), st.just(0)),
    st.builds(c.Tsetattr, _fids, st.integers(0, 0x7F), st.just(0o644), st.just(0), st.just(0),
              st.integers(0, 2**20), st.just(0), st.just(0), st.just(0), st.just(0)),
    st.builds(c.Trenameat, _fids, _names, _fids, _names), st.builds(c.Tunlinkat, _fids, _names, st.just(0)),
    st.builds(c.Tattach, _fids, st.just(c.NOFID), st.just(""), st.just(""), st.sampled_from([0, 12345])),
    st.builds(c.Tflush, st.integers(0, 20)), st.builds(c.Tfsync, _fids, st.just(0)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_requests, min_size=1, max_size=12))
def test_any_sequence_of_requests_gets_one_answer_each(served, requests):
    """No handler bug reaches a client: each request is answered under its tag, by its reply or an Rlerror."""
    if not os.path.exists(served.p("active", "web")):  # once per run: the fixture outlives the examples
        deploy(served)
    with Client(ADDR) as cl:
        for tag, req in enumerate(requests):
            cl.send(tag, req)
            frame = cl.recv()
            assert frame.tag == tag and frame.msg.TYPE in (req.TYPE + 1, c.Rlerror.TYPE), (req, frame)
    assert "bug in" not in served.server_log()


def test_a_manifest_edit_over_9p_is_committed_at_tfsync_and_tclunk(served):
    m = served
    m.write_manifest("ed", SVC)
    with Client(ADDR) as cl:
        f = cl.open("manifests/ed", os.O_WRONLY | os.O_TRUNC)
        cl.write(f, b"image sh\n")
        assert m.read("manifests/ed") == SVC  # neither emptied by O_TRUNC nor half-written
        cl.rpc(c.Tfsync(f))
        assert m.read("manifests/ed") == "image sh\n"
        cl.write(f, b"replicas 2\n", len("image sh\n"))
        cl.clunk(f)
        assert m.read("manifests/ed") == "image sh\nreplicas 2\n"
        f = cl.open("manifests/ed", os.O_WRONLY | os.O_TRUNC)
        cl.write(f, b"image sh\n")
        with pytest.raises(NinepError) as e:
            cl.write(f, b"x", 70000)
        assert e.value.errno == errno.EFBIG
        with pytest.raises(NinepError) as e:  # the edit was abandoned: the clunk's Rlerror says so
            cl.clunk(f)
        assert e.value.errno == errno.EFBIG
        assert m.read("manifests/ed") == "image sh\nreplicas 2\n"
