"""Who may write: the serving user, root, and members of --group.

A caller is anything with ``uid``, ``gid`` and ``pid`` (pyfuse3's
RequestContext is one; 9P builds one from the attach).  Reading is open to
everyone who can reach the namespace at all.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass, field
from typing import Protocol


class Caller(Protocol):
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def pid(self) -> int: ...  # 0 when unknown (9P over TCP): no /proc to consult


@dataclass(frozen=True)
class Who:
    uid: int
    gid: int
    pid: int = 0


@dataclass
class Access:
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    group: int | None = None  # --group NAME

    def may_write(self, caller: Caller) -> bool:
        if caller.uid in (0, self.uid):
            return True
        if self.group is None:
            return False
        if caller.gid == self.group:
            return True
        # The caller's groups as the kernel has them (setpriv, systemd's
        # SupplementaryGroups=, `docker --group-add` set them without
        # /etc/group knowing); caller.pid is the calling thread.
        groups = _sup_groups(caller.pid) if caller.pid else None
        if groups is not None:
            return self.group in groups
        try:  # no /proc: what /etc/group says
            name = pwd.getpwuid(caller.uid).pw_name
            return name in grp.getgrgid(self.group).gr_mem
        except KeyError:
            return False


def _sup_groups(pid: int) -> set[int] | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return None
