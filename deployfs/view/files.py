"""Each kind of file in the namespace, as one class that knows what it does.

A file answers ``stat``, ``open`` (giving a :class:`Handle` that reads,
writes and is polled), ``setattr`` (truncate), and, for directories,
``lookup``, ``names``, ``create``, ``unlink`` and ``rename``.  Everything is
in paths, names, bytes, offsets, callers and error kinds: a front end (FUSE,
9P) turns its protocol's requests into these calls, one line each, and
:class:`~deployfs.model.errors.Error` kinds back into its own errors.

Reads are ``async``: a handle whose ``blocking`` is true (``wait``) may
wait for a change, and a front end runs that read in a cancel scope it
cancels when the reader gives up (FUSE's interrupt, 9P's Tflush).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from ..model.errors import CommandError, Error, Kind
from ..model.ctl import parse_command
from ..model.manifest import MAX_MANIFEST_BYTES
from .access import Caller

if TYPE_CHECKING:
    from .namespace import Namespace

Path = tuple[str, ...]
NAME_MAX = 255
# Names a manifests/ entry may have: editors' temp and swap files included
# (vim's .web.swp, sed's sedXXXXXX); only service names can ever be applied.
FILE_NAME_RE = re.compile(r"[^/\x00-\x1f\x7f]{1,255}")
# An inode's own name, reached only through the inode a front end kept, never
# looked up or listed: events@<segment> (a rotated-away events file) and
# logs/@<id> (an instance's log, whose inode follows the instance when slots renumber).
RETIRED_EVENTS_RE = re.compile(r"events@([0-9]{1,9})")
LOG_BY_ID_RE = re.compile(r"@([0-9]{1,12})")
MAX_MANIFEST_FILES = 10_000


class Changes(enum.Enum):
    """How a file's attributes change, so a front end knows what it may cache."""
    NEVER = "never"  # mode and owner are fixed (directories)
    NOTIFIED = "notified"  # changes only with an on_event the front end is told of (events)
    ALWAYS = "always"  # may change at any moment: ask every time


@dataclass(frozen=True)
class Stat:
    is_dir: bool
    mode: int  # permission bits
    size: int = 0
    mtime: float = 0.0  # wall clock
    changes: Changes = Changes.ALWAYS


@dataclass(frozen=True)
class OpenMode:
    write: bool = False
    truncate: bool = False
    nonblock: bool = False
    append: bool = False  # O_APPEND: every write goes to the end of the file as it is when committed


def check_name(raw: bytes) -> str:
    """A name a caller gave: as on a disk, at most NAME_MAX bytes; UTF-8; no '/' or control characters."""
    if len(raw) > NAME_MAX:
        raise Error(Kind.NAME_TOO_LONG, f"a name is at most {NAME_MAX} bytes")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Error(Kind.INVALID, "a name must be UTF-8") from None
    if name in (".", "..") or not FILE_NAME_RE.fullmatch(name):
        raise Error(Kind.INVALID, f"bad name {name[:70]!r}")
    return name


def who(caller: Caller) -> str:
    """How events name a caller."""
    return f"uid={caller.uid}"


# -- handles: what an open file does ---------------------------------------------------------------

class Handle:
    blocking = False  # a read may wait for a change: the front end must be able to cancel it
    writable = False  # poll says it can be written

    async def read(self, off: int, size: int) -> bytes:
        return b""

    async def write(self, off: int, data: bytes) -> int:
        raise Error(Kind.BAD_HANDLE, "not open for writing")

    def readable(self) -> bool:
        """Would a read answer now (poll/select)?"""
        return True

    def commit(self, last: bool = False) -> bool:
        """Make what was written through this handle take effect (close, fsync): its error reaches the caller.
        True if something was written (the front end then answers once the records show it).

        ``last``: the handle is being released (no descriptor is left), and the caller hears of no error."""
        return False

    def truncate(self, size: int) -> bool:
        """Truncate what this handle writes (ftruncate); False: the handle keeps no bytes of its own."""
        return False

    def release(self) -> None:
        pass


