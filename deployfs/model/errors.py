"""Errors as kinds: what went wrong, in words, with no front end's codes.

Everything below ``serve/`` raises :class:`Error` with a :class:`Kind`; each
front end (FUSE, 9P) alone turns a kind into its protocol's error (an errno
for both today, from one table in ``serve/``).  A cluster store that cannot be
reached, a full disk and a refused command are all the same shape, so a new
front end needs one table, not a reading of every layer.
"""

from __future__ import annotations

import enum


class Kind(enum.Enum):
    NOT_FOUND = "not_found"  # no such service, manifest, file or handle target
    EXISTS = "exists"  # create-exclusive of a name that is there
    INVALID = "invalid"  # bad syntax, bad manifest, bad name
    BUSY = "busy"  # not possible in the current state (or too many waiters)
    NO_SPACE = "no_space"  # the state disk is full, or a limit on how many is reached
    PERMISSION = "permission"  # this caller may not do this (EACCES)
    NOT_PERMITTED = "not_permitted"  # nobody may do this to this file (EPERM)
    UNAVAILABLE = "unavailable"  # the store cannot be reached (EIO)
    TOO_BIG = "too_big"  # past a size bound (a manifest)
    NAME_TOO_LONG = "name_too_long"
    NOT_A_DIRECTORY = "not_a_directory"
    IS_A_DIRECTORY = "is_a_directory"
    BAD_HANDLE = "bad_handle"  # an operation the open mode does not allow (write on a read-only open)
    CROSS_DIRECTORY = "cross_directory"  # rename between directories (EXDEV)
    WOULD_BLOCK = "would_block"  # a non-blocking read that would have to wait
    INTERRUPTED = "interrupted"  # a blocked read whose reader gave up (Ctrl-C, Tflush), or shutdown
    ADDRESS_IN_USE = "address_in_use"  # a public port another service or program holds
    ADDRESS_UNAVAILABLE = "address_unavailable"  # a public port that cannot be listened on here


class Error(Exception):
    """A refusal of a given kind, with the reason in words (what a ctl reply says)."""

    def __init__(self, kind: Kind, message: str = "") -> None:
        super().__init__(message or kind.value)
        self.kind, self.message = kind, message or kind.value


class CommandError(Error):
    """A refused ctl command: its message becomes the reply (``error: ...``) and an event."""
