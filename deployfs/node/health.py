"""Health probes: file, http, tcp, exec.  Each returns a verdict, never raises.

A probe is one attempt bounded by ``timeout``; the engine turns a series of
verdicts into states (starting → healthy ⇄ unhealthy).  Every probe is
cancellable: an exec probe's process is killed, a file read on a hung
filesystem is abandoned in its thread.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Protocol

import httpx
import trio

from ..model.manifest import HealthCheck


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str  # why, in words: "http 503 from 127.0.0.1:41001/healthz"


class Prober(Protocol):
    async def probe(self, check: HealthCheck, timeout: float, env: dict[str, str] | None = None) -> Verdict:
        """``env`` is added to an exec probe's environment (the instance's marker)."""
        ...


class Probes:
    """The real prober.  One shared HTTP client: connection setup is the cost."""

    def __init__(self) -> None:
        # No keep-alive: a probe should see what a fresh client sees, and an
        # idle pooled connection to a dead instance would only mislead.
        self._http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0),
                                       follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def probe(self, check: HealthCheck, timeout: float, env: dict[str, str] | None = None) -> Verdict:
        kind = check.kind
        if kind == "file" and _on_local_fs(check.target[0]):
            return _file_now(check.target[0])  # cannot hang: no thread, no timeout needed
        with trio.move_on_after(timeout) as scope:
            try:
                if kind == "exec":
                    return await _exec(check.target, env)
                fn = {"http": self._http_probe, "tcp": _tcp, "file": _file}[kind]
                return await fn(check.target, timeout)
            except Exception as e:  # a probe never raises: a broken check is a failed one
                return Verdict(False, f"{kind} check error: {e}")
        assert scope.cancelled_caught
        return Verdict(False, f"{kind} check timed out after {timeout:g}s: {_describe(check)}")

    async def _http_probe(self, target: tuple[str, ...], timeout: float) -> Verdict:
        url = target[0]
        where = url.split("://", 1)[-1]
        try:
            r = await self._http.get(url, timeout=timeout)
        except httpx.HTTPError as e:
            return Verdict(False, f"http error from {where}: {type(e).__name__}: {e}".rstrip(": "))
        ok = 200 <= r.status_code < 400
        return Verdict(ok, f"http {r.status_code} from {where}")


def _describe(check: HealthCheck) -> str:
    return " ".join(check.target)


async def _tcp(target: tuple[str, ...], timeout: float) -> Verdict:
    host, _, port = target[0].rpartition(":")
    try:
        stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
    except OSError as e:
        return Verdict(False, f"tcp connect to {target[0]} failed: {_root_cause(e)}")
    await stream.aclose()
    return Verdict(True, f"tcp connect to {target[0]} ok")


async def _exec(target: tuple[str, ...], env: dict[str, str] | None) -> Verdict:
    """Run the check in its own group, and kill the group when it is over.

    A check that backgrounds a child (``sh -c "work & exit 0"``) would leave one
    behind per probe; the group kill takes it, and a child that left the group
    (setsid) still carries the instance's marker and goes when the instance does.
    """
    async def kill_group(proc: trio.Process) -> None:
        _killpg(proc.pid)

    run = functools.partial(trio.run_process, list(target), check=False, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            deliver_cancel=kill_group, env=dict(os.environ, **(env or {})))
    async with trio.open_nursery() as n:
        try:
            proc: trio.Process = await n.start(run)
        except OSError as e:
            return Verdict(False, f"exec {target[0]}: {e.strerror or e}")
        try:
            await proc.wait()
        finally:
            _killpg(proc.pid)
    ok = proc.returncode == 0
    return Verdict(ok, f"exec {target[0]} exited {proc.returncode}")


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _root_cause(e: BaseException) -> str:
    """trio wraps per-address connect errors; the first one says what happened."""
    while e.__cause__ is not None:
        e = e.__cause__
        if isinstance(e, BaseExceptionGroup):
            e = e.exceptions[0]
    return getattr(e, "strerror", None) or str(e)


def _read_some(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(1)


async def _file(target: tuple[str, ...], timeout: float) -> Verdict:
    """A file on a network or FUSE filesystem can hang a read: do it in a thread we can abandon."""
    return await trio.to_thread.run_sync(_file_now, target[0], abandon_on_cancel=True)


def _file_now(path: str) -> Verdict:
    try:
        data = _read_some(path)
    except OSError as e:
        return Verdict(False, f"file {path}: {e.strerror or e}")
    if not data:
        return Verdict(False, f"file {path} is empty")
    return Verdict(True, f"file {path} ok")


# Filesystems whose reads never wait on a network or another process.
LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay", "zfs", "f2fs",
                      "vfat", "exfat", "squashfs", "proc", "sysfs", "devtmpfs"})


@functools.lru_cache(maxsize=4096)
def _on_local_fs(path: str) -> bool:
    """Is ``path`` on a local filesystem?  Decided once per path from /proc/self/mountinfo.

    Why: a thread hand-off per probe costs five times the probe itself, and
    1,000 instances probed every second would spend a sixth of a core on it.
    """
    path = os.path.realpath(os.path.dirname(path))
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mountpoint = left.split()[4].replace("\\040", " ")
                if (path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")) and len(mountpoint) >= len(best):
                    best, fstype = mountpoint, right.split()[0]
    except OSError:
        return False
    return fstype in LOCAL_FS
