"""A small blocking 9P2000.L client for the tests: what diodcat and diodls do not exercise
(writes, creates, renames, flush, several requests in flight)."""

from __future__ import annotations

import os
import socket
import struct
import time

from deployfs.serve.ninep import codec as c


class NinepError(OSError):
    pass


class Client:
    def __init__(self, address: tuple[str, int] | str, *, uid: int | None = None, msize: int = 65536 + 24,
                 timeout: float = 10.0, source: str | None = None) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source is not None:  # another loopback address (127.0.0.2): another peer to the server's per-peer cap
            self.sock.bind((source, 0))
        self.sock.connect(address)
        self._buf = b""
        self._fid = 100
        reply = self.rpc(c.Tversion(msize, c.VERSION_L), tag=c.NOTAG)
        assert isinstance(reply, c.Rversion) and reply.version == c.VERSION_L
        self.msize = reply.msize
        self.root = 0
        self.rpc(c.Tattach(self.root, c.NOFID, "", "deploy", os.getuid() if uid is None else uid))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the wire --

    def send(self, tag: int, msg: c.Message) -> None:
        self.sock.sendall(c.encode(tag, msg))

    def recv(self) -> c.Frame:
        while True:
            if len(self._buf) >= 4:
                size = struct.unpack_from("<I", self._buf)[0]
                if len(self._buf) >= size:
                    frame, self._buf = self._buf[:size], self._buf[size:]
                    return c.decode(frame)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self._buf += data

    def rpc(self, msg: c.Message, tag: int = 1) -> c.Message:
        self.send(tag, msg)
        frame = self.recv()
        assert frame.tag == tag, frame
        if isinstance(frame.msg, c.Rlerror):
            raise NinepError(frame.msg.ecode, os.strerror(frame.msg.ecode))
        assert isinstance(frame.msg, c.Message)
        return frame.msg

    # -- file operations --

    def fid(self) -> int:
        self._fid += 1
        return self._fid

    def walk(self, path: str, fid: int | None = None) -> int:
        newfid = self.fid()
        names = tuple(p for p in path.split("/") if p)
        reply = self.rpc(c.Twalk(self.root if fid is None else fid, newfid, names))
        assert isinstance(reply, c.Rwalk)
        if len(reply.qids) != len(names):
            raise NinepError(2, f"walk stopped after {len(reply.qids)} of {names}")
        return newfid

    def open(self, path: str, flags: int = os.O_RDONLY) -> int:
        fid = self.walk(path)
        try:
            self.rpc(c.Tlopen(fid, flags))
        except NinepError:
            self.clunk(fid)
            raise
        return fid

    def read(self, fid: int, offset: int = 0, count: int = 65536) -> bytes:
        reply = self.rpc(c.Tread(fid, offset, count))
        assert isinstance(reply, c.Rread)
        return reply.data

    def read_all(self, fid: int) -> bytes:
        out = b""
        while chunk := self.read(fid, len(out)):
            out += chunk
        return out

    def cat(self, path: str) -> bytes:
        fid = self.open(path)
        try:
            return self.read_all(fid)
        finally:
            self.clunk(fid)

    def write(self, fid: int, data: bytes, offset: int = 0) -> int:
        reply = self.rpc(c.Twrite(fid, offset, data))
        assert isinstance(reply, c.Rwrite)
        return reply.count

    def clunk(self, fid: int) -> None:
        self.rpc(c.Tclunk(fid))

    def getattr(self, path: str) -> c.Rgetattr:
        fid = self.walk(path)
        try:
            reply = self.rpc(c.Tgetattr(fid, c.GETATTR_BASIC))
        finally:
            self.clunk(fid)
        assert isinstance(reply, c.Rgetattr)
        return reply

    def listdir(self, path: str) -> list[str]:
        fid = self.open(path)
        names: list[str] = []
        offset = 0
        try:
            while True:
                reply = self.rpc(c.Treaddir(fid, offset, 8192))
                assert isinstance(reply, c.Rreaddir)
                if not reply.data:
                    return [n for n in names if n not in (".", "..")]
                data = reply.data
                while data:
                    _, offset, _ = struct.unpack_from("<13sQB", data)
                    (n,) = struct.unpack_from("<H", data, 22)
                    names.append(data[24: 24 + n].decode())
                    data = data[24 + n:]
        finally:
            self.clunk(fid)


def connect_when_up(address: tuple[str, int] | str, timeout: float = 20.0, **kw: object) -> Client:
    """A client once the server listens (polls with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(address, **kw)  # type: ignore[arg-type]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
