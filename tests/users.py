"""Test users made with useradd for one test, and removed after it (also after a failure)."""

from __future__ import annotations

import contextlib
import grp
import pwd
import subprocess
from typing import Iterator

EXTRA = "dfst_extra"  # a supplementary group of ALICE, and of no one else
ALICE, BOB = "dfst_alice", "dfst_bob"


def _gone(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)  # its own group, if userdel left it


@contextlib.contextmanager
def made_users() -> Iterator[dict[str, pwd.struct_passwd]]:
    """ALICE (own group + EXTRA) and BOB (own group), system users with no home and no shell."""
    for name in (ALICE, BOB):  # left over by a run that was killed
        _gone(name)
    subprocess.run(["groupdel", EXTRA], capture_output=True)
    try:
        subprocess.run(["groupadd", "--system", EXTRA], check=True, capture_output=True)
        for name, extra in ((ALICE, ["-G", EXTRA]), (BOB, [])):
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            *extra, name], check=True, capture_output=True)
        yield {name: pwd.getpwnam(name) for name in (ALICE, BOB)}
    finally:
        for name in (ALICE, BOB):
            _gone(name)
        subprocess.run(["groupdel", EXTRA], capture_output=True)


def extra_gid() -> int:
    return grp.getgrnam(EXTRA).gr_gid
