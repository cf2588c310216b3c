"""The other router mode's leftover: stop it before this server's router starts.

Each router outlives a killed server so traffic keeps flowing, and the next
server adopts it — but only a router of its own mode.  A server restarted with
the other `--router` would otherwise find the ports held by the old router of
its own state directory, fail every apply with EADDRINUSE, and leave the old
router running for good.  serve.lock guarantees no other server uses this
state directory, so the other mode's router found here is an orphan of ours:
it is stopped (gently first, so what it has in flight may finish), and the
caller says so in the events.
"""

from __future__ import annotations

import os
import signal

import trio

from .router import pid_path
from .router_client import _cmdline_has, _is_router, _read_pid

# How long a stopped router may take to finish what it has in flight (haproxy's soft
# stop) before it is made to go: its listeners are what the new router waits for.
GRACE = 5.0


async def stop_other_router(state_dir: str, mine: str) -> str | None:
    """Stop the router of the mode other than ``mine`` ("builtin" | "haproxy") that an
    earlier server on ``state_dir`` left running; return what was done, for the events."""
    state_dir = os.path.abspath(state_dir)
    if mine == "haproxy":
        pid, what = _read_pid(pid_path(state_dir)), "built-in router"
        # Its own cmdline names the state directory: a pid reused by another program is left alone.
        ours = pid is not None and _is_router(pid) and _cmdline_has(pid, state_dir.encode())
        soft, flag = signal.SIGTERM, "--router haproxy"  # the built-in router has no softer stop
    else:
        pid, what = _read_pid(os.path.join(state_dir, "haproxy.pid")), "HAProxy router"
        ours = pid is not None and _cmdline_has(pid, b"haproxy") \
            and _cmdline_has(pid, os.path.join(state_dir, "haproxy.cfg").encode())
        soft, flag = signal.SIGUSR1, "--router builtin"  # haproxy's soft stop: listeners close, sessions finish
    if pid is None or not ours:
        return None
    how = "stopped"
    try:
        os.kill(pid, soft)
        if not await _gone(pid, GRACE):
            how = f"killed (still running {GRACE:g}s after {signal.Signals(soft).name})"
            os.kill(pid, signal.SIGKILL)
            await _gone(pid, 5.0)
    except ProcessLookupError:
        pass
    return (f"{how} the {what} (pid {pid}) that an earlier server on this state directory left running: "
            f"this server was started with {flag}; each service's port serves again once its table is sent")


async def _gone(pid: int, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        while _alive(pid):
            await trio.sleep(0.02)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False

