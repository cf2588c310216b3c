"""A real small filesystem for full-disk tests: a tmpfs of our own, filled and freed on demand."""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator


@contextlib.contextmanager
def small_disk(path: str, size: str = "2m") -> Iterator[str]:
    """Mount a tmpfs of ``size`` at ``path`` (we are root); always unmounted at the end."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def fill(disk: str) -> None:
    """Take every free block, as a runaway log would."""
    fd = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    try:
        while True:  # the last partial block
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    os.close(fd)
    st = os.statvfs(disk)
    assert st.f_bfree * st.f_frsize < 4096, "the disk is not full"


def free(disk: str) -> None:
    os.unlink(os.path.join(disk, "filler"))
