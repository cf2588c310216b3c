"""9P2000.L framing as a state machine with no I/O inside (h11's style).

Bytes go in with :meth:`Connection.receive_data`; requests come out of
:meth:`Connection.next_event`; a reply goes in to :meth:`Connection.send` and
comes out as bytes.  The caller owns the socket, so every behaviour here is
testable with plain bytes, and any byte stream ends in one of three ways:
requests (some of them :class:`Invalid`, to be answered with ``Rlerror``),
``NEED_DATA``, or :class:`ProtocolError` (framing is lost: close the
connection).  Nothing here raises anything else on bad input.

What the machine keeps: whether ``Tversion`` happened and the ``msize`` it
agreed (a frame larger than that is a framing error, since nothing after it
could be trusted), and the tags in flight (a reused tag would make the
replies ambiguous, so it is a framing error too; a reply may only answer a
tag in flight, and ``Rflush`` retires the tag it flushed).

Layouts are those of Linux's net/9p and diod: ``size[4] type[1] tag[2]``
then the body; strings are ``len[2]`` + UTF-8; a qid is ``type[1]
version[4] path[8]``.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, fields
from typing import ClassVar, Final, NamedTuple

NOTAG: Final = 0xFFFF
NOFID: Final = 0xFFFFFFFF
HEADER: Final = 7  # size[4] type[1] tag[2]
IOHDRSZ: Final = 24  # what a client reserves around read/write data: iounit = msize - IOHDRSZ
MIN_MSIZE: Final = 4096  # below this not even a directory entry with a long name fits
VERSION_L: Final = "9P2000.L"

QTDIR: Final = 0x80
QTFILE: Final = 0x00

# getattr request_mask / Rgetattr valid bits
GETATTR_BASIC: Final = 0x7FF
# setattr valid bits
SETATTR_MODE, SETATTR_UID, SETATTR_GID, SETATTR_SIZE = 0x1, 0x2, 0x4, 0x8
SETATTR_ATIME, SETATTR_MTIME, SETATTR_CTIME = 0x10, 0x20, 0x40


class Qid(NamedTuple):
    type: int
    version: int
    path: int


# -- messages ---------------------------------------------------------------------------------
# Each message is a frozen dataclass whose fields, in order, are its wire fields; FMT gives one
# letter per field: b u8, w u16, d u32, q u64, s string, Q qid, S strings (u16 count), R qids
# (u16 count), D data (u32 count), o an optional trailing u32 (Tfsync's datasync, which old
# clients leave out).


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[int]
    FMT: ClassVar[str]


@dataclass(frozen=True)
class Tversion(Message):
    TYPE, FMT = 100, "ds"
    msize: int
    version: str


@dataclass(frozen=True)
class Rversion(Message):
    TYPE, FMT = 101, "ds"
    msize: int
    version: str


@dataclass(frozen=True)
class Tauth(Message):
    TYPE, FMT = 102, "dssd"
    afid: int
    uname: str
    aname: str
    n_uname: int


@dataclass(frozen=True)
class Tattach(Message):
    TYPE, FMT = 104, "ddssd"
    fid: int
    afid: int
    uname: str
    aname: str
    n_uname: int


@dataclass(frozen=True)
class Rattach(Message):
    TYPE, FMT = 105, "Q"
    qid: Qid


@dataclass(frozen=True)
class Rlerror(Message):
    TYPE, FMT = 7, "d"
    ecode: int


@dataclass(frozen=True)
class Tflush(Message):
    TYPE, FMT = 108, "w"
    oldtag: int


@dataclass(frozen=True)
class Rflush(Message):
    TYPE, FMT = 109, ""


@dataclass(frozen=True)
class Twalk(Message):
    TYPE, FMT = 110, "ddS"
    fid: int
    newfid: int
    wnames: tuple[str, ...]


@dataclass(frozen=True)
class Rwalk(Message):
    TYPE, FMT = 111, "R"
    qids: tuple[Qid, ...]


@dataclass(frozen=True)
class Tread(Message):
    TYPE, FMT = 116, "dqd"
    fid: int
    offset: int
    count: int


@dataclass(frozen=True)
class Rread(Message):
    TYPE, FMT = 117, "D"
    data: bytes


@dataclass(frozen=True)
class Twrite(Message):
    TYPE, FMT = 118, "dqD"
    fid: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class Rwrite(Message):
    TYPE, FMT = 119, "d"
    count: int


@dataclass(frozen=True)
class Tclunk(Message):
    TYPE, FMT = 120, "d"
    fid: int


@dataclass(frozen=True)
class Rclunk(Message):
    TYPE, FMT = 121, ""


@dataclass(frozen=True)
class Tremove(Message):
    TYPE, FMT = 122, "d"
    fid: int


@dataclass(frozen=True)
class Rremove(Message):
    TYPE, FMT = 123, ""


@dataclass(frozen=True)
class Tstatfs(Message):
    TYPE, FMT = 8, "d"
    fid: int


@dataclass(frozen=True)
class Rstatfs(Message):
    TYPE, FMT = 9, "ddqqqqqqd"
    type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    fsid: int
    namelen: int


@dataclass(frozen=True)
class Tlopen(Message):
    TYPE, FMT = 12, "dd"
    fid: int
    flags: int


@dataclass(frozen=True)
class Rlopen(Message):
    TYPE, FMT = 13, "Qd"
    qid: Qid
    iounit: int


@dataclass(frozen=True)
class Tlcreate(Message):
    TYPE, FMT = 14, "dsddd"
    fid: int
    name: str
    flags: int
    mode: int
    gid: int


@dataclass(frozen=True)
class Rlcreate(Message):
    TYPE, FMT = 15, "Qd"
    qid: Qid
    iounit: int


@dataclass(frozen=True)
class Trename(Message):
    TYPE, FMT = 20, "dds"
    fid: int
    dfid: int
    name: str


@dataclass(frozen=True)
class Rrename(Message):
    TYPE, FMT = 21, ""


@dataclass(frozen=True)
class Tgetattr(Message):
    TYPE, FMT = 24, "dq"
    fid: int
    request_mask: int


@dataclass(frozen=True)
class Rgetattr(Message):
    TYPE, FMT = 25, "qQdddqqqqqqqqqqqqqqq"
    valid: int
    qid: Qid
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int
    ctime_sec: int
    ctime_nsec: int
    btime_sec: int
    btime_nsec: int
    gen: int
    data_version: int


@dataclass(frozen=True)
class Tsetattr(Message):
    TYPE, FMT = 26, "dddddqqqqq"
    fid: int
    valid: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int


@dataclass(frozen=True)
class Rsetattr(Message):
    TYPE, FMT = 27, ""


@dataclass(frozen=True)
class Txattrwalk(Message):
    TYPE, FMT = 30, "dds"
    fid: int
    newfid: int
    name: str


@dataclass(frozen=True)
class Treaddir(Message):
    TYPE, FMT = 40, "dqd"
    fid: int
    offset: int
    count: int


@dataclass(frozen=True)
class Rreaddir(Message):
    TYPE, FMT = 41, "D"
    data: bytes  # entries: qid[13] offset[8] type[1] name[s]; see dirent()


@dataclass(frozen=True)
class Tfsync(Message):
    TYPE, FMT = 50, "do"
    fid: int
    datasync: int = 0


@dataclass(frozen=True)
class Rfsync(Message):
    TYPE, FMT = 51, ""


@dataclass(frozen=True)
class Tmkdir(Message):
    TYPE, FMT = 72, "dsdd"
    dfid: int
    name: str
    mode: int
    gid: int


@dataclass(frozen=True)
class Trenameat(Message):
    TYPE, FMT = 74, "dsds"
    olddirfid: int
    oldname: str
    newdirfid: int
    newname: str


@dataclass(frozen=True)
class Rrenameat(Message):
    TYPE, FMT = 75, ""


@dataclass(frozen=True)
class Tunlinkat(Message):
    TYPE, FMT = 76, "dsd"
    dirfid: int
    name: str
    flags: int


@dataclass(frozen=True)
class Runlinkat(Message):
    TYPE, FMT = 77, ""


MESSAGES: Final[dict[int, type[Message]]] = {
    m.TYPE: m for m in (
        Tversion, Rversion, Tauth, Tattach, Rattach, Rlerror, Tflush, Rflush, Twalk, Rwalk, Tread, Rread,
        Twrite, Rwrite, Tclunk, Rclunk, Tremove, Rremove, Tstatfs, Rstatfs, Tlopen, Rlopen, Tlcreate, Rlcreate,
        Trename, Rrename, Tgetattr, Rgetattr, Tsetattr, Rsetattr, Txattrwalk, Treaddir, Rreaddir, Tfsync,
        Rfsync, Tmkdir, Trenameat, Rrenameat, Tunlinkat, Runlinkat)
}
REQUESTS: Final = {t: m for t, m in MESSAGES.items() if m.__name__.startswith("T")}


@dataclass(frozen=True)
class Invalid:
    """A well-framed request this server cannot take: answer ``Rlerror(errno)`` under its tag."""
    type: int
    errno: int
    reason: str


class Frame(NamedTuple):
    tag: int
    msg: Message | Invalid


class ProtocolError(Exception):
    """Framing is lost (or the peer broke the rules of tags): close the connection."""


class LocalProtocolError(Exception):
    """Our own side tried to send something 9P forbids: a bug in the server."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


