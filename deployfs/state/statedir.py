"""The state directory: who may have written it, and how files in it are opened.

The state directory decides what deployfs runs (the database holds every
manifest) and receives what instances print (their logs hold secrets as often
as not).  So:

* It is private: directories 0700, files 0600.  Anything looser found at
  start is tightened, and the count is logged.
* It is trusted only if nobody else could have written it: the directory and
  everything in it must belong to the user deployfs runs as and be writable by
  nobody else, and its parents may only be changed by that user or root
  (a world-writable parent needs the sticky bit, as /tmp has).  Otherwise
  ``prepare`` refuses with the reason and the command that fixes it.
* Nothing in it is a symbolic link, and :func:`open_file` never follows one,
  so a planted link cannot make deployfs overwrite (or read) its target.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import pwd
import stat
from typing import IO, Any, Iterator

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
DB_NAME = "deployfs.db"
LOCK_NAME = "serve.lock"
# A cluster node keeps no database here (the records are in etcd): this file says the directory is deployfs's.
CLUSTER_NAME = "cluster-node"


class StateDirError(Exception):
    """The state directory cannot be trusted or used; the message says why and what to do."""


def open_file(path: str, mode: str = "rb", *, perm: int = FILE_MODE) -> IO[Any]:
    """``open()`` for a file in the state directory: never through a symbolic link.

    A file it creates gets ``perm`` (owner-only by default), whatever the umask
    would allow more of.  A link where the file should be is an ``OSError``
    with ``ELOOP`` and a message that says so.
    """
    return open(path, mode, opener=functools.partial(_open_nofollow, perm=perm))


def _open_nofollow(path: str, flags: int, *, perm: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, perm)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link where deployfs keeps a file of its own; "
                          "it never follows links in its state directory", path) from None
        raise


def makedirs(path: str) -> None:
    """Create a directory in the state directory, and every missing parent, owner-only
    (``os.makedirs`` gives the parents it creates the umask's mode)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        makedirs(parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass


def prepare(state_dir: str) -> str:
    """Create the state directory, or check that only this user could have written it;
    return its resolved path, the only one to use from then on.

    Refuses (:class:`StateDirError`) a directory, file or parent that another
    user owns or could write, and any symbolic link inside; tightens what is
    merely readable by others to owner-only, and logs it. The path checked is
    the resolved one: a link on the way (``--state /srv/shared/dfs``) that its
    owner re-points later must not lead deployfs to another directory.
    """
    me = os.geteuid()
    real = os.path.realpath(state_dir)
    _check_parents(real, me)
    os.makedirs(os.path.dirname(real), exist_ok=True)
    _check_parents(real, me)  # again: what makedirs found or made on the way
    try:
        os.mkdir(real, DIR_MODE)
        return real
    except FileExistsError:
        pass
    top = os.lstat(real)
    if not stat.S_ISDIR(top.st_mode):
        raise StateDirError(f"--state {state_dir} is not a directory")
    names = os.listdir(real)
    if set(names) - {LOCK_NAME} and DB_NAME not in names and CLUSTER_NAME not in names:
        # Never tighten (chmod) a directory deployfs did not make: --state /var/lib is a typo.
        raise StateDirError(f"--state {state_dir} is not empty and holds no {DB_NAME}: "
                            "point --state at a new or empty directory")
    entries = list(_tree(real))
    for path, st in entries:  # all checked before anything changes
        _check_entry(path, st, me, state_dir)
    tightened = 0
    for path, st in entries:
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)  # no link can be here: checked above
            tightened += 1
    if tightened:
        log.warning("state directory %s: %d %s other users could read %s now owner-only "
                    "(0700 directories, 0600 files)", state_dir, tightened,
                    "entry" if tightened == 1 else "entries", "is" if tightened == 1 else "are")
    return real


def lock(real: str) -> int:
    """Hold the state directory for this process's life: its descriptor, which must stay open.

    Two servers on one state directory adopt each other's router and instances and
    write the same database (issue: the second one's SIGTERM stopped the first's
    instances); so the second refuses before it touches anything.  A flock goes
    with its holder, so a killed server leaves nothing to clean up.  The
    descriptor is close-on-exec: an instance or router kept running must not
    keep the directory locked after the server is gone.
    """
    path = os.path.join(real, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "another process"
        raise StateDirError(f"state directory {real} is in use by {who} (another deployfs serve): "
                            "stop that server first, or use another --state") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # only for the message a second server prints
    return fd


def _tree(top: str) -> Iterator[tuple[str, os.stat_result]]:
    """``top`` and everything under it, by lstat; links are reported, never followed."""
    yield top, os.lstat(top)

    def fail(e: OSError) -> None:
        raise e
    for root, dirs, files in os.walk(top, onerror=fail):
        for name in (*dirs, *files):
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # an adopted instance's old log went meanwhile
                continue
            yield path, st


def _check_entry(path: str, st: os.stat_result, me: int, state_dir: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(f"{path} is a symbolic link: deployfs never makes links in its state directory "
                            "and will not follow one there; remove it")
    if st.st_uid != me:
        raise StateDirError(f"{path} belongs to {_user(st.st_uid)}, not to {_user(me)} who runs deployfs: "
                            "whoever wrote it could make deployfs run their commands. Use another --state, "
                            f"or check it and take it over:  chown -R {_user(me)} {state_dir}")
    # A socket's mode only decides who may connect: tightening it is enough.
    if st.st_mode & 0o022 and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        who = "its group" if st.st_mode & 0o020 else "every user"
        raise StateDirError(f"{path} is writable by {who}: whoever wrote it could make deployfs run their "
                            f"commands. Check it, then:  chmod -R go-w {state_dir}")
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        raise StateDirError(f"{path} has {st.st_nlink} hard links: deployfs never makes them, so it will "
                            "not write through one; remove it")


def _check_parents(real: str, me: int) -> None:
    parent = os.path.dirname(real)
    while True:
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            pass  # created below, by us
        else:
            if st.st_uid not in (0, me):
                raise StateDirError(f"{parent}, a parent of the state directory, belongs to {_user(st.st_uid)}, "
                                    "who could replace the state directory: use a --state whose parents only "
                                    "root or you own")
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                raise StateDirError(f"{parent}, a parent of the state directory, is writable by other users "
                                    "(and not sticky like /tmp), who could replace the state directory: "
                                    f"chmod go-w {parent}, or use another --state")
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