class DataHandle(Handle):
    """Bytes fixed at open: a state file rendered once, so several reads of one open agree."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, off: int, size: int) -> bytes:
        return self.data[off: off + size]


# -- files -----------------------------------------------------------------------------------------

class File:
    ns: "Namespace"
    name_cached = True  # a front end may cache this name (events: a rotation gives the name a new inode)
    volatile = False  # a directory whose names change behind the front end's back

    def inode_key(self, path: Path) -> Path:
        """The path an inode is kept under (by default the path it was found at)."""
        return path

    async def fresh(self) -> None:
        """Bring what ``stat`` (and a directory's names) say up to date, where that needs a
        request (another node's log): a front end awaits it before it answers with them."""

    def stat(self) -> Stat:
        raise NotImplementedError

    def open(self, caller: Caller, mode: OpenMode) -> Handle:
        if mode.write:
            raise Error(Kind.PERMISSION, "read-only file")
        return self.reader(caller, mode)

    def reader(self, caller: Caller, mode: OpenMode) -> Handle:
        raise NotImplementedError

    def setattr(self, caller: Caller, size: int | None, chmod: bool, handle: Handle | None = None) -> None:
        """Truncate to ``size`` and/or change mode or owner (``chmod``); times are always accepted.

        ``handle``: the open file it came through (ftruncate), which may keep the bytes it truncates."""
        if size is not None or chmod:
            raise Error(Kind.NOT_PERMITTED, "deployfs decides this file's size, mode and owner")

    # directory operations: a file has none
    def lookup(self, raw: bytes) -> tuple[str, "File"]:
        raise Error(Kind.NOT_A_DIRECTORY)

    def names(self) -> list[str]:
        raise Error(Kind.NOT_A_DIRECTORY)

    def child(self, name: str) -> "File | None":
        return None

    def create(self, caller: Caller, raw: bytes, exclusive: bool, truncate: bool) -> tuple[str, "File", Handle]:
        raise Error(Kind.PERMISSION, "nothing can be created here")

    def unlink(self, caller: Caller, raw: bytes) -> str:
        raise Error(Kind.PERMISSION, "nothing can be removed here")

    def rename(self, caller: Caller, old: bytes, new: bytes, noreplace: bool = False,
               exchange: bool = False, elsewhere: bool = False) -> tuple[str, str]:
        """Rename ``old`` to ``new`` (``elsewhere``: into another directory, which no file here can do)."""
        raise Error(Kind.PERMISSION, "nothing can be renamed here")


@dataclass(frozen=True)
class Dir(File):
    ns: "Namespace"
    listing: Callable[[], list[str]]
    get: Callable[[str], File | None]
    # Names change behind the front end's back (slots renumber): never cache them.
    # Elsewhere names only appear (services), or change through the front end
    # itself (manifests/), so a kernel's dentry cache stays right.
    volatile: bool = False
    refresh: Callable[[], Awaitable[None]] | None = None  # what `fresh` does (logs/: ask other nodes)

    async def fresh(self) -> None:
        if self.refresh is not None:
            await self.refresh()

    def stat(self) -> Stat:
        return Stat(True, 0o555, changes=Changes.NEVER)

    def reader(self, caller: Caller, mode: OpenMode) -> Handle:
        raise Error(Kind.IS_A_DIRECTORY)

    def lookup(self, raw: bytes) -> tuple[str, File]:
        try:
            name = check_name(raw)
        except Error as e:
            raise Error(e.kind if e.kind is Kind.NAME_TOO_LONG else Kind.NOT_FOUND, e.message) from None
        if RETIRED_EVENTS_RE.fullmatch(name) or LOG_BY_ID_RE.fullmatch(name):
            raise Error(Kind.NOT_FOUND)  # an inode's own name: no inode per made-up name
        found = self.get(name)
        if found is None:
            raise Error(Kind.NOT_FOUND)
        return name, found

    def names(self) -> list[str]:
        return self.listing()

    def child(self, name: str) -> File | None:
        return self.get(name)


@dataclass(frozen=True)
class ManifestsDir(Dir):
    """manifests/: the one directory whose entries are created, removed and renamed."""

    def stat(self) -> Stat:
        return Stat(True, 0o755 | self.ns.group_write, changes=Changes.NEVER)

    def _writer(self, caller: Caller) -> None:
        if not self.ns.access.may_write(caller):
            raise Error(Kind.PERMISSION, "only the serving user, root and --group may change manifests")

    def create(self, caller: Caller, raw: bytes, exclusive: bool, truncate: bool) -> tuple[str, File, Handle]:
        self._writer(caller)
        name = check_name(raw)
        src = self.ns.source
        exists = src.manifest_file(name) is not None
        if exists and exclusive:
            raise Error(Kind.EXISTS, f"manifests/{name} exists")
        if not exists and len(src.manifest_names()) >= MAX_MANIFEST_FILES:
            raise Error(Kind.NO_SPACE, f"at most {MAX_MANIFEST_FILES} files in manifests/")
        if not exists:  # the name exists from here on (an editor renames it once written); its bytes wait for close
            src.put_manifest(name, b"")
        f = ManifestEntry(self.ns, name)
        return name, f, ManifestHandle(f, may_write=True, truncate=exists and truncate)

    def unlink(self, caller: Caller, raw: bytes) -> str:
        self._writer(caller)
        name = check_name(raw)
        if self.ns.source.manifest_file(name) is None:
            raise Error(Kind.NOT_FOUND, f"no manifests/{name}")
        self.ns.source.delete_manifest(name)
        return name

    def rename(self, caller: Caller, old: bytes, new: bytes, noreplace: bool = False,
               exchange: bool = False, elsewhere: bool = False) -> tuple[str, str]:
        """Rename ``old`` to ``new`` (``elsewhere``: into another directory, which no file here can do)."""
        self._writer(caller)
        if elsewhere:
            raise Error(Kind.CROSS_DIRECTORY, "a manifest stays in manifests/")
        o, n = check_name(old), check_name(new)
        src = self.ns.source
        if src.manifest_file(o) is None:
            raise Error(Kind.NOT_FOUND, f"no manifests/{o}")
        if noreplace and src.manifest_file(n) is not None:
            raise Error(Kind.EXISTS, f"manifests/{n} exists")
        if exchange:
            raise Error(Kind.INVALID, "manifests cannot be exchanged")
        src.rename_manifest(o, n)
        return o, n


@dataclass(frozen=True)
class StateFile(File):
    """A small state file: rendered whole at open; its size is what a render gives now."""
    ns: "Namespace"
    render: Callable[[], bytes]
    mtime: Callable[[], float]

    def stat(self) -> Stat:
        return Stat(False, 0o444, len(self.render()), self.mtime())

    def reader(self, caller: Caller, mode: OpenMode) -> Handle:
        return DataHandle(self.render())


@dataclass(frozen=True)
class EventsFile(File):
    """An events log: the current segment (None), the one before (-1), or segment n (a retired inode)."""
    ns: "Namespace"
    service: str
    segment: int | None
    name_cached = False  # a rotation gives `events` a new inode, as logrotate does

    def stat(self) -> Stat:
        src = self.ns.source
        # Its true size, known without a copy (tail -f depends on it); an empty log dates from the start, not 1970.
        return Stat(False, 0o444, len(src.events_bytes(self.service, self.segment)),
                    src.events_mtime(self.service, self.segment) or self.ns.started, Changes.NOTIFIED)

    def reader(self, caller: Caller, mode: OpenMode) -> Handle:
        # The segment is fixed at open: after a rotation this descriptor reads the
        # retired segment to its end, as a renamed file on a disk keeps its data.
        current = self.ns.source.events_segment(self.service)
        segment = current if self.segment is None else current - 1 if self.segment == -1 else self.segment
        return EventsHandle(self.ns, self.service, segment)


class EventsHandle(Handle):
    def __init__(self, ns: "Namespace", service: str, segment: int) -> None:
        self.ns, self.service, self.segment = ns, service, segment

    async def read(self, off: int, size: int) -> bytes:
        return bytes(self.ns.source.events_bytes(self.service, self.segment)[off: off + size])

    async def follow(self, off: int, size: int) -> bytes:
        """Like read, but at the end of the current segment wait for the next event (``tail -f``
        for a front end the kernel does not tell of growth: cancel it as a blocked read).  A
        segment rotated away has no more to come: its end is the end."""
        src = self.ns.source
        while not (data := await self.read(off, size)) and src.events_segment(self.service) == self.segment:
            await src.events_appended(self.service)
        return data


@dataclass(frozen=True)
class LogFile(File):
    """An instance's output, read live from wherever it is kept (this node's files, or
    the node that runs the instance: the source knows which).

    Not a snapshot: between two rotations it only grows, so its true size and
    a read at any offset are all `tail -f` needs.  Only the bytes asked for
    are read, however large the files.
    """
    ns: "Namespace"
    service: str
    instance: int

    def inode_key(self, path: Path) -> Path:
        return (*path[:-1], f"@{self.instance}")  # the inode follows the instance, not the slot

    async def fresh(self) -> None:
        await self.ns.source.log_fresh(self.service, self.instance)

    def exists(self) -> bool:
        try:
            return self.ns.source.log_info(self.service, self.instance) is not None
        except Error:
            return True  # its node does not answer: shown, and reading it says so (EIO)

    def stat(self) -> Stat:
        info = self.ns.source.log_info(self.service, self.instance)
        if info is None:
            return Stat(False, 0o444, 0, self.ns.started)
        return Stat(False, 0o444, info.size, info.mtime or self.ns.started)

    def reader(self, caller: Caller, mode: OpenMode) -> Handle:
        return LogHandle(self)

    async def read(self, off: int, size: int) -> bytes:
        return await self.ns.source.log_read(self.service, self.instance, off, size)


class LogHandle(Handle):
    def __init__(self, log: LogFile) -> None:
        self.log = log

    async def read(self, off: int, size: int) -> bytes:
        return await self.log.read(off, size)


@dataclass(frozen=True)
class CtlFile(File):
    """One write is one command; the reply is read back from the same open file."""
    ns: "Namespace"
    service: str | None  # None: the top ctl, "<verb> <service> [arg]"

    def stat(self) -> Stat:
        return Stat(False, 0o600 | (0o060 if self.ns.group_write else 0))  # the group reads replies back too

    def open(self, caller: Caller, mode: OpenMode) -> Handle:
        if not self.ns.access.may_write(caller):
            raise Error(Kind.PERMISSION, "only the serving user, root and --group may send commands")
        return CtlHandle(self, caller)

    def setattr(self, caller: Caller, size: int | None, chmod: bool, handle: Handle | None = None) -> None:
        if size is None and chmod:
            raise Error(Kind.NOT_PERMITTED)
        # `echo > ctl` may truncate: nothing to do


class CtlHandle(Handle):
    writable = True

    def __init__(self, ctl: CtlFile, caller: Caller) -> None:
        self.ctl, self.who = ctl, who(caller)
        self.reply = b""
        self.reply_at: int | None = None  # the file offset the reply is read from

    async def write(self, off: int, data: bytes) -> int:
        src = self.ctl.ns.source
        service = self.ctl.service
        try:
            cmd = parse_command(data, service)
            service = cmd.service
            reply = await src.command(cmd.service, cmd.verb, cmd.arg, self.who)
        except CommandError as e:
            self.reply, self.reply_at = f"error: {e.message}\n".encode(), None
            src.refused(service, self.who, e.message)
            raise
        self.reply, self.reply_at = f"{reply}\n".encode(), None
        return len(data)

    async def read(self, off: int, size: int) -> bytes:
        # The reply is read from wherever the descriptor stands: after
        # `echo apply >&3` the offset is past the command (`cat <&3`), with
        # pread it is 0.  Each write starts a new reply.
        if self.reply_at is None or off < self.reply_at:
            self.reply_at = off
        off -= self.reply_at
        return self.reply[off: off + size]


@dataclass(frozen=True)
class WaitFile(File):
    """Blocks while a rollout is in flight, then answers its outcome."""
    ns: "Namespace"
    service: str

    def stat(self) -> Stat:
        return Stat(False, 0o444)

    def reader(self, caller: Caller, mode: OpenMode) -> Handle:
        self.ns.waits.acquire(caller)  # from open to release: opening many and reading later cannot pass the caps
        return WaitHandle(self.ns, self.service, caller.uid, mode.nonblock)


class WaitHandle(Handle):
    blocking = True

    def __init__(self, ns: "Namespace", service: str, uid: int, nonblock: bool) -> None:
        self.ns, self.service, self.uid, self.nonblock = ns, service, uid, nonblock
        self.reading = False
        self.released = False

    def readable(self) -> bool:
        s = self.ns.source.service(self.service)
        return s is None or s.outcome is not None

    async def read(self, off: int, size: int) -> bytes:
        if off > 0:
            return b""
        src = self.ns.source
        s = src.service(self.service)
        if s is None:
            raise Error(Kind.NOT_FOUND, f"no service {self.service!r}")
        if s.outcome is None and self.nonblock:
            raise Error(Kind.WOULD_BLOCK, "a rollout is in flight")
        if self.reading:  # one blocked read per open: threads sharing a descriptor cannot multiply it
            raise Error(Kind.BUSY, "a read of this wait is already blocked")
        self.reading = True
        try:
            while s is not None and s.outcome is None:
                await src.changed(self.service)
                s = src.service(self.service)
        finally:
            self.reading = False
        out = "deleted" if s is None else s.outcome
        return f"{out}\n".encode()[:size]

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.ns.waits.release(self.uid)


@dataclass(frozen=True)
class ManifestEntry(File):
    """A file in manifests/: plain bytes any editor can write.

    A writable open keeps its own copy of the bytes: writes and ftruncate change
    that copy, and it is committed whole when the file is closed (or fsync'ed), so
    nobody else, ``apply`` included, ever sees a half-written manifest.
    """
    ns: "Namespace"
    name: str

    def stat(self) -> Stat:
        f = self.ns.source.manifest_file(self.name)
        if f is None:
            raise Error(Kind.NOT_FOUND, f"no manifests/{self.name}")
        return Stat(False, 0o644 | self.ns.group_write, len(f.data), f.mtime)

    def open(self, caller: Caller, mode: OpenMode) -> Handle:
        if mode.write and not self.ns.access.may_write(caller):
            raise Error(Kind.PERMISSION, "only the serving user, root and --group may change manifests")
        return ManifestHandle(self, may_write=mode.write, truncate=mode.write and mode.truncate,
                              append=mode.write and mode.append)

    def setattr(self, caller: Caller, size: int | None, chmod: bool, handle: Handle | None = None) -> None:
        if not self.ns.access.may_write(caller):
            raise Error(Kind.NOT_PERMITTED)
        if size is not None:
            if size > MAX_MANIFEST_BYTES:
                raise Error(Kind.TOO_BIG, f"a manifest is at most {MAX_MANIFEST_BYTES} bytes")
            if handle is None or not handle.truncate(size):  # truncate(1) by name: a whole change of its own
                self.ns.source.edit_manifest(self.name, lambda data: data[:size].ljust(size, b"\0"))
        # mode, owner and times are accepted (editors set them) but fixed by policy.

    def data(self) -> bytes:
        f = self.ns.source.manifest_file(self.name)
        return b"" if f is None else f.data


class ManifestHandle(Handle):
    """An open manifest; open for writing, it holds the bytes being edited until commit."""
    writable = True

    def __init__(self, entry: ManifestEntry, may_write: bool, truncate: bool = False, append: bool = False) -> None:
        self.entry, self.may_write = entry, may_write
        # O_APPEND (`echo … >> manifests/x`): what it wrote is added at the end of the manifest as the store
        # has it at commit, not at the offsets the kernel passes (its idea of the size may be older than
        # another writer's commit): appends that overlap in time all land whole, as on a disk.
        self.append = append and not truncate
        self.appended = bytearray()
        # O_TRUNC empties only this copy: a truncated manifest is never what others see.
        self.buffer: bytearray | None = None
        if may_write:
            self.buffer = bytearray() if truncate else bytearray(entry.data())
        # O_TRUNC alone takes effect only at the last close: a shell's `> file` opens, dup2()s and
        # closes the first descriptor (a FLUSH) before it writes a byte, and that must not
        # publish an empty manifest.
        self.dirty, self.truncated = False, truncate
        self.refused: Error | None = None  # a write refused: the edit is abandoned, nothing is committed

    async def read(self, off: int, size: int) -> bytes:
        data = self.entry.data() if self.buffer is None else self.buffer
        return bytes(data[off: off + size])

    async def write(self, off: int, data: bytes) -> int:
        if self.buffer is None:
            raise Error(Kind.BAD_HANDLE, "not open for writing")
        if self.refused is not None:
            raise self.refused
        if self.append:
            off = len(self.buffer)
        try:
            if off + len(data) > MAX_MANIFEST_BYTES:
                raise Error(Kind.TOO_BIG, f"a manifest is at most {MAX_MANIFEST_BYTES} bytes")
            # Known now, so refused now: a tool that ignores close()'s error still sees this one.
            self.entry.ns.source.check_room()
        except Error as e:
            # What was written before is only part of the edit: committing it at close would
            # publish a half-written manifest (the first 64 KiB of an oversized one).
            self.refused = e
            raise
        if off > len(self.buffer):
            self.buffer.extend(bytes(off - len(self.buffer)))
        self.buffer[off: off + len(data)] = data
        if self.append:
            self.appended += data
        self.dirty = True
        return len(data)

    def truncate(self, size: int) -> bool:
        if self.buffer is None:
            return False
        if self.refused is not None:
            raise self.refused
        self.append = False  # cut to a size: what it holds now is the whole file, as written
        del self.buffer[size:]
        self.buffer.extend(bytes(size - len(self.buffer)))
        self.dirty = True
        return True

    def commit(self, last: bool = False) -> bool:
        if self.refused is not None:
            raise self.refused  # close() says it too: the edit was not kept
        if self.buffer is None or not (self.dirty or (last and self.truncated)):
            return False  # a second close of a dup'ed descriptor commits again only what changed since
        # A manifest removed or renamed away since the open keeps its new state: the edit is dropped,
        # as a write to an unlinked file is.
        source, name = self.entry.ns.source, self.entry.name
        if self.append and self.appended:
            added = bytes(self.appended)
            if source.manifest_file(name) is not None:
                def add(old: bytes) -> bytes:
                    if len(old) + len(added) > MAX_MANIFEST_BYTES:
                        raise Error(Kind.TOO_BIG, f"a manifest is at most {MAX_MANIFEST_BYTES} bytes")
                    return old + added
                source.edit_manifest(name, add)
            self.appended = bytearray()
        elif not self.append:
            source.replace_manifest(name, bytes(self.buffer))
        self.dirty = self.truncated = False
        return True