# -- encoding ---------------------------------------------------------------------------------

_INT = {"b": struct.Struct("<B"), "w": struct.Struct("<H"), "d": struct.Struct("<I"), "q": struct.Struct("<Q"),
        "o": struct.Struct("<I")}
_QID = struct.Struct("<BIQ")
_HDR = struct.Struct("<IBH")


def _put_str(out: bytearray, s: str) -> None:
    raw = s.encode("utf-8", "surrogateescape")
    if len(raw) > 0xFFFF:
        raise LocalProtocolError("string longer than 65535 bytes")
    out += struct.pack("<H", len(raw)) + raw


def encode_body(msg: Message) -> bytes:
    out = bytearray()
    for kind, f in zip(msg.FMT, fields(msg)):
        v = getattr(msg, f.name)
        if kind in _INT:
            try:
                out += _INT[kind].pack(v)
            except struct.error as e:
                raise LocalProtocolError(f"{type(msg).__name__}.{f.name}: {e}") from None
        elif kind == "s":
            _put_str(out, v)
        elif kind == "Q":
            out += _QID.pack(*v)
        elif kind == "S":
            out += struct.pack("<H", len(v))
            for s in v:
                _put_str(out, s)
        elif kind == "R":
            out += struct.pack("<H", len(v))
            for q in v:
                out += _QID.pack(*q)
        elif kind == "D":
            out += struct.pack("<I", len(v)) + v
    return bytes(out)


