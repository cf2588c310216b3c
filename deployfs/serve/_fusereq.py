"""Which FUSE request is being answered, for the one handler that blocks.

pyfuse3 hands ``read`` no request context and ignores FUSE_INTERRUPT, so a
blocked ``wait`` reader could only be freed by guessing its pid (the opener's,
which is the wrong one when the descriptor is shared: ``exec 3< wait; cat <&3``).
libfuse itself does record an interrupt on the request (``fuse_req_interrupted``)
only pyfuse3 hides the request pointer.

pyfuse3 dispatches each read through its module-level ``fuse_read_async(c)``
(looked up by name at every call), where ``c`` is a ``_Container`` holding the
request.  :func:`install` wraps that function to publish the request for the
duration of the read in a context variable.  The pointer is read from the
container's C struct; the layout is checked on every read against the values
the handler receives (offset, size, fh), and anything that does not match
answers ``None``: callers then fall back to polling the opener's signals.
"""

from __future__ import annotations

import contextvars
import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import pyfuse3

log = logging.getLogger(__name__)

# struct _Container (pyfuse3 3.5, libfuse 3.x, LP64): PyObject_HEAD(16) rdev(8)
# fuse_file_info(40) ino(8) parent(8) req(8) flags(4) mode(4) off(8) size(8)
# struct stat(144) fh(8)
_REQ, _OFF, _SIZE, _FH = 80, 96, 104, 256


@dataclass(frozen=True)
class Request:
    req: int
    off: int
    size: int
    fh: int

    def interrupted(self) -> bool:
        """Has the kernel sent FUSE_INTERRUPT for it (the caller got a signal, Ctrl-C or kill)?"""
        return bool(_lib.fuse_req_interrupted(ctypes.c_void_p(self.req)))


_current: contextvars.ContextVar[Request | None] = contextvars.ContextVar("deployfs_fuse_request", default=None)
_lib: Any = None


def _u64(addr: int) -> int:
    return ctypes.c_uint64.from_address(addr).value


def current(fh: int, off: int, size: int) -> Request | None:
    """The request behind the read being handled, if it is certainly this one."""
    r = _current.get()
    if r is None or (r.fh, r.off, r.size) != (fh, off, size) or not r.req:
        return None
    return r


def install() -> bool:
    """Wrap pyfuse3's read dispatch once; False (and nothing changed) if it cannot be done safely."""
    global _lib
    if _lib is not None:
        return True
    name = ctypes.util.find_library("fuse3")
    orig: Callable[[Any], Awaitable[Any]] | None = getattr(pyfuse3, "fuse_read_async", None)
    container = getattr(pyfuse3, "_Container", None)
    # Exactly the layout assumed (never read past the object): a larger struct (other libfuse headers, a debug or
    # free-threaded CPython) would put the fields elsewhere.
    if (name is None or orig is None or ctypes.sizeof(ctypes.c_void_p) != 8
            or getattr(container, "__basicsize__", 0) != _FH + 8):
        log.warning("cannot see FUSE requests (no libfuse3 or another pyfuse3): wait polls the opener's signals")
        return False
    try:
        # Only the libfuse pyfuse3 already runs on (RTLD_NOLOAD): another copy would read
        # the request's lock at its own offsets.
        lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except OSError:
        log.warning("cannot see FUSE requests (pyfuse3's libfuse3 is not %s): wait polls the opener's signals", name)
        return False
    lib.fuse_req_interrupted.argtypes = [ctypes.c_void_p]
    lib.fuse_req_interrupted.restype = ctypes.c_int
    _lib = lib

    async def read_with_request(c: Any) -> Any:
        base = id(c)
        token = _current.set(Request(_u64(base + _REQ), _u64(base + _OFF), _u64(base + _SIZE), _u64(base + _FH)))
        try:
            return await orig(c)
        finally:
            _current.reset(token)

    pyfuse3.fuse_read_async = read_with_request  # type: ignore[attr-defined]
    return True
