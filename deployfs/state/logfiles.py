"""Instances' output as the node that runs them keeps it: ``<log dir>/<service>/<id>.log``.

The node's runtime appends an instance's output to its live file and, past the log's
bound, copy-truncates it into ``<id>.log.1`` (node/runtime.py); the two read in that
order are the instance's output.  Between two trims a log only grows, so its size and
a read at any offset are all ``tail -f`` needs.

Read here for this node's view and for its log server (node/logserver.py), which
serves them to the other nodes' views (state/logclient.py).  Nothing here follows a
link: a link planted where a log should be is neither measured nor read.
"""

from __future__ import annotations

import os
import re
import stat as stat_
from typing import NamedTuple

from . import statedir

_LOG_RE = re.compile(r"([0-9]{1,12})\.log(?:\.1)?")
MAX_LISTED = 10_000  # a service's directory holds its running instances and the newest 50 gone


class LogInfo(NamedTuple):
    size: int  # bytes, both parts together
    mtime: float  # wall clock of the last write


def parts(log_dir: str, service: str, instance_id: int) -> list[str]:
    """The files holding an instance's output, oldest first."""
    path = os.path.join(log_dir, service, f"{instance_id}.log")
    return [path + ".1", path]


def _measured(paths: list[str]) -> list[tuple[str, int, float]]:
    out = []
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat_.S_ISREG(st.st_mode):  # a planted link is neither followed here nor read
            out.append((p, st.st_size, st.st_mtime))
    return out


def info(paths: list[str]) -> LogInfo | None:
    """Size and mtime of a log in these parts; None if none of them is there."""
    sizes = _measured(paths)
    if not sizes:
        return None
    return LogInfo(sum(size for _, size, _ in sizes), max(m for _, _, m in sizes))


def read(paths: list[str], off: int, size: int) -> bytes:
    """``size`` bytes at ``off`` of the parts read as one file; only the bytes asked for are read."""
    out = bytearray()
    for path, length, _ in _measured(paths):
        if off >= length:
            off -= length
            continue
        try:
            with statedir.open_file(path, "rb") as f:  # never a planted link's target
                out += os.pread(f.fileno(), min(size - len(out), length - off), off)
        except OSError:
            pass
        off = 0
        if len(out) >= size:
            break
    return bytes(out)


def listing(log_dir: str, service: str) -> dict[int, LogInfo]:
    """Every instance of ``service`` this node keeps output of, by id (a bounded scan of one directory)."""
    ids: set[int] = set()
    try:
        with os.scandir(os.path.join(log_dir, service)) as entries:
            for e in entries:
                m = _LOG_RE.fullmatch(e.name)
                if m:
                    ids.add(int(m.group(1)))
                    if len(ids) >= MAX_LISTED:
                        break
    except OSError:  # no such service here (or not a directory): nothing of it
        return {}
    out = {}
    for id in sorted(ids):
        found = info(parts(log_dir, service, id))
        if found is not None:
            out[id] = found
    return out