def encode(tag: int, msg: Message) -> bytes:
    body = encode_body(msg)
    return _HDR.pack(HEADER + len(body), msg.TYPE, tag) + body


def dirent(qid: Qid, offset: int, dtype: int, name: str) -> bytes:
    """One Rreaddir entry; ``offset`` is what the client sends to read on after it."""
    out = bytearray(_QID.pack(*qid) + struct.pack("<QB", offset, dtype))
    _put_str(out, name)
    return bytes(out)


# -- decoding ---------------------------------------------------------------------------------

class _Short(Exception):
    pass


class _Reader:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.at = buf, 0

    def take(self, n: int) -> memoryview:
        if self.at + n > len(self.buf):
            raise _Short
        out = self.buf[self.at: self.at + n]
        self.at += n
        return out

    def int(self, s: struct.Struct) -> int:
        value: int = s.unpack(self.take(s.size))[0]
        return value

    def str(self) -> str:
        n = self.int(_INT["w"])
        return bytes(self.take(n)).decode("utf-8", "surrogateescape")

    def qid(self) -> Qid:
        return Qid(*_QID.unpack(self.take(_QID.size)))


def decode_body(cls: type[Message], body: memoryview) -> Message:
    """The message of that type; ValueError when the body does not hold exactly its fields."""
    r = _Reader(body)
    args: list[object] = []
    try:
        for kind in cls.FMT:
            if kind == "o":
                if r.at == len(body):
                    break  # optional trailing field left out
                args.append(r.int(_INT[kind]))
            elif kind in _INT:
                args.append(r.int(_INT[kind]))
            elif kind == "s":
                args.append(r.str())
            elif kind == "Q":
                args.append(r.qid())
            elif kind == "S":
                args.append(tuple(r.str() for _ in range(r.int(_INT["w"]))))
            elif kind == "R":
                args.append(tuple(r.qid() for _ in range(r.int(_INT["w"]))))
            elif kind == "D":
                args.append(bytes(r.take(r.int(_INT["d"]))))
    except _Short:
        raise ValueError(f"{cls.__name__}: body too short") from None
    if r.at != len(body):
        raise ValueError(f"{cls.__name__}: {len(body) - r.at} bytes past its fields")
    return cls(*args)


def decode(frame: bytes) -> Frame:
    """A whole frame (header included) as a message of any known type: for clients and tests."""
    size, mtype, tag = _HDR.unpack_from(frame)
    if size != len(frame) or mtype not in MESSAGES:
        raise ValueError(f"bad frame: size {size} of {len(frame)}, type {mtype}")
    return Frame(tag, decode_body(MESSAGES[mtype], memoryview(frame)[HEADER:]))


