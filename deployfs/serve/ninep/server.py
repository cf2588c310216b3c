"""The namespace over 9P2000.L, on trio, in the server's own process.

One task per connection reads bytes into the codec and answers each request
in turn; every request but a read of ``wait`` is answered at once, so
replies stay in order and a client that stops reading its replies stops
being read (backpressure, no queue).  A read of ``wait`` is a deferred
reply: a task of its own that ``Tflush`` cancels, after which the old tag is
answered by nothing and ``Rflush`` follows (9P's rule: the old request is
answered or not at all, and then Rflush).

Access: on a unix socket the peer's credentials (SO_PEERCRED) say who it is,
and the socket file's permissions who may connect at all; a root peer (a
kernel mount doing ``access=user``) may speak for the uid its attach names.
Over TCP there are no credentials: the attach's ``n_uname`` decides, as the
uid of a FUSE request does.  The TCP listener binds where ``--9p`` says
(loopback in every example).

Bounds: connections per server, fids per connection, requests in flight per
connection (the codec); blocked ``wait`` readers are the view's (shared with FUSE).

Every file's behaviour is the view's (view/files.py), as for FUSE: this module
only turns 9P requests into those calls and error kinds into Rlerror errnos.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio

from ...model.errors import Error
from ...view.access import Who
from ...view.files import File, Handle, OpenMode, Stat
from ...view.namespace import Namespace, Path
from ..fuse import ERRNO
from . import codec as c

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
# Per TCP peer address: one host holding blocked `wait` reads on every slot would lock out
# everyone else, root included.  (Local users all come from 127.0.0.1: unix! is the way to tell them apart.)
MAX_PER_PEER = 16
MAX_FIDS = 4096  # per connection: a walk per file looked at, clunked after
MAX_OUTSTANDING = 64  # requests in flight per connection: only `wait` reads stay in flight
MAX_MSIZE = 65536 + c.IOHDRSZ
MAX_WALK = 16  # names per Twalk (MAXWELEM)
NONUNAME = 0xFFFFFFFF
NOBODY = 65534
# Requests that may write (a command, a manifest): answered only once the view reads what they wrote.
WRITES = (c.Twrite, c.Tlcreate, c.Tlopen, c.Tsetattr, c.Trenameat, c.Trename, c.Tunlinkat, c.Tremove)
V9FS_MAGIC = 0x01021997
DT_DIR, DT_REG = 4, 8


class AddressError(ValueError):
    pass


@dataclass(frozen=True)
class Address:
    """``tcp!HOST!PORT`` (``tcp!PORT``: loopback) or ``unix!PATH``, Plan 9's dial strings."""
    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> "Address":
        kind, _, rest = text.partition("!")
        if kind == "unix" and rest:
            return cls("unix", path=rest)
        if kind == "tcp":
            host, _, port = rest.rpartition("!")
            if port.isdigit() and 0 < int(port) < 65536:
                # No host (tcp!5640): loopback, as the design asks unless told otherwise.
                return cls("tcp", host=host.strip("[]") or "127.0.0.1", port=int(port))
        raise AddressError(f"--9p wants tcp!HOST!PORT or unix!PATH, got {text!r}")

    def __str__(self) -> str:
        return f"unix!{self.path}" if self.kind == "unix" else f"tcp!{self.host}!{self.port}"


@dataclass
class Fid:
    path: Path
    who: Who
    handle: Handle | None = None  # open: a file's handle
    names: list[str] | None = None  # open: a directory's listing, fixed at open so readdir offsets stay put


