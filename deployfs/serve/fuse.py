"""The namespace as pyfuse3 operations.

Rationale (each point measured; see FUSE-NOTES.md):

* State files are rendered once at ``open`` into the handle and served with
  ``direct_io`` and ``attr_timeout=0``, so ``cat version`` is never stale and
  several reads of one open agree.
* ``events`` reports its true size with a long attr timeout, invalidated on
  every append: that is what makes ``tail -f``, ``tail -n`` and ``less +F``
  work.  It is read with ``direct_io``, never through the page cache: a page
  read while the file ended inside it is zero-filled past that end, and when
  an append raced that read the kernel kept the zeros under the new size
  (``tail -F`` printed 112 NUL bytes in place of two events, about one run in
  five of test_rotation_and_tail_F once stops got faster).
* ``ctl``: one write is one command; errors are raised from ``write`` (the
  only place the shell sees them) and the reply is kept in the handle so the
  same descriptor can read it back, whole, from wherever its offset is.
* ``wait`` blocks in ``read``; pyfuse3 ignores FUSE_INTERRUPT, so the handler
  asks libfuse whether the reading request was interrupted (``_fusereq``) and
  gives up with EINTR.  Blocked readers are capped per uid and overall,
  counted from ``open`` to ``release``, far below pyfuse3's task pool.
* ``logs/N`` is read live from the runtime's files (``direct_io``, true size
  at every ``getattr``), so ``tail -f`` follows it; its inode belongs to the
  instance, not the slot.
* Inodes are numbered per path while the kernel holds them and dropped when
  it sends ``forget``: lookups of names cost nothing once the kernel lets go.
* Any exception other than FUSEError would take the mount down: every
  handler is wrapped once, logs the traceback and answers EIO.
"""

from __future__ import annotations

import errno
import functools
import grp
import logging
import os
import pwd
import select
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..control.engine import Engine
from ..model.ctl import parse_command
from ..model.errors import CommandError, Error, Kind
from ..model.manifest import MAX_MANIFEST_BYTES
from . import _fusereq
from ..view.namespace import (FILE_NAME_RE, LOG_BY_ID_RE, RETIRED_EVENTS_RE, Ctl, Dir, Events, Log, ManifestFile, Namespace,
                        Node, Path, Text, Wait, events_dir)
from ..state.store import StoreFull

log = logging.getLogger(__name__)

STATIC_TIMEOUT = 60.0  # names and attributes that do not change
# Each blocked `wait` read holds one of pyfuse3's 1,000 tasks (cli/serve.py):
# together they must leave most of the pool to everyone else, and a user who
# may only read (another uid with --allow-other) must not take all of them.
# Those who may write (the serving user, root, --group) answer to the total only.
MAX_WAITERS = 512
MAX_WAITERS_PER_UID = 64
WAIT_POLL = 0.1  # seconds between checks of a blocked reader's interruption

# The one place an error kind becomes an errno (9P's Rlerror carries the same numbers).
ERRNO: dict[Kind, int] = {
    Kind.NOT_FOUND: errno.ENOENT,
    Kind.EXISTS: errno.EEXIST,
    Kind.INVALID: errno.EINVAL,
    Kind.BUSY: errno.EBUSY,
    Kind.NO_SPACE: errno.ENOSPC,
    Kind.PERMISSION: errno.EACCES,
    Kind.NOT_PERMITTED: errno.EPERM,
    Kind.UNAVAILABLE: errno.EIO,
    Kind.TOO_BIG: errno.EFBIG,
    Kind.NAME_TOO_LONG: errno.ENAMETOOLONG,
    Kind.NOT_A_DIRECTORY: errno.ENOTDIR,
    Kind.IS_A_DIRECTORY: errno.EISDIR,
    Kind.BAD_HANDLE: errno.EBADF,
    Kind.CROSS_DIRECTORY: errno.EXDEV,
    Kind.WOULD_BLOCK: errno.EAGAIN,
    Kind.INTERRUPTED: errno.EINTR,
    Kind.ADDRESS_IN_USE: errno.EADDRINUSE,
    Kind.ADDRESS_UNAVAILABLE: errno.EADDRNOTAVAIL,
}


@dataclass
class Handle:
    path: Path
    node: Node
    ino: int = 0
    data: bytes = b""  # rendered content (state files) or the ctl reply
    uid: int = 0
    pid: int = 0
    may_write: bool = False
    waiter: bool = False  # holds one of the `wait` reader slots until release
    nonblock: bool = False  # opened with O_NONBLOCK
    reading: bool = False  # a read of `wait` is blocked on this handle
    reply_at: int | None = None  # ctl: the file offset the reply is read from