# -- the state machine --------------------------------------------------------------------------

class Connection:
    """One 9P2000.L server connection's protocol state.

    ``max_msize`` is the largest frame we accept or send; Tversion may lower
    it.  ``max_outstanding`` bounds the tags in flight: a client over it gets
    ``Rlerror(EAGAIN)`` for the extra request (its tag is never in flight).
    """

    def __init__(self, max_msize: int = 65536 + IOHDRSZ, max_outstanding: int = 64) -> None:
        if max_msize < MIN_MSIZE:
            raise ValueError(f"max_msize below {MIN_MSIZE}")
        self.max_msize = max_msize
        self.msize = max_msize  # until Tversion: bounds the Tversion frame itself
        self.max_outstanding = max_outstanding
        self.versioned = False
        self.closed = False
        self.outstanding: dict[int, Message | Invalid] = {}
        self._buf = bytearray()
        self._eof = False

    # -- receiving --

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means it closed its side."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Frame | _NeedData:
        """The next request, or NEED_DATA; ProtocolError once framing is lost or the peer closed."""
        if self.closed:
            raise ProtocolError("connection closed")
        if len(self._buf) < HEADER:
            return self._need()
        size, mtype, tag = _HDR.unpack_from(self._buf)
        if size < HEADER or size > self.msize:
            return self._lost(f"frame size {size} outside {HEADER}..{self.msize}")
        if len(self._buf) < size:
            return self._need()
        body = memoryview(bytes(self._buf[HEADER:size]))
        del self._buf[:size]
        return self._request(mtype, tag, body)

    def _need(self) -> _NeedData:
        if self._eof:
            self.closed = True
            raise ProtocolError("peer closed" + (" mid-frame" if self._buf else ""))
        return NEED_DATA

    def _lost(self, why: str) -> Frame:
        self.closed = True
        raise ProtocolError(why)

    def _request(self, mtype: int, tag: int, body: memoryview) -> Frame:
        cls = REQUESTS.get(mtype)
        if cls is Tversion:
            try:
                version = decode_body(Tversion, body)
            except ValueError as e:
                return self._lost(str(e))
            # A new session: everything in flight is abandoned (the server drops its fids too).
            self.outstanding.clear()
            self.versioned = False
            self.outstanding[tag] = version
            return Frame(tag, version)
        if tag in self.outstanding:
            return self._lost(f"tag {tag} reused while in flight")
        msg: Message | Invalid
        if cls is None:
            msg = Invalid(mtype, errno.EOPNOTSUPP, f"message type {mtype} not supported")
        elif not self.versioned:
            msg = Invalid(mtype, errno.EPROTO, "Tversion first")
        else:
            try:
                msg = decode_body(cls, body)
            except ValueError as e:
                msg = Invalid(mtype, errno.EPROTO, str(e))
        if len(self.outstanding) >= self.max_outstanding and cls is not Tflush:
            msg = Invalid(mtype, errno.EAGAIN, "too many requests in flight")
        self.outstanding[tag] = msg  # an Invalid one too: its Rlerror must be the tag's only answer
        return Frame(tag, msg)

    # -- sending --

    def version_reply(self, req: Tversion) -> Rversion:
        """What to answer a Tversion: our msize if smaller, and 9P2000.L or 'unknown'."""
        if not req.version.startswith(VERSION_L):
            return Rversion(min(req.msize, self.max_msize), "unknown")
        return Rversion(max(MIN_MSIZE, min(req.msize, self.max_msize)), VERSION_L)

    def send(self, tag: int, msg: Message) -> bytes:
        """The bytes of a reply to the request in flight under ``tag`` (or to an Invalid one)."""
        if self.closed:
            raise LocalProtocolError("connection closed")
        req = self.outstanding.pop(tag, None)
        if req is None:
            raise LocalProtocolError(f"no request in flight under tag {tag}")
        if isinstance(req, Tversion):
            if not isinstance(msg, (Rversion, Rlerror)):
                raise LocalProtocolError("Tversion wants Rversion")
            if isinstance(msg, Rversion) and msg.version == VERSION_L:
                self.msize, self.versioned = msg.msize, True
        elif isinstance(req, Tflush):
            self.outstanding.pop(req.oldtag, None)  # answered or abandoned: the client may reuse it now
        out = encode(tag, msg)
        if len(out) > self.msize:
            raise LocalProtocolError(f"{type(msg).__name__} of {len(out)} bytes exceeds msize {self.msize}")
        return out

    def error(self, tag: int, err: int) -> bytes:
        return self.send(tag, Rlerror(err))
