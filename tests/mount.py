"""Run `deployfs serve` as a real subprocess on a temp mount; do syscalls in children."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from deployfs.node.cgroups import Cgroups
from deployfs.node.runtime import marked_processes, marker_prefix

SERVICE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "examples", "web.py"))


@dataclass
class Mount:
    path: str
    state: str
    proc: subprocess.Popen
    log: str

    def p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def sh(self, cmd: str, timeout: float = 15, check: bool = False, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout, cwd=self.path, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd!r} failed ({r.returncode}): {r.stderr}")
        return r

    def read(self, *parts: str) -> str:
        return self.sh(f"cat {' '.join(parts)}", check=True).stdout

    def ctl(self, command: str, service: str | None = None) -> subprocess.CompletedProcess:
        target = f"active/{service}/ctl" if service else "ctl"
        return self.sh(f"echo {command!r} > {target}")

    def write_manifest(self, name: str, text: str) -> None:
        self.sh(f"cat > manifests/{name} <<'EOF'\n{text}EOF", check=True)

    def until(self, pred, timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; server log:\n{self.server_log()}")
            time.sleep(0.05)

    def server_log(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()[-5000:]
        except OSError:
            return ""


def start(tmp, *extra: str, state: str | None = None, mnt: str | None = None, argv: list[str] | None = None,
          preexec_fn: Callable[[], None] | None = None) -> Mount:
    m = spawn(tmp, *extra, state=state, mnt=mnt, argv=argv, preexec_fn=preexec_fn)
    wait_mounted(m)
    return m


def spawn(tmp, *extra: str, state: str | None = None, mnt: str | None = None, argv: list[str] | None = None,
          preexec_fn: Callable[[], None] | None = None) -> Mount:
    """Start the server without waiting for its mount (several servers start side by side)."""
    mnt = mnt or os.path.join(tmp, "mnt")
    state = state or os.path.join(tmp, "state")
    try:
        os.makedirs(mnt, exist_ok=True)
    except FileExistsError:
        pass  # a dead mount left by kill9 (ENOTCONN at once): the server cleans it up
    log = os.path.join(tmp, f"serve-{time.monotonic_ns()}.log")
    cmd = argv or [sys.executable, "-m", "deployfs", "serve", mnt, "--state", state, *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=preexec_fn)
    return Mount(mnt, state, proc, log)


def wait_mounted(m: Mount, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    # A dead mount left by a crash is still "a mount": wait for a live one.
    while not (os.path.ismount(m.path) and os.path.exists(os.path.join(m.path, "ctl"))):
        if m.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"deployfs did not mount:\n{m.server_log()}")
        time.sleep(0.02)


@contextlib.contextmanager
def running(tmp, *extra: str) -> Iterator[Mount]:
    """A mount that is stopped on the way out, also when the setup done after `start` fails
    (a fixture's code before its `yield` gets no teardown of its own)."""
    m = start(tmp, *extra)
    try:
        yield m
    finally:
        stop(m)


def reap(state: str) -> list[int]:
    """Kill every process started for this state dir (instances, router); return their pids."""
    found = list(marked_processes(marker_prefix(state)))
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cgroups = Cgroups(state)  # and the instances' cgroups, which a killed server leaves behind
    for service, ident in cgroups.instances():
        cg = cgroups.find(service, ident)
        if cg is not None:
            cg.kill_all()
            cg.remove()
    return found


def stop(m: Mount, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
    """SIGTERM (the real shutdown path): the mount, the instances and the router are gone."""
    if m.proc.poll() is None:
        m.proc.send_signal(sig)
        try:
            m.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait()
    clean = not in_mount_table(m.path)
    if not clean:
        subprocess.run(["fusermount3", "-u", "-z", m.path], check=False)
    left = reap(m.state)
    if sig == signal.SIGTERM:
        assert clean, f"mount left behind after SIGTERM:\n{m.server_log()}"
        assert not left, f"processes left behind after SIGTERM: {left}"
    return m.proc.returncode


def in_mount_table(path: str) -> bool:
    """A dead mount is still a mount, though os.path.ismount says False (its stat fails: the root's
    attributes are not cached)."""
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split(" ")[1] == real for line in f)


def kill9(m: Mount) -> None:
    """A crash: SIGKILL the server, leave the dead mount for the next start to clean."""
    os.kill(m.proc.pid, signal.SIGKILL)
    m.proc.wait()