@dataclass
class Access:
    """Who may write ctl files and manifests: the serving user, root, and --group."""
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    group: int | None = None  # --group NAME

    def may_write(self, ctx: pyfuse3.RequestContext) -> bool:
        if ctx.uid in (0, self.uid):
            return True
        if self.group is None:
            return False
        if ctx.gid == self.group:
            return True
        # The caller's groups as the kernel has them (setpriv, systemd's
        # SupplementaryGroups=, `docker --group-add` set them without
        # /etc/group knowing); ctx.pid is the calling thread.
        try:
            return self.group in pyfuse3.get_sup_groups(ctx.pid)
        except (OSError, RuntimeError, ValueError):
            pass  # no /proc: what /etc/group says
        try:
            name = pwd.getpwuid(ctx.uid).pw_name
            return name in grp.getgrgid(self.group).gr_mem
        except KeyError:
            return False


def _guard(fn):  # type: ignore[no-untyped-def]
    """No handler exception may take the mount down: anything unexpected is EIO."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: "DeployFS", *args):  # type: ignore[no-untyped-def]
        if self.debug:
            log.info("fuse %s%r", name, tuple(a for a in args if not isinstance(a, pyfuse3.RequestContext)))
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except Error as e:
            raise FUSEError(ERRNO[e.kind]) from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except StoreFull as e:  # a manifest write on a full state disk: refused, nothing changed
            log.warning("%s refused: %s", name, e)
            raise FUSEError(errno.ENOSPC) from None
        except Exception:
            log.exception("bug in %s handler; answered EIO", name)
            raise FUSEError(errno.EIO) from None
    return wrapper


class DeployFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, engine: Engine, *, access: Access | None = None, debug: bool = False) -> None:
        super().__init__()
        self.engine = engine
        self.ns = Namespace(engine)
        # Not `self.access`: that would shadow pyfuse3.Operations.access (unused under default_permissions).
        self.perms = access or Access()
        self.debug = debug
        self._paths: dict[int, Path] = {pyfuse3.ROOT_INODE: ()}
        self._inos: dict[Path, int] = {(): pyfuse3.ROOT_INODE}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._nlookup: dict[int, int] = {}  # what the kernel holds: lookups not yet forgotten
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.waiters = 0  # `wait` handles open, each holding a reader slot
        self._waiters_by_uid: dict[int, int] = {}
        self._blocked: dict[trio.CancelScope, Callable[[], bool]] = {}  # blocked `wait` reads -> "interrupted?"
        self._watcher = False
        self.interrupts = _fusereq.install()
        self.closing = False
        self.mounted = False
        self.started = time.time()
        self._segments: dict[str, int] = {}
        self._pollers: dict[str, dict[int, pyfuse3.PollHandle]] = {}  # poll(2) on `wait`: service -> fh -> handle
        engine.events.listeners.append(self._on_event)
        engine.listeners.append(self._on_change)

    # -- inodes and attributes ---------------------------------------------------------

    def _ino(self, path: Path) -> int:
        ino = self._inos.get(path)
        if ino is None:
            ino = self._inos[path] = self._next_ino
            self._paths[ino] = path
            self._next_ino += 1
        return ino

    def _looked_up(self, a: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        """The kernel now holds one more reference to this inode (until `forget`)."""
        self._nlookup[a.st_ino] = self._nlookup.get(a.st_ino, 0) + 1
        return a

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Not _guard'ed: pyfuse3 cannot answer a forget, so nothing may escape.
        try:
            for ino, n in inode_list:
                left = self._nlookup.get(ino, 0) - n
                if left > 0:
                    self._nlookup[ino] = left
                    continue
                self._nlookup.pop(ino, None)
                if ino == pyfuse3.ROOT_INODE:
                    continue
                path = self._paths.pop(ino, None)
                if path is not None and self._inos.get(path) == ino:
                    del self._inos[path]
        except Exception:
            log.exception("bug in forget handler")

    @staticmethod
    def _key(path: Path, node: Node) -> Path:
        """The path an inode is kept under: an instance's log by its id, so it follows the instance, not the slot."""
        return (*path[:-1], f"@{node.instance}") if isinstance(node, Log) else path

    def _node(self, ino: int) -> tuple[Path, Node]:
        path = self._paths.get(ino)
        node = None if path is None else self.ns.resolve(path)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return path, node  # type: ignore[return-value]

    def _attrs(self, path: Path, node: Node, ino: int | None = None,
               parent: Node | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino or self._ino(path)
        a.st_uid, a.st_gid = self.perms.uid, self.perms.group if self.perms.group is not None else self.perms.gid
        a.st_blksize = 4096
        group_w = 0o020 if self.perms.group is not None else 0
        mtime, size, timeout = self.started, 0, 0.0
        if isinstance(node, Dir):
            # Mode and owner never change, and the kernel checks them on every
            # path walk (default_permissions): cache them, or each `cat` of
            # active/web/version costs three extra requests.
            a.st_mode = stat.S_IFDIR | (0o755 | group_w if node.writable else 0o555)
            a.st_nlink, timeout = 2, STATIC_TIMEOUT
        elif isinstance(node, Text):
            a.st_mode, size, mtime = stat.S_IFREG | 0o444, len(node.render()), node.mtime()
        elif isinstance(node, Events):
            a.st_mode = stat.S_IFREG | 0o444
            size = node.size(self.engine.events)
            # invalidated on every append; an empty log dates from the start, not from 1970
            mtime, timeout = node.mtime(self.engine.events) or self.started, STATIC_TIMEOUT
        elif isinstance(node, Ctl):  # the group reads replies back too
            a.st_mode = stat.S_IFREG | 0o600 | (0o060 if group_w else 0)
        elif isinstance(node, Wait):
            a.st_mode = stat.S_IFREG | 0o444
        elif isinstance(node, Log):  # read live with direct_io: a fresh, true size is all tail -f needs
            a.st_mode, size, mtime = stat.S_IFREG | 0o444, node.size(), node.mtime() or self.started
        elif isinstance(node, ManifestFile):
            f = self.engine.store.get_file(node.name)
            if f is None:
                raise FUSEError(errno.ENOENT)
            a.st_mode, size, mtime = stat.S_IFREG | 0o644 | group_w, len(f.data), f.mtime
        a.st_nlink = a.st_nlink or 1
        a.st_size = size
        a.st_blocks = (size + 511) // 512
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = int(mtime * 1e9)
        a.attr_timeout = timeout
        # Only lookups set entry timeouts: names under a volatile directory,
        # and `events` (a rotation gives it a new inode), are never cached.
        volatile = (isinstance(parent, Dir) and parent.volatile) or isinstance(node, Events)
        a.entry_timeout = 0.0 if volatile else STATIC_TIMEOUT
        return a

    def _on_event(self, service: str) -> None:
        """Tell the kernel `events` grew; on rotation, do what logrotate does.

        Rotation moves the current inode to the name ``events.1`` (an open
        ``tail -f`` keeps reading it to its end) and gives ``events`` a fresh
        inode, so ``tail -F`` sees the file replaced and follows the new one.
        """
        if not self.mounted:
            return
        segment = self.engine.events.segment(service)
        rotated = self._segments.get(service, segment) != segment
        self._segments[service] = segment
        where = events_dir(service)
        current = (*where, "events")
        if rotated:
            # Each retired inode keeps its own segment, as a renamed file keeps its data.
            older = (*where, "events.1")
            frozen = lambda k: (*where, f"events@{k}")  # noqa: E731
            prev_ino = self._inos.pop(older, None)
            if prev_ino is not None:
                self._paths[prev_ino] = frozen(segment - 2)
            ino = self._inos.pop(current, None)
            if ino is not None:
                self._paths[ino] = frozen(segment - 1)
                self._inos[older] = ino
            parent = self._inos.get(where)
            if parent is not None:
                for name in (b"events", b"events.1"):
                    try:
                        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
                    except OSError:
                        pass
        ino = self._inos.get(current)
        if ino is not None:
            _invalidate(ino, attr_only=True)

    def _on_change(self, service: str) -> None:
        """Wake poll(2)/select(2) on `wait` once the rollout is no longer in flight."""
        svc = self.engine.services.get(service)
        if svc is None:  # deleted: a service applied again under this name starts its events at segment 0
            self._segments.pop(service, None)
        active = self._inos.get(("active",))
        if svc is None and self.mounted and active is not None:  # deleted: the kernel must not keep active/<svc>
            try:
                pyfuse3.invalidate_entry_async(active, service.encode(), ignore_enoent=True)
            except OSError:
                pass
        if service in self._pollers and (svc is None or svc.outcome() is not None):
            for handle in self._pollers.pop(service).values():
                try:
                    handle.notify()
                except OSError:
                    pass

    # -- lookup and directories ------------------------------------------------------------

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path, node = self._node(parent_inode)
        if not isinstance(node, Dir):
            raise FUSEError(errno.ENOTDIR)
        try:
            child_name = _name(name)
        except FUSEError as e:
            raise FUSEError(errno.ENAMETOOLONG if e.errno == errno.ENAMETOOLONG else errno.ENOENT) from None
        if RETIRED_EVENTS_RE.fullmatch(child_name) or LOG_BY_ID_RE.fullmatch(child_name):
            raise FUSEError(errno.ENOENT)  # an inode's own name: reached by inode only, never by name
        child = node.child(child_name)
        if child is None:
            raise FUSEError(errno.ENOENT)
        return self._looked_up(self._attrs(self._key((*path, child_name), child), child, parent=node))

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(*self._node(inode), ino=inode)

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path, node = self._node(inode)
        if not isinstance(node, Dir):
            raise FUSEError(errno.ENOTDIR)
        return self._new_handle(Handle(path, node))

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self._handles[fh]
        assert isinstance(h.node, Dir)
        up = h.path[:-1]
        dots: list[tuple[str, Path, Node | None]] = [(".", h.path, h.node), ("..", up, self.ns.resolve(up))]
        names = h.node.list()
        for i in range(start_id, len(dots) + len(names)):
            if i < len(dots):  # the kernel takes no reference on "." and ".."
                name, path, node = dots[i]
                if node is not None and not pyfuse3.readdir_reply(
                        token, name.encode(), self._attrs(path, node, self._inos.get(path)), i + 1):
                    return
                continue
            name = names[i - len(dots)]
            child = h.node.child(name)
            if child is None:
                continue
            path = self._key((*h.path, name), child)
            attrs = self._attrs(path, child, self._inos.get(path), h.node)
            if not pyfuse3.readdir_reply(token, name.encode(), attrs, i + 1):
                return
            self._looked_up(attrs)  # readdirplus: each entry given counts as a lookup

    @_guard
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # -- files ---------------------------------------------------------------------------------

    def _new_handle(self, h: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = h
        return fh

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path, node = self._node(inode)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        h = Handle(path, node, ino=inode, uid=ctx.uid, pid=ctx.pid, nonblock=bool(flags & os.O_NONBLOCK))
        fi = pyfuse3.FileInfo()
        if isinstance(node, Ctl):
            if not self.perms.may_write(ctx):
                raise FUSEError(errno.EACCES)
            h.may_write, fi.direct_io = True, True
        elif isinstance(node, ManifestFile):
            if writing:
                if not self.perms.may_write(ctx):
                    raise FUSEError(errno.EACCES)
                h.may_write = True
                if flags & os.O_TRUNC:  # no setattr(size=0) arrives: honour it here
                    self.engine.store.put_file(node.name, b"")
            fi.direct_io = True
        elif writing:
            raise FUSEError(errno.EACCES)
        elif isinstance(node, Text):
            h.data, fi.direct_io = node.render(), True
        elif isinstance(node, Log):
            fi.direct_io = True
        elif isinstance(node, Wait):
            # Counted from open to release, so opening many and reading them
            # all later cannot get past the caps.
            mine = self._waiters_by_uid.get(ctx.uid, 0)
            if self.waiters >= MAX_WAITERS or (mine >= MAX_WAITERS_PER_UID and not self.perms.may_write(ctx)):
                raise FUSEError(errno.EBUSY)
            self.waiters += 1
            self._waiters_by_uid[ctx.uid] = mine + 1
            h.waiter, fi.direct_io = True, True
        elif isinstance(node, Events):
            fi.direct_io = True  # see the module's rationale: the page cache can serve zeros after a racing append
        fi.fh = self._new_handle(h)
        return fi

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handles[fh]
        node = h.node
        if isinstance(node, Events):
            # Through the inode, not the name opened: after a rotation this
            # descriptor reads the retired segment, as on a disk.
            node = self._node(h.ino)[1]
            assert isinstance(node, Events)
            return node.read(self.engine.events, off, size)
        if isinstance(node, ManifestFile):
            f = self.engine.store.get_file(node.name)
            return b"" if f is None else f.data[off: off + size]
        if isinstance(node, Log):
            return node.read(off, size)
        if isinstance(node, Wait):
            if off > 0:
                return b""
            h.data = (await self._wait(h, node.service, _fusereq.current(fh, off, size)) + "\n").encode()
        if isinstance(node, Ctl):
            # The reply is read from wherever the descriptor stands: after
            # `echo apply >&3` the offset is past the command (`cat <&3`),
            # with pread it is 0.  Each write starts a new reply.
            if h.reply_at is None or off < h.reply_at:
                h.reply_at = off
            off -= h.reply_at
        return h.data[off: off + size]

    async def _wait(self, h: Handle, service: str, req: _fusereq.Request | None) -> str:
        svc = self.engine.services.get(service)
        if svc is None:
            raise FUSEError(errno.ENOENT)
        if svc.outcome() is None and h.nonblock:
            raise FUSEError(errno.EAGAIN)
        if h.reading:  # one blocked read per open: threads sharing a descriptor cannot multiply it
            raise FUSEError(errno.EBUSY)
        h.reading = True
        # Without the request (another pyfuse3), the opener's signals are all there is to go by.
        pid = h.pid
        interrupted = req.interrupted if req is not None else lambda: _signalled(pid)
        try:
            with trio.CancelScope() as scope:
                self._blocked[scope] = interrupted
                self._watch_blocked()
                while (out := svc.outcome()) is None and not self.closing:
                    await svc.wait_change()
            if scope.cancelled_caught or self.closing:  # Ctrl-C or kill of the reader, or shutdown
                raise FUSEError(errno.EINTR)
            assert out is not None
            return out
        finally:
            self._blocked.pop(scope, None)
            h.reading = False

    def _watch_blocked(self) -> None:
        """One task checks every blocked reader WAIT_POLL apart and wakes only the interrupted.

        300 readers each waking on its own timer cost ~10% of a core; checking
        libfuse's flag for all of them costs microseconds.  The /proc fallback
        is spaced out with the number of readers: about 1,000 reads a second at most.
        """
        if self._watcher or not self._blocked:
            return
        self._watcher = True

        async def watch() -> None:
            try:
                while self._blocked:
                    await trio.sleep(WAIT_POLL if self.interrupts else max(WAIT_POLL, len(self._blocked) / 1000))
                    for scope, interrupted in list(self._blocked.items()):
                        if self.closing or interrupted():
                            scope.cancel()
            except Exception:  # a system task's exception would end the whole server
                log.exception("bug in the wait watcher")
                for scope in list(self._blocked):
                    scope.cancel()
            finally:
                self._watcher = False
        trio.lowlevel.spawn_system_task(watch, name="deployfs-wait-watcher")

    @_guard
    async def poll(self, inode: int, fh: int, poll_handle: pyfuse3.PollHandle | None,
                   ctx: pyfuse3.RequestContext) -> int:
        h = self._handles.get(fh)
        node = h.node if h is not None else self._node(inode)[1]
        ready = select.POLLIN | select.POLLRDNORM
        if isinstance(node, Wait):
            svc = self.engine.services.get(node.service)
            if svc is not None and svc.outcome() is None:
                if poll_handle is not None:  # one per open file: repeated polls replace it
                    self._pollers.setdefault(node.service, {})[fh] = poll_handle
                return 0
        elif isinstance(node, (Ctl, ManifestFile)):
            ready |= select.POLLOUT | select.POLLWRNORM
        return ready

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handles[fh]
        node = h.node
        if not h.may_write:
            raise FUSEError(errno.EBADF)
        if isinstance(node, Ctl):
            return self._ctl(h, node, buf)
        if isinstance(node, ManifestFile):
            store = self.engine.store
            f = store.get_file(node.name)
            data = f.data if f else b""
            if off + len(buf) > MAX_MANIFEST_BYTES:
                raise FUSEError(errno.EFBIG)
            data = data.ljust(off, b"\0")[:off] + buf + data[off + len(buf):]
            store.put_file(node.name, data)
            return len(buf)
        raise FUSEError(errno.EACCES)

    def _ctl(self, h: Handle, node: Ctl, buf: bytes) -> int:
        who = f"uid={h.uid}"
        service = node.service
        try:
            cmd = parse_command(buf, node.service)
            service = cmd.service
            reply = self.engine.command(cmd.service, cmd.verb, cmd.arg, who)
        except CommandError as e:
            h.data, h.reply_at = f"error: {e.message}\n".encode(), None
            self.engine.refused(service, who, e.message)
            raise FUSEError(ERRNO[e.kind]) from None
        h.data, h.reply_at = f"{reply}\n".encode(), None
        return len(buf)

    @_guard
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path, node = self._node(inode)
        if isinstance(node, ManifestFile):
            if not self.perms.may_write(ctx):
                raise FUSEError(errno.EPERM)
            if fields.update_size:
                if attr.st_size > MAX_MANIFEST_BYTES:
                    raise FUSEError(errno.EFBIG)
                f = self.engine.store.get_file(node.name)
                data = f.data if f else b""
                self.engine.store.put_file(node.name, data[: attr.st_size].ljust(attr.st_size, b"\0"))
            # mode, owner and times are accepted (editors set them) but fixed by policy.
        elif isinstance(node, Ctl) and fields.update_size:
            pass  # `echo > ctl` may truncate: nothing to do
        elif fields.update_size or fields.update_mode or fields.update_uid or fields.update_gid:
            raise FUSEError(errno.EPERM)
        return self._attrs(path, node)

    @_guard
    async def flush(self, fh: int) -> None:
        pass

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        pass  # every write is already committed to the store

    @_guard
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None and h.waiter:
            self.waiters -= 1
            left = self._waiters_by_uid.pop(h.uid, 1) - 1
            if left:
                self._waiters_by_uid[h.uid] = left
        if h is not None and isinstance(h.node, Wait):
            self._pollers.get(h.node.service, {}).pop(fh, None)

    # -- manifests/: create, unlink, rename ----------------------------------------------------

    def _manifests_dir(self, inode: int, ctx: pyfuse3.RequestContext) -> None:
        path, node = self._node(inode)
        if not (isinstance(node, Dir) and node.writable):
            raise FUSEError(errno.EACCES)
        if not self.perms.may_write(ctx):
            raise FUSEError(errno.EACCES)

    @_guard
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._manifests_dir(parent_inode, ctx)
        n = _name(name)
        store = self.engine.store
        if store.get_file(n) is not None:
            if flags & os.O_EXCL:
                raise FUSEError(errno.EEXIST)
        elif len(store.list_files()) >= 10_000:
            raise FUSEError(errno.ENOSPC)
        if store.get_file(n) is None or flags & os.O_TRUNC:
            store.put_file(n, b"")
        node = ManifestFile(n)
        h = Handle(("manifests", n), node, uid=ctx.uid, pid=ctx.pid, may_write=True)
        fi = pyfuse3.FileInfo(fh=self._new_handle(h), direct_io=True)
        return fi, self._looked_up(self._attrs(h.path, node))

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._manifests_dir(parent_inode, ctx)
        n = _name(name)
        if self.engine.store.get_file(n) is None:
            raise FUSEError(errno.ENOENT)
        self.engine.store.delete_file(n)
        self._forget_path(("manifests", n))

    @_guard
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._manifests_dir(parent_inode_old, ctx)
        if parent_inode_new != parent_inode_old:
            raise FUSEError(errno.EXDEV)
        old, new = _name(name_old), _name(name_new)
        store = self.engine.store
        f = store.get_file(old)
        if f is None:
            raise FUSEError(errno.ENOENT)
        if flags & pyfuse3.RENAME_NOREPLACE and store.get_file(new) is not None:
            raise FUSEError(errno.EEXIST)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)
        with store.transaction():
            store.put_file(new, f.data)
            store.delete_file(old)
        self._forget_path(("manifests", new))
        ino = self._inos.pop(("manifests", old), None)
        if ino is not None:  # the kernel keeps the renamed inode: make it the new name's
            self._inos[("manifests", new)] = ino
            self._paths[ino] = ("manifests", new)

    def _forget_path(self, path: Path) -> None:
        ino = self._inos.pop(path, None)
        if ino is not None:
            self._paths.pop(ino, None)

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise FUSEError(errno.EACCES)

    @_guard
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise FUSEError(errno.EACCES)


def _invalidate(ino: int, *, attr_only: bool) -> None:
    try:
        pyfuse3.invalidate_inode(ino, attr_only=attr_only)
    except OSError:  # ENOENT: the kernel never looked it up, or forgot it
        pass


def _name(raw: bytes) -> str:
    if len(raw) > 255:  # NAME_MAX, as on a disk; the kernel lets FUSE names reach 1024
        raise FUSEError(errno.ENAMETOOLONG)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FUSEError(errno.EINVAL) from None
    if name in (".", "..") or not FILE_NAME_RE.fullmatch(name):
        raise FUSEError(errno.EINVAL)
    return name


def _signalled(pid: int) -> bool:
    """Has the blocked reader been sent a signal (or gone)?  pyfuse3 drops FUSE_INTERRUPT."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16):
                    return True
    except (OSError, ValueError):
        return True
    return False
