"""Which instance ports this host's deployfs servers have given out.

Two servers on one host (two state directories, the same default ``--ports``)
each check that a port is free before giving it to an instance; but an
instance binds its port some time after it starts, and in between the other
server saw the port free too: one instance then fails with EADDRINUSE while
the health check of the other server's instance answers for it.  A port given
out is therefore also held as an ``flock`` on a file named for it in one
directory per host and user, for as long as this server holds the port.  The
kernel drops the lock with the process, so a crashed server holds nothing; a
server that adopts its instances takes their ports' locks again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile

log = logging.getLogger(__name__)


def default_dir() -> str:
    if os.geteuid() == 0:
        return "/run/deployfs/ports"
    return os.path.join(tempfile.gettempdir(), f"deployfs-ports-{os.geteuid()}")


class PortLocks:
    def __init__(self, directory: str | None = None) -> None:
        self.dir: str | None = directory or default_dir()
        self._held: dict[int, int] = {}  # port -> descriptor holding its lock
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            st = os.stat(self.dir)
            if st.st_uid != os.geteuid():  # someone else's directory: its locks mean nothing to us
                raise PermissionError(f"{self.dir} belongs to uid {st.st_uid}")
        except OSError as e:
            log.warning("instance ports are not coordinated with other deployfs servers on this host: %s", e)
            self.dir = None

    def hold(self, port: int) -> bool:
        """Take the port's lock; False if another server holds it (this one may not give it out)."""
        if port in self._held or self.dir is None:
            return True
        try:
            fd = os.open(os.path.join(self.dir, str(port)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
        except OSError as e:
            log.warning("cannot lock port %d: %s", port, e)
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._held[port] = fd
        return True

    def release(self, port: int) -> None:
        fd = self._held.pop(port, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for port in list(self._held):
            self.release(port)

    def __del__(self) -> None:
        self.close()