class NinepServer:
    def __init__(self, view: Namespace, address: Address, *, max_connections: int = MAX_CONNECTIONS,
                 max_fids: int = MAX_FIDS, debug: bool = False) -> None:
        self.ns = view
        self.address = address
        self.group = view.access.group
        self.max_connections, self.max_fids = max_connections, max_fids
        self.debug = debug
        self.connections = 0
        self.per_peer: dict[str, int] = {}
        self.max_per_peer = min(MAX_PER_PEER, max_connections)
        self.sessions: set[Session] = set()
        self.closing = False  # shutting down: blocked `wait` reads are answered EIO, not cut off
        self.bound: str = str(address)  # with the port the kernel chose, once listening
        self.listeners: list[trio.SocketListener] = []

    async def listen(self) -> None:
        """Bind now, so a bad or busy address is refused before anything is mounted."""
        self.listeners = await self._listen()
        if self.address.kind == "tcp":
            sockname = self.listeners[0].socket.getsockname()
            self.bound = f"tcp!{self.address.host}!{sockname[1]}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.listeners:
            await self.listen()
        try:
            async with trio.open_nursery() as nursery:
                for listener in self.listeners:
                    nursery.start_soon(self._accept, listener, nursery)
                task_status.started()  # (`deployfs serve` says where, once, with the mount)
        finally:
            if self.address.kind == "unix":
                try:
                    os.unlink(self.address.path)
                except OSError:
                    pass
            for listener in self.listeners:
                listener.socket.close()  # not aclose: under cancellation that raises before the next one

    async def _listen(self) -> list[trio.SocketListener]:
        a = self.address
        if a.kind == "tcp":
            try:
                listeners = await trio.open_tcp_listeners(a.port, host=a.host)
            except OSError as e:
                raise AddressError(f"--9p {a}: {e.strerror or e}") from None
            return listeners
        _clear_stale_socket(a.path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Owner only (and --group): the socket file's permissions are the door.
        old = os.umask(0o117 if self.group is not None else 0o177)
        try:
            await sock.bind(a.path)
        except OSError as e:
            sock.close()
            raise AddressError(f"--9p {a}: {e.strerror or e}") from None
        finally:
            os.umask(old)
        if self.group is not None:
            os.chown(a.path, -1, self.group)
        sock.listen(socket.SOMAXCONN)
        return [trio.SocketListener(sock)]

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            stream = await listener.accept()
            host = _tcp_host(stream)
            if self.connections >= self.max_connections:
                log.warning("9P: refusing a connection: %d already open", self.connections)
                await trio.aclose_forcefully(stream)
                continue
            if host is not None and self.per_peer.get(host, 0) >= self.max_per_peer:
                log.warning("9P: refusing a connection from %s: it has %d open already", host, self.max_per_peer)
                await trio.aclose_forcefully(stream)
                continue
            self.connections += 1
            if host is not None:
                self.per_peer[host] = self.per_peer.get(host, 0) + 1
            nursery.start_soon(self._serve, stream, host)

    async def close(self) -> None:
        """Answer every blocked `wait` read EIO (and any read that blocks from now on), so a client
        sees an error of the read rather than its connection cut mid-request (EPROTO in v9fs)."""
        self.closing = True
        for session in list(self.sessions):
            await session._abandon_all()

    async def _serve(self, stream: trio.SocketStream, host: str | None) -> None:
        session = Session(self, stream)
        self.sessions.add(session)
        try:
            await session.run()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away (a reset, a read or write after its close)
        except* Exception:
            log.exception("bug in a 9P connection; closed it")
        finally:
            self.sessions.discard(session)
            self.connections -= 1
            if host is not None:
                self.per_peer[host] -= 1
                if not self.per_peer[host]:
                    del self.per_peer[host]
            await trio.aclose_forcefully(stream)


def _clear_stale_socket(path: str) -> None:
    """A socket left by a server that died is removed; anything else there is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressError(f"--9p unix!{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise AddressError(f"--9p unix!{path}: another server is listening there")


def _tcp_host(stream: trio.SocketStream) -> str | None:
    if stream.socket.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return None


def _peer(stream: trio.SocketStream) -> Who | None:
    """A unix peer's credentials from the kernel (its pid lets the view see its supplementary groups, as over FUSE)."""
    if stream.socket.family != socket.AF_UNIX:
        return None
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Who(uid, gid, pid)


class Session:
    """One connection: its codec, its fids, its deferred replies."""

    def __init__(self, server: NinepServer, stream: trio.SocketStream) -> None:
        self.server, self.ns, self.stream = server, server.ns, stream
        self.conn = c.Connection(MAX_MSIZE, MAX_OUTSTANDING)
        self.fids: dict[int, Fid] = {}
        self.deferred: dict[int, tuple[trio.CancelScope, trio.Event]] = {}
        self.flushed: set[trio.CancelScope] = set()  # deferred reads a Tflush cancelled: never answered
        self.peer = _peer(stream)
        self._send_lock = trio.Lock()
        self.handlers: dict[type[c.Message], Callable[[Any], Awaitable[c.Message]]] = {
            c.Tauth: self.auth, c.Tattach: self.attach, c.Twalk: self.walk, c.Tclunk: self.clunk,
            c.Tgetattr: self.getattr, c.Tlopen: self.lopen, c.Tread: self.read, c.Treaddir: self.readdir,
            c.Twrite: self.write, c.Tlcreate: self.lcreate, c.Tsetattr: self.setattr, c.Trenameat: self.renameat,
            c.Trename: self.rename, c.Tunlinkat: self.unlinkat, c.Tremove: self.remove, c.Tstatfs: self.statfs,
            c.Tfsync: self.fsync, c.Txattrwalk: self.xattrwalk, c.Tmkdir: self.mkdir,
        }

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    data = await self.stream.receive_some(65536)
                    self.conn.receive_data(data)
                    while True:
                        try:
                            frame = self.conn.next_event()
                        except c.ProtocolError as e:
                            if data:
                                log.info("9P: closing a connection: %s", e)
                            nursery.cancel_scope.cancel()
                            return
                        if frame is c.NEED_DATA:
                            break
                        assert isinstance(frame, c.Frame)
                        await self.dispatch(frame, nursery)
        finally:
            self._clunk_all()

    async def send(self, tag: int, msg: c.Message) -> None:
        async with self._send_lock:
            await self.stream.send_all(self.conn.send(tag, msg))

    async def dispatch(self, frame: c.Frame, nursery: trio.Nursery) -> None:
        tag, msg = frame
        if self.server.debug:
            log.info("9P %d %r", tag, msg)
        if isinstance(msg, c.Invalid):
            await self.send(tag, c.Rlerror(msg.errno))
        elif isinstance(msg, c.Tversion):
            await self._abandon_all()
            self._clunk_all()
            await self.send(tag, self.conn.version_reply(msg))
        elif isinstance(msg, c.Tflush):
            pending = self.deferred.get(msg.oldtag)
            if pending is not None:
                self.flushed.add(pending[0])
                pending[0].cancel()
                await pending[1].wait()  # answered (if it won the race) or abandoned
            await self.send(tag, c.Rflush())
        elif isinstance(msg, c.Tread) and self._blocking(msg.fid):
            self._defer(tag, msg, nursery)
        else:
            await self.send(tag, await self._answer(msg))

    async def _answer(self, msg: c.Message) -> c.Message:
        handler = self.handlers.get(type(msg))
        if handler is None:
            return c.Rlerror(errno.EOPNOTSUPP)
        try:
            try:
                return await handler(msg)
            finally:
                if isinstance(msg, WRITES):  # answered once what it wrote can be read (read-your-writes)
                    await self.ns.source.settled()
        except Error as e:
            return c.Rlerror(ERRNO[e.kind])
        except _Refused as e:
            return c.Rlerror(e.errno)
        except Exception:
            log.exception("bug in the 9P %s handler; answered EIO", type(msg).__name__)
            return c.Rlerror(errno.EIO)

    # -- blocking reads (`wait`): deferred replies ---------------------------------------------

    def _blocking(self, fid: int) -> bool:
        f = self.fids.get(fid)
        return f is not None and f.handle is not None and f.handle.blocking

    def _defer(self, tag: int, msg: c.Tread, nursery: trio.Nursery) -> None:
        scope, done = trio.CancelScope(), trio.Event()
        self.deferred[tag] = (scope, done)
        handle = self.fids[msg.fid].handle
        assert handle is not None
        count = min(msg.count, self.conn.msize - c.IOHDRSZ)

        async def reply() -> None:
            answer: c.Message | None = None
            try:
                with scope:
                    try:
                        if not self.server.closing:
                            answer = c.Rread(await handle.read(msg.offset, count))
                    except Error as e:
                        answer = c.Rlerror(ERRNO[e.kind])
                if answer is None and self.server.closing and scope not in self.flushed:
                    answer = c.Rlerror(errno.EIO)  # the server is going away (a flushed tag gets no answer)
                if answer is not None:  # outside the scope: a flush never cuts a reply in half
                    await self.send(tag, answer)
            finally:
                # The client may already have reused the tag (it has its answer): drop only our entry.
                if self.deferred.get(tag, (None,))[0] is scope:
                    del self.deferred[tag]
                self.flushed.discard(scope)
                done.set()
        nursery.start_soon(reply)

    async def _abandon_all(self) -> None:
        for scope, _ in list(self.deferred.values()):
            scope.cancel()
        for _, done in list(self.deferred.values()):
            await done.wait()

    # -- fids ------------------------------------------------------------------------------------

    def _fid(self, fid: int) -> Fid:
        f = self.fids.get(fid)
        if f is None:
            raise _Refused(errno.EBADF)
        return f

    def _new_fid(self, fid: int, f: Fid) -> None:
        if fid in self.fids:
            raise _Refused(errno.EBADF)
        if len(self.fids) >= self.server.max_fids:
            raise _Refused(errno.EMFILE)
        self.fids[fid] = f

    def _file(self, path: Path) -> File:
        node = self.ns.resolve(path)
        if node is None:
            raise _Refused(errno.ENOENT)  # gone since the walk (a service deleted, an instance renumbered)
        return node

    def _opened(self, fid: int) -> Handle:
        f = self._fid(fid)
        if f.names is not None:
            raise _Refused(errno.EISDIR)
        if f.handle is None:
            raise _Refused(errno.EBADF)
        return f.handle

    def _unopened(self, fid: int) -> Fid:
        f = self._fid(fid)
        if f.handle is not None or f.names is not None:
            raise _Refused(errno.EBADF)
        return f

    def _release(self, f: Fid) -> None:
        if f.handle is not None:
            f.handle.release()
            f.handle = None

    def _clunk_all(self) -> None:
        for f in self.fids.values():
            self._release(f)
        self.fids.clear()

    @staticmethod
    def _qid(node: File, path: Path, st: Stat) -> c.Qid:
        # Stable per file across connections and restarts: a hash of the path its inode is kept under.
        key = "/".join(node.inode_key(path)).encode("utf-8", "surrogateescape")
        ident = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        return c.Qid(c.QTDIR if st.is_dir else c.QTFILE, 0, ident)

    def _iounit(self) -> int:
        return self.conn.msize - c.IOHDRSZ

    # -- handlers: each returns its reply, or raises ------------------------------------------------

    async def auth(self, m: c.Tauth) -> c.Message:
        raise _Refused(errno.ENOENT)  # no authentication: attach straight away (as diod without munge)

    async def attach(self, m: c.Tattach) -> c.Message:
        if m.afid != c.NOFID:
            raise _Refused(errno.EINVAL)
        # The aname is not checked: the namespace has one root, whatever the client calls it.
        if self.peer is not None and self.peer.uid != 0:
            who = self.peer  # a unix peer is who the kernel says it is, whatever its attach claims
        else:
            who = _caller(self._attach_uid(m))
        self._new_fid(m.fid, Fid((), who))
        root = self.ns.root
        return c.Rattach(self._qid(root, (), root.stat()))

    def _attach_uid(self, m: c.Tattach) -> int:
        if m.n_uname != NONUNAME:
            return m.n_uname
        try:
            return pwd.getpwnam(m.uname).pw_uid
        except KeyError:
            return NOBODY

    async def walk(self, m: c.Twalk) -> c.Message:
        f = self._fid(m.fid)
        if (f.handle is not None or f.names is not None) and m.newfid == m.fid:
            raise _Refused(errno.EBADF)  # an open fid stays what it is; diodls walks from one into newfids
        if len(m.wnames) > MAX_WALK:
            raise _Refused(errno.EINVAL)
        if m.newfid != m.fid and m.newfid in self.fids:
            raise _Refused(errno.EBADF)
        path, node = f.path, self._file(f.path)
        qids = []
        for i, raw in enumerate(m.wnames):
            try:
                if raw == "..":
                    path = path[:-1]
                    node = self._file(path)
                elif raw != ".":  # not 9P, but diodls walks it
                    await node.fresh()  # (another node's logs are asked of it: view/files.py)
                    name, node = node.lookup(raw.encode("utf-8", "surrogateescape"))
                    path = (*path, name)
                await node.fresh()
                qids.append(self._qid(node, path, node.stat()))
            except (Error, _Refused):
                if i == 0:
                    raise
                return c.Rwalk(tuple(qids))  # a partial walk: newfid is not made
        if m.newfid == m.fid:
            f.path = path
        else:
            self._new_fid(m.newfid, Fid(path, f.who))
        return c.Rwalk(tuple(qids))

    async def clunk(self, m: c.Tclunk) -> c.Message:
        f = self._fid(m.fid)
        del self.fids[m.fid]  # clunked even when the commit fails: its error is the Rlerror
        try:
            if f.handle is not None:
                if f.handle.commit(last=True):
                    await self.ns.source.settled()
        finally:
            self._release(f)
        return c.Rclunk()

    async def getattr(self, m: c.Tgetattr) -> c.Message:
        f = self._fid(m.fid)
        node = self._file(f.path)
        await node.fresh()
        st = node.stat()
        access = self.ns.access
        mode = (stat.S_IFDIR if st.is_dir else stat.S_IFREG) | st.mode
        gid = access.group if access.group is not None else access.gid
        sec, nsec = divmod(int((st.mtime or self.ns.started) * 1e9), 10**9)
        return c.Rgetattr(c.GETATTR_BASIC, self._qid(node, f.path, st), mode, access.uid, gid, 2 if st.is_dir else 1,
                          0, st.size, 4096, (st.size + 511) // 512, sec, nsec, sec, nsec, sec, nsec, 0, 0, 0, 0)

    async def lopen(self, m: c.Tlopen) -> c.Message:
        f = self._unopened(m.fid)
        node = self._file(f.path)
        await node.fresh()
        st = node.stat()
        write = m.flags & os.O_ACCMODE != os.O_RDONLY
        if st.is_dir:
            if write:
                raise _Refused(errno.EISDIR)
            f.names = node.names()
        else:
            f.handle = node.open(f.who, OpenMode(write=write, truncate=bool(m.flags & os.O_TRUNC),
                                                 nonblock=bool(m.flags & os.O_NONBLOCK),
                                                 append=bool(m.flags & os.O_APPEND)))
        return c.Rlopen(self._qid(node, f.path, st), self._iounit())

    async def read(self, m: c.Tread) -> c.Message:
        return c.Rread(await self._opened(m.fid).read(m.offset, min(m.count, self._iounit())))

    async def readdir(self, m: c.Treaddir) -> c.Message:
        f = self._fid(m.fid)
        if f.names is None:
            raise _Refused(errno.ENOTDIR if f.handle is not None else errno.EBADF)
        room = min(m.count, self._iounit())
        entries = [(".", f.path), ("..", f.path[:-1])] + [(n, (*f.path, n)) for n in f.names]
        out = bytearray()
        for i in range(m.offset, len(entries)):
            name, path = entries[i]
            node = self.ns.resolve(path)
            if node is None:
                continue  # gone since the listing was taken
            try:
                st = node.stat()
            except Error:
                continue
            entry = c.dirent(self._qid(node, path, st), i + 1, DT_DIR if st.is_dir else DT_REG, name)
            if len(out) + len(entry) > room:
                if not out:
                    raise _Refused(errno.EINVAL)  # not even one entry fits the count asked for
                break
            out += entry
        return c.Rreaddir(bytes(out))

    async def write(self, m: c.Twrite) -> c.Message:
        return c.Rwrite(await self._opened(m.fid).write(m.offset, m.data))

    async def lcreate(self, m: c.Tlcreate) -> c.Message:
        f = self._unopened(m.fid)
        name, node, handle = self._file(f.path).create(f.who, _raw(m.name), exclusive=bool(m.flags & os.O_EXCL),
                                                       truncate=bool(m.flags & os.O_TRUNC))
        f.path, f.handle = (*f.path, name), handle  # the fid now stands for the new file, open
        await self.ns.source.settled()  # (its stat reads the records)
        return c.Rlcreate(self._qid(node, f.path, node.stat()), self._iounit())

    async def setattr(self, m: c.Tsetattr) -> c.Message:
        f = self._fid(m.fid)  # an open fid: ftruncate, on that open file's own bytes
        self._file(f.path).setattr(f.who, m.size if m.valid & c.SETATTR_SIZE else None,
                                   bool(m.valid & (c.SETATTR_MODE | c.SETATTR_UID | c.SETATTR_GID)), f.handle)
        return c.Rsetattr()

    async def renameat(self, m: c.Trenameat) -> c.Message:
        old, new = self._fid(m.olddirfid), self._fid(m.newdirfid)
        self._file(old.path).rename(old.who, _raw(m.oldname), _raw(m.newname), elsewhere=old.path != new.path)
        return c.Rrenameat()

    async def rename(self, m: c.Trename) -> c.Message:
        f, d = self._fid(m.fid), self._fid(m.dfid)
        if not f.path:
            raise _Refused(errno.EBUSY)
        parent = f.path[:-1]
        _, new = self._file(parent).rename(f.who, _raw(f.path[-1]), _raw(m.name), elsewhere=parent != d.path)
        f.path = (*d.path, new)
        return c.Rrename()

    async def unlinkat(self, m: c.Tunlinkat) -> c.Message:
        d = self._fid(m.dirfid)
        self._file(d.path).unlink(d.who, _raw(m.name))
        return c.Runlinkat()

    async def remove(self, m: c.Tremove) -> c.Message:
        f = self._fid(m.fid)
        try:  # the fid is clunked whether or not the remove succeeds (9P)
            if not f.path:
                raise _Refused(errno.EBUSY)
            self._file(f.path[:-1]).unlink(f.who, _raw(f.path[-1]))
        finally:
            del self.fids[m.fid]
            self._release(f)
        return c.Rremove()

    async def statfs(self, m: c.Tstatfs) -> c.Message:
        self._fid(m.fid)
        return c.Rstatfs(V9FS_MAGIC, 4096, 0, 0, 0, 0, 0, 0, 255)

    async def fsync(self, m: c.Tfsync) -> c.Message:
        f = self._fid(m.fid)
        if f.handle is not None:
            if f.handle.commit():
                await self.ns.source.settled()
        return c.Rfsync()

    async def xattrwalk(self, m: c.Txattrwalk) -> c.Message:
        raise _Refused(errno.ENODATA)  # no extended attributes (v9fs asks for security.capability)

    async def mkdir(self, m: c.Tmkdir) -> c.Message:
        raise _Refused(errno.EACCES)


def _caller(uid: int) -> Who:
    """The caller the view checks: the uid and its primary group; no pid (no /proc to consult)."""
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        gid = uid
    return Who(uid, gid, 0)


def _raw(name: str) -> bytes:
    """A name back as the bytes the client sent (the codec decodes with surrogateescape)."""
    return name.encode("utf-8", "surrogateescape")


class _Refused(Exception):
    """A 9P-level refusal (a fid misused): no kind below serve/ means it."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err
