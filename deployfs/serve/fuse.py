"""The view as pyfuse3 operations: inodes, caching, invalidation, errnos.

What each file does is the view's (view/files.py); this module only turns
FUSE requests into calls on it, one line per operation, and keeps what only
FUSE has (each point measured; see docs/architecture.md):

* Every file is opened with ``direct_io``: state files are rendered once at
  ``open``; ``events`` and ``logs/N`` are read live, and a page cached while
  the file ended inside it was served as zeros under the grown size when an
  append raced the read (``tail -F`` printed 112 NUL bytes for two events).
* Attributes: a file whose attributes change only with what the view tells
  us (``events``: true size, invalidated on every append) or never
  (directories: the kernel checks every path component on each walk) is
  cached ``STATIC_TIMEOUT``; every other file is asked each time.  Names
  under a volatile directory (slots renumber) and ``events`` (a rotation
  gives it a new inode) are never cached.
* A blocking read (``wait``) runs in a cancel scope; pyfuse3 ignores
  FUSE_INTERRUPT, so one task asks libfuse every ``WAIT_POLL`` whether each
  blocked request was interrupted (``_fusereq``) and cancels it: EINTR.
* Inodes are numbered per path while the kernel holds them and dropped when
  it sends ``forget``: lookups of names cost nothing once the kernel lets go.
* Any exception other than FUSEError would take the mount down: every
  handler is wrapped once; an error kind becomes its errno (:data:`ERRNO`),
  anything else logs the traceback and answers EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import stat
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..model.errors import Error, Kind
from ..view.access import Access
from ..view.files import Changes, File, Handle, OpenMode
from ..view.namespace import Namespace, Path, events_dir
from ..view.source import Source
from . import _fusereq

__all__ = ["Access", "DeployFS", "ERRNO"]

log = logging.getLogger(__name__)

STATIC_TIMEOUT = 60.0  # names and attributes that do not change (or that we invalidate)
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
class Open:
    handle: Handle
    pid: int  # the opener: without libfuse's request, its signals are all a blocked read can go by


@dataclass
class OpenDir:
    path: Path
    node: File


def _guard(fn):  # type: ignore[no-untyped-def]
    """No handler exception may take the mount down: a kind is its errno, anything unexpected EIO."""
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
            if e.kind is Kind.NO_SPACE:
                log.warning("%s refused: %s", name, e.message)
            raise FUSEError(ERRNO[e.kind]) from None
        except Exception:
            log.exception("bug in %s handler; answered EIO", name)
            raise FUSEError(errno.EIO) from None
    return wrapper


class DeployFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, view: Namespace | Source, *, access: Access | None = None, debug: bool = False) -> None:
        """Serve ``view``: a Namespace another front end (9P) may share, or a source to build one on."""
        super().__init__()
        self.ns = view if isinstance(view, Namespace) else Namespace(view, access or Access())
        self.source: Source = self.ns.source
        # Not `self.access`: that would shadow pyfuse3.Operations.access (unused under default_permissions).
        self.perms = self.ns.access
        self.debug = debug
        self._paths: dict[int, Path] = {pyfuse3.ROOT_INODE: ()}
        self._inos: dict[Path, int] = {(): pyfuse3.ROOT_INODE}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._nlookup: dict[int, int] = {}  # what the kernel holds: lookups not yet forgotten
        self._handles: dict[int, Open] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._next_fh = 1
        self._blocked: dict[trio.CancelScope, Callable[[], bool]] = {}  # blocked reads -> "interrupted?"
        self._watcher = False
        self.interrupts = _fusereq.install()
        self.closing = False
        self.mounted = False
        self.started = self.ns.started
        self._segments: dict[str, int] = {}
        self._pollers: dict[int, tuple[Handle, pyfuse3.PollHandle]] = {}  # poll(2) on a file not yet readable
        self.source.subscribe(self._on_change, self._on_event)

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

    def _node(self, ino: int) -> tuple[Path, File]:
        path = self._paths.get(ino)
        node = None if path is None else self.ns.resolve(path)
        if path is None or node is None:
            raise FUSEError(errno.ENOENT)
        return path, node

    def _attrs(self, path: Path, node: File, ino: int | None = None,
               parent: File | None = None) -> pyfuse3.EntryAttributes:
        st = node.stat()
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino or self._ino(path)
        a.st_uid, a.st_gid = self.perms.uid, self.perms.group if self.perms.group is not None else self.perms.gid
        a.st_blksize = 4096
        a.st_mode = (stat.S_IFDIR if st.is_dir else stat.S_IFREG) | st.mode
        a.st_nlink = 2 if st.is_dir else 1
        a.st_size = st.size
        a.st_blocks = (st.size + 511) // 512
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = int((st.mtime or self.started) * 1e9)
        a.attr_timeout = 0.0 if st.changes is Changes.ALWAYS else STATIC_TIMEOUT
        if a.st_ino == pyfuse3.ROOT_INODE:
            # Never cached: once the server is gone, `stat deploy` (and `mkdir -p deploy`) must say
            # "not connected" at once, not a minute later; a getattr of the root is cheap.
            a.attr_timeout = 0.0
        # Only lookups set entry timeouts.
        cached = node.name_cached and not (parent is not None and parent.volatile)
        a.entry_timeout = STATIC_TIMEOUT if cached else 0.0
        return a

    def _on_event(self, service: str) -> None:
        """Tell the kernel `events` grew; on rotation, do what logrotate does.

        Rotation moves the current inode to the name ``events.1`` (an open
        ``tail -f`` keeps reading it to its end) and gives ``events`` a fresh
        inode, so ``tail -F`` sees the file replaced and follows the new one.
        """
        if not self.mounted:
            return
        segment = self.source.events_segment(service)
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
        """A deleted service leaves the kernel's cache; poll(2)/select(2) waiters whose file is now readable wake."""
        gone = not self.source.has_service(service)
        if gone:  # a service applied again under this name starts its events at segment 0
            self._segments.pop(service, None)
        active = self._inos.get(("active",))
        if gone and self.mounted and active is not None:
            try:
                pyfuse3.invalidate_entry_async(active, service.encode(), ignore_enoent=True)
            except OSError:
                pass
        for fh, (h, ph) in list(self._pollers.items()):
            if h.readable():
                del self._pollers[fh]
                try:
                    ph.notify()
                except OSError:
                    pass

    # -- lookup and directories ------------------------------------------------------------

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path, node = self._node(parent_inode)
        await node.fresh()  # what stat and names say may need a request (another node's logs: view/files.py)
        child_name, child = node.lookup(name)
        await child.fresh()
        return self._looked_up(self._attrs(child.inode_key((*path, child_name)), child, parent=node))

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path, node = self._node(inode)
        await node.fresh()
        return self._attrs(path, node, ino=inode)

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path, node = self._node(inode)
        if not node.stat().is_dir:
            raise FUSEError(errno.ENOTDIR)
        return self._new_fh(OpenDir(path, node))

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs[fh]
        up = d.path[:-1]
        dots: list[tuple[str, Path, File | None]] = [(".", d.path, d.node), ("..", up, self.ns.resolve(up))]
        if start_id == 0:
            await d.node.fresh()
        names = d.node.names()
        for i in range(start_id, len(dots) + len(names)):
            if i < len(dots):  # the kernel takes no reference on "." and ".."
                name, path, node = dots[i]
                if node is not None and not pyfuse3.readdir_reply(
                        token, name.encode(), self._attrs(path, node, self._inos.get(path)), i + 1):
                    return
                continue
            name = names[i - len(dots)]
            child = d.node.child(name)
            if child is None:
                continue
            await child.fresh()
            path = child.inode_key((*d.path, name))
            try:
                attrs = self._attrs(path, child, self._inos.get(path), d.node)
            except Error:
                continue  # (another node's log, that node not answering): its lookup says why, EIO
            if not pyfuse3.readdir_reply(token, name.encode(), attrs, i + 1):
                return
            self._looked_up(attrs)  # readdirplus: each entry given counts as a lookup

    @_guard
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # -- files ---------------------------------------------------------------------------------

    def _new_fh(self, h: Open | OpenDir) -> int:
        fh = self._next_fh
        self._next_fh += 1
        if isinstance(h, Open):
            self._handles[fh] = h
        else:
            self._dirs[fh] = h
        return fh

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        mode = OpenMode(write=flags & os.O_ACCMODE != os.O_RDONLY, truncate=bool(flags & os.O_TRUNC),
                        nonblock=bool(flags & os.O_NONBLOCK), append=bool(flags & os.O_APPEND))
        h = self._node(inode)[1].open(ctx, mode)
        if mode.truncate:
            await self.source.settled()
        return pyfuse3.FileInfo(fh=self._new_fh(Open(h, ctx.pid)), direct_io=True)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        o = self._handles[fh]
        if o.handle.blocking:
            return await self._blocking_read(o, _fusereq.current(fh, off, size), off, size)
        return await o.handle.read(off, size)

    async def _blocking_read(self, o: Open, req: _fusereq.Request | None, off: int, size: int) -> bytes:
        pid = o.pid
        interrupted = req.interrupted if req is not None else lambda: _signalled(pid)
        data = b""
        try:
            with trio.CancelScope() as scope:
                self._blocked[scope] = interrupted
                self._watch_blocked()
                data = await o.handle.read(off, size)
        finally:
            self._blocked.pop(scope, None)
        if scope.cancelled_caught or self.closing:  # Ctrl-C or kill of the reader, or shutdown
            raise FUSEError(errno.EINTR)
        return data

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
        o = self._handles.get(fh)
        if o is None:
            return select.POLLIN | select.POLLRDNORM
        if not o.handle.readable():
            if poll_handle is not None:  # one per open file: repeated polls replace it
                self._pollers[fh] = (o.handle, poll_handle)
            return 0
        out = select.POLLIN | select.POLLRDNORM
        return out | (select.POLLOUT | select.POLLWRNORM if o.handle.writable else 0)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            return await self._handles[fh].handle.write(off, buf)
        finally:  # answered once what it wrote can be read (a refused command writes its event)
            await self.source.settled()

    @_guard
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path, node = self._node(inode)
        o = self._handles.get(fh) if fh is not None else None  # ftruncate: the open file's own bytes
        node.setattr(ctx, attr.st_size if fields.update_size else None,
                     bool(fields.update_mode or fields.update_uid or fields.update_gid),
                     o.handle if o is not None else None)
        await self.source.settled()
        return self._attrs(path, node)

    @_guard
    async def flush(self, fh: int) -> None:
        # Each close(2) of a descriptor (dup's included) sends FLUSH and waits for its answer,
        # so an edit committed here reports its error to close(); RELEASE comes too late for that.
        await self._commit(fh)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._commit(fh)

    async def _commit(self, fh: int) -> None:
        o = self._handles.get(fh)
        if o is None:
            return
        if o.handle.commit():
            await self.source.settled()

    @_guard
    async def release(self, fh: int) -> None:
        o = self._handles.pop(fh, None)
        self._pollers.pop(fh, None)
        if o is not None:
            try:
                # O_TRUNC with no write (or a release with no FLUSH before it): once answered, a
                # read must see it, as after a FLUSH
                if o.handle.commit(last=True):
                    await self.source.settled()
            finally:
                o.handle.release()

    # -- manifests/: create, unlink, rename ----------------------------------------------------

    @_guard
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path, node = self._node(parent_inode)
        n, f, h = node.create(ctx, name, exclusive=bool(flags & os.O_EXCL), truncate=bool(flags & os.O_TRUNC))
        await self.source.settled()
        fi = pyfuse3.FileInfo(fh=self._new_fh(Open(h, ctx.pid)), direct_io=True)
        return fi, self._looked_up(self._attrs((*path, n), f))

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path, node = self._node(parent_inode)
        self._forget_path((*path, node.unlink(ctx, name)))
        await self.source.settled()

    @_guard
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        path, node = self._node(parent_inode_old)
        old, new = node.rename(ctx, name_old, name_new, noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
                               exchange=bool(flags & pyfuse3.RENAME_EXCHANGE),
                               elsewhere=parent_inode_new != parent_inode_old)
        self._forget_path((*path, new))
        ino = self._inos.pop((*path, old), None)
        if ino is not None:  # the kernel keeps the renamed inode: make it the new name's
            self._inos[(*path, new)] = ino
            self._paths[ino] = (*path, new)
        await self.source.settled()

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
