"""The 9P2000.L codec: pure, bytes in and out (no sockets)."""

from __future__ import annotations

import errno
import struct
from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployfs.serve.ninep import codec as c

_INTS = {"b": 8, "w": 16, "d": 32, "q": 64, "o": 32}
_qid = st.builds(c.Qid, st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
_str = st.text(max_size=40)


def _field(kind: str) -> st.SearchStrategy[object]:
    if kind in _INTS:
        return st.integers(0, 2 ** _INTS[kind] - 1)
    return {"s": _str, "Q": _qid, "S": st.lists(_str, max_size=16).map(tuple),
            "R": st.lists(_qid, max_size=16).map(tuple), "D": st.binary(max_size=300)}[kind]


def _message(cls: type[c.Message]) -> st.SearchStrategy[c.Message]:
    return st.tuples(*(_field(k) for k in cls.FMT)).map(lambda args: cls(*args))


any_message = st.sampled_from(sorted(c.MESSAGES.values(), key=lambda m: m.TYPE)).flatmap(_message)


def test_each_format_names_every_field() -> None:
    for cls in c.MESSAGES.values():
        assert len(cls.FMT) == len(fields(cls)), cls.__name__


@given(any_message, st.integers(0, 0xFFFF))
def test_every_message_round_trips(msg: c.Message, tag: int) -> None:
    assert c.decode(c.encode(tag, msg)) == c.Frame(tag, msg)


def test_layouts_match_the_wire() -> None:
    # Bytes as diodcat sends them (captured from diodcat): the first request of every connection.
    tversion = bytes.fromhex("15000000 64 ffff 00000100 0800") + b"9P2000.L"
    assert c.encode(c.NOTAG, c.Tversion(65536, "9P2000.L")) == tversion
    attach = c.encode(1, c.Tattach(0, c.NOFID, "", "deploy", 1000))
    assert attach[4] == 104 and attach.endswith(b"\x06\x00deploy" + struct.pack("<I", 1000))
    # Tfsync from an older client has no datasync field.
    assert c.decode(bytes.fromhex("0b000000 32 0100 07000000")) == c.Frame(1, c.Tfsync(7, 0))
    entry = c.dirent(c.Qid(c.QTDIR, 0, 5), 3, 4, "web")
    assert entry == bytes([0x80]) + bytes(4) + (5).to_bytes(8, "little") + (3).to_bytes(8, "little") + b"\x04\x03\x00web"


def _versioned(msize: int = 8192, **kw: int) -> c.Connection:
    conn = c.Connection(max_msize=msize, **kw)
    conn.receive_data(c.encode(c.NOTAG, c.Tversion(65536, "9P2000.L")))
    frame = conn.next_event()
    assert isinstance(frame, c.Frame) and isinstance(frame.msg, c.Tversion)
    reply = conn.version_reply(frame.msg)
    assert reply == c.Rversion(msize, "9P2000.L")
    conn.send(frame.tag, reply)
    return conn


def test_version_comes_first_and_sets_msize() -> None:
    conn = c.Connection(max_msize=8192)
    conn.receive_data(c.encode(1, c.Tclunk(0)))
    frame = conn.next_event()
    assert frame == c.Frame(1, c.Invalid(c.Tclunk.TYPE, errno.EPROTO, "Tversion first"))
    assert c.decode(conn.error(1, errno.EPROTO)) == c.Frame(1, c.Rlerror(errno.EPROTO))
    conn.receive_data(c.encode(c.NOTAG, c.Tversion(65536, "9P2000.u")))
    frame = conn.next_event()
    assert isinstance(frame, c.Frame) and isinstance(frame.msg, c.Tversion)
    assert conn.version_reply(frame.msg).version == "unknown"


def test_a_frame_over_msize_loses_the_connection() -> None:
    conn = _versioned(8192)
    conn.receive_data(struct.pack("<IBH", 8193, c.Tread.TYPE, 1))
    with pytest.raises(c.ProtocolError):
        conn.next_event()
    with pytest.raises(c.ProtocolError):
        conn.next_event()  # and stays lost


def test_tags_in_flight() -> None:
    conn = _versioned(max_outstanding=2)
    conn.receive_data(c.encode(1, c.Tread(0, 0, 10)) + c.encode(2, c.Tread(0, 0, 10)) + c.encode(3, c.Tread(0, 0, 10)))
    assert conn.next_event() == c.Frame(1, c.Tread(0, 0, 10))
    assert conn.next_event() == c.Frame(2, c.Tread(0, 0, 10))
    over = conn.next_event()
    assert isinstance(over, c.Frame) and isinstance(over.msg, c.Invalid) and over.msg.errno == errno.EAGAIN
    conn.error(3, errno.EAGAIN)
    conn.receive_data(c.encode(4, c.Tflush(1)))  # a flush always gets through
    assert conn.next_event() == c.Frame(4, c.Tflush(1))
    conn.send(4, c.Rflush())  # tag 1 answered by nothing: retired with the flush
    with pytest.raises(c.LocalProtocolError):
        conn.send(1, c.Rread(b""))
    with pytest.raises(c.LocalProtocolError):
        conn.send(2, c.Rread(b"x" * 9000))  # bigger than msize
    conn.receive_data(c.encode(1, c.Tclunk(0)) + c.encode(1, c.Tclunk(0)))
    assert conn.next_event() == c.Frame(1, c.Tclunk(0))
    with pytest.raises(c.ProtocolError):
        conn.next_event()  # tag 1 again while in flight: replies would be ambiguous


def test_a_bad_body_is_an_error_reply_not_a_close() -> None:
    conn = _versioned()
    conn.receive_data(struct.pack("<IBH", 9, c.Tclunk.TYPE, 5) + b"\0\0")  # two bytes short of a fid
    conn.receive_data(struct.pack("<IBH", 7, 250, 6))  # a type nobody defined
    bad, unknown = conn.next_event(), conn.next_event()
    assert isinstance(bad, c.Frame) and isinstance(bad.msg, c.Invalid) and bad.msg.errno == errno.EPROTO
    assert isinstance(unknown, c.Frame) and isinstance(unknown.msg, c.Invalid) and unknown.msg.errno == errno.EOPNOTSUPP
    assert conn.next_event() is c.NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(c.ProtocolError):
        conn.next_event()


def _drain(conn: c.Connection) -> list[bytes]:
    """Answer everything as a server that knows nothing would; stop at NEED_DATA or a lost connection."""
    out = []
    while True:
        try:
            frame = conn.next_event()
        except c.ProtocolError:
            return out
        if frame is c.NEED_DATA:
            return out
        assert isinstance(frame, c.Frame)
        if isinstance(frame.msg, c.Tversion):
            out.append(conn.send(frame.tag, conn.version_reply(frame.msg)))
        elif isinstance(frame.msg, c.Tflush):
            out.append(conn.send(frame.tag, c.Rflush()))
        else:
            out.append(conn.error(frame.tag, frame.msg.errno if isinstance(frame.msg, c.Invalid) else errno.ENOSYS))


@settings(max_examples=300)
@given(st.booleans(), st.lists(st.one_of(st.binary(max_size=64), any_message.map(lambda m: c.encode(7, m))), max_size=12),
       st.integers(1, 50))
def test_any_byte_stream_gets_replies_or_a_clean_close(versioned: bool, parts: list[bytes], chunk: int) -> None:
    conn = c.Connection(max_msize=4096)
    stream = (c.encode(c.NOTAG, c.Tversion(8192, "9P2000.L")) if versioned else b"") + b"".join(parts)
    for i in range(0, len(stream), chunk):
        conn.receive_data(stream[i: i + chunk])
        for reply in _drain(conn):
            assert c.decode(reply).msg.TYPE in (c.Rversion.TYPE, c.Rlerror.TYPE, c.Rflush.TYPE)
    conn.receive_data(b"")
    _drain(conn)
    with pytest.raises(c.ProtocolError):
        conn.next_event()  # the end of the stream always ends the connection


def test_addresses_are_dial_strings() -> None:
    from deployfs.serve.ninep.server import Address, AddressError
    assert Address.parse("tcp!127.0.0.1!5640") == Address("tcp", host="127.0.0.1", port=5640)
    assert Address.parse("tcp!5640") == Address("tcp", host="127.0.0.1", port=5640)  # loopback unless told otherwise
    assert Address.parse("tcp![::1]!5640") == Address("tcp", host="::1", port=5640)
    assert Address.parse("unix!/run/deployfs.9p") == Address("unix", path="/run/deployfs.9p")
    for bad in ("5640", "tcp!host!0", "tcp!host!http", "udp!h!1", "unix!", "tcp!h!70000"):
        with pytest.raises(AddressError):
            Address.parse(bad)
