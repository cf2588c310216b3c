"""Running instances as local processes.

Why it looks like this:

* Each instance gets its own session and process group, so ``stop`` can signal
  the whole tree (grandchildren included) and a terminal's Ctrl-C aimed at the
  server never reaches an instance.
* Output goes straight from the child to a file in the state directory, never
  through a pipe to the server: an instance must outlive a crashed server.
* Exit is watched with a pidfd, which works the same for our own children and
  for processes adopted after a restart (which are not our children, so their
  exit status is unknown: ``None``).
* A pid alone is not an identity (pids are reused); pid plus the start time
  from ``/proc/<pid>/stat`` is.
* Each instance gets its own cgroup where the host has them (cgroups.py): its
  memory/cpus/pids limits, a stop that reaches every process it started (even
  one that left the session and cleared its environment), and how it died
  (an OOM kill).  The child enters it, sets ``nofile`` and drops to its user
  between fork and exec, so nothing it runs is ever outside or privileged.

The :class:`Runtime` protocol is what the engine sees; a multi-node runtime
would implement the same calls.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import IO, Callable, Iterable, Mapping, Protocol

import trio

from ..state import logfiles, statedir
from .cgroups import CgroupError, Cgroups, InstanceCgroup, Limits
from .identity import Identity, IdentityError, resolve
from .portlocks import PortLocks

log = logging.getLogger(__name__)

BASE_ENV_KEYS = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ")
# Below Linux's ephemeral range (32768-60999 by default): an outgoing
# connection must never take an instance's port between allocation and bind.
DEFAULT_PORTS = (24000, 31999)
MARKER = "DEPLOYFS_INSTANCE"  # in every instance's environment: "<state-dir>:<service>:<id>"


class StartError(Exception):
    """The program could not be started at all (missing, not executable, ...)."""


@dataclass(frozen=True)
class LaunchSpec:
    service: str
    instance_id: int
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    log_lines: int
    user: str | None = None  # None: as deployfs itself
    group: str | None = None
    limits: Limits = Limits()
    nofile: int | None = None


class Process(Protocol):
    pid: int
    start_time: int
    exit_status: int | None  # None while running, or when unknown (adopted); 128 + n for signal n
    killed_by: int | None  # the signal that ended it (exit_status alone cannot tell it from an exit(137))
    oom_kills: int  # processes of it the kernel killed for its memory limit (known once it exited)

    @property
    def exited(self) -> bool: ...
    async def wait(self) -> int | None: ...
    async def stop(self, signum: int, timeout: float) -> bool:
        """True if it had to be killed: still running ``timeout`` after ``signum``."""
        ...


class Runtime(Protocol):
    def start(self, spec: LaunchSpec) -> Process: ...
    def marker(self, service: str, instance_id: int) -> str: ...
    def adopt(self, pid: int, start_time: int, service: str, instance_id: int) -> Process | None: ...
    def find_unrecorded(self, wanted: set[tuple[str, int]]) -> Mapping[tuple[str, int], Process]: ...
    async def sweep(self, keys: Iterable[tuple[str, int]]) -> None: ...
    def oom_kills(self, service: str, instance_id: int) -> int:
        """OOM kills its cgroup counted (0 without one): why an instance died while nobody watched."""
        ...
    async def prune(self, keep: set[tuple[str, int]]) -> None: ...
    def limit_problem(self, limits: Limits, nofile: int | None = None) -> tuple[str, str] | None:
        """(directive, reason) when this host cannot apply one of these limits at all."""
        ...
    def allocate_port(self) -> int: ...
    def claim_port(self, port: int) -> None: ...
    def release_port(self, port: int) -> None: ...
    def read_log(self, service: str, instance_id: int, lines: int) -> bytes: ...
    async def bound_log(self, service: str, instance_id: int, lines: int) -> bool: ...
    def remove_log(self, service: str, instance_id: int) -> None: ...
    def log_parts(self, service: str, instance_id: int) -> list[str]: ...


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parens: split after the last ')'.
    rest = stat.rsplit(b")", 1)[1].split()
    if rest[0] == b"Z":  # a zombie is no longer an instance
        return None
    return int(rest[19])


class LocalProcess:
    def __init__(self, pid: int, start_time: int, pidfd: int, popen: subprocess.Popen[bytes] | None,
                 marker: str, sweeper: "Sweeper", cgroup: InstanceCgroup | None = None) -> None:
        self.pid, self.start_time = pid, start_time
        self.marker, self._sweeper = marker, sweeper
        self.cgroup = cgroup
        self.exit_status: int | None = None
        self.killed_by: int | None = None
        self.oom_kills = 0
        self._pidfd: int | None = pidfd
        self._popen = popen  # held so subprocess never reaps behind our back
        self._done = trio.Event()
        self._watcher_gone: trio.Event | None = None  # set while a task waits on the pidfd

    @property
    def exited(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> int | None:
        # Only one task may wait on the pidfd; the others wait for it.  A watcher
        # that is cancelled hands over: whoever still waits takes the watch, so a
        # stop that races a cancelled monitor sees the exit at once.
        while not self._done.is_set():
            if self._watcher_gone is not None:
                await self._watcher_gone.wait()
                continue
            self._watcher_gone = trio.Event()
            try:
                assert self._pidfd is not None
                await trio.lowlevel.wait_readable(self._pidfd)
            finally:
                gone, self._watcher_gone = self._watcher_gone, None
                gone.set()
            self._reap()
        return self.exit_status

    def _reap(self) -> None:
        if self._popen is not None:
            self._popen.poll()
            rc = self._popen.returncode
            self.exit_status = None if rc is None else (rc if rc >= 0 else 128 - rc)
            self.killed_by = -rc if rc is not None and rc < 0 else None
        if self.cgroup is not None:
            self.oom_kills = self.cgroup.oom_kills()  # before the stop removes the cgroup
            # Nothing else left in it (the usual case): gone now, even if no stop follows.
            if not self.cgroup.pids():
                self.cgroup.remove(patient=False)
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._done.set()

    def _killpg(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self, signum: int, timeout: float) -> bool:
        """stop_signal to the group, SIGKILL after ``timeout``; then sweep the group and the marker."""
        killed = False
        if not self.exited:
            self._killpg(signum)
            with trio.move_on_after(timeout):
                await self.wait()
            if not self.exited:
                killed = True
                self._killpg(signal.SIGKILL)
                await self.wait()
        # Grandchildren that outlived the leader are still in its group, unless
        # they started a session of their own: those are still in its cgroup,
        # and carry the marker (unless they cleared their environment).
        self._killpg(signal.SIGKILL)
        if self.cgroup is not None:
            cgroup = self.cgroup
            await trio.to_thread.run_sync(cgroup.kill_all)
            await trio.to_thread.run_sync(cgroup.remove)
        await self._sweeper.sweep([self.marker])
        return killed


class Sweeper:
    """SIGKILLs every process that carries one of the markers asked for.

    A scan reads every process's environment, so requests are pooled: one scan
    (in a thread, off the trio loop) serves every marker asked for while the
    previous scan ran; stopping 1,000 instances costs a handful of scans.
    """

    def __init__(self, state_dir: str) -> None:
        self._prefix = marker_prefix(state_dir)
        self._pending: set[str] = set()
        self._started = self._finished = 0  # scan rounds
        self._scanning: trio.Event | None = None

    async def sweep(self, markers: Iterable[str]) -> None:
        self._pending.update(markers)
        mine = self._started + 1  # the first scan to start from now on covers these markers
        while self._finished < mine:
            if self._scanning is not None:
                await self._scanning.wait()
                continue
            self._started += 1
            batch, self._pending = frozenset(self._pending), set()
            done = self._scanning = trio.Event()
            try:
                await trio.to_thread.run_sync(kill_marked, self._prefix, batch)
            finally:
                self._finished, self._scanning = self._started, None
                done.set()


def kill_marked(prefix: str, markers: frozenset[str]) -> list[int]:
    """SIGKILL every process whose marker is one of ``markers``; return their pids.

    Two passes: a process in the middle of an exec shows an empty environment
    for a moment, and one forked during the first pass is only seen by the next.
    """
    killed = []
    for attempt in range(2):
        if attempt:
            time.sleep(0.01)
        for pid, value in marked_processes(prefix).items():
            if value in markers:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
                except OSError as e:  # EPERM (another user namespace, an LSM): one process, not the stop
                    log.warning("could not kill pid %d (%s): %s", pid, value, e)
    return killed


class LocalRuntime:
    def __init__(self, state_dir: str, *, ports: tuple[int, int] = DEFAULT_PORTS, bind_host: str = "127.0.0.1",
                 cgroups: Cgroups | None = None, port_locks: PortLocks | None = None) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.log_dir = os.path.join(self.state_dir, "logs")
        self.ports = ports
        self.bind_host = bind_host
        self._ports_used: set[int] = set()
        self._next_port = ports[0]
        self.port_locks = port_locks if port_locks is not None else PortLocks()  # shared with this host's other servers
        self.sweeper = Sweeper(self.state_dir)
        self.cgroups = cgroups if cgroups is not None else Cgroups(self.state_dir)

    # -- processes -----------------------------------------------------------------

    def start(self, spec: LaunchSpec) -> LocalProcess:
        env = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        ident = self._identity(spec)
        if ident is not None:  # not root's HOME for www-data
            env.update(HOME=ident.home, USER=ident.user, LOGNAME=ident.user)
        env.update(spec.env)
        env[MARKER] = marker = self.marker(spec.service, spec.instance_id)
        self._check_nofile(spec.nofile)
        path = self.log_path(spec.service, spec.instance_id)
        try:
            statedir.makedirs(os.path.dirname(path))
            # Opened here, by deployfs: the instance writes through the descriptor, so its log stays
            # deployfs's (0600 in a 0700 directory), unreadable and unwritable by its own user.
            log = statedir.open_file(path, "ab")  # a link planted there is never followed
        except OSError as e:
            raise StartError(f"cannot open its log {path}: {e.strerror or e}") from None
        try:
            cgroup = self.cgroups.create(spec.service, spec.instance_id, spec.limits)
            procs = cgroup.open_procs() if cgroup is not None else []
        except CgroupError as e:
            log.close()
            raise StartError(str(e)) from None
        with log:
            try:
                popen = subprocess.Popen(
                    spec.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=spec.cwd, env=env, start_new_session=True, close_fds=True,
                    preexec_fn=_child_setup(procs, spec.nofile, ident) if procs or spec.nofile or ident else None)
            except OSError as e:
                if cgroup is not None:
                    cgroup.remove()
                # The child reports a failed chdir with the directory as the filename.
                if spec.cwd is not None and e.filename == spec.cwd:
                    raise StartError(f"cannot start {spec.argv[0]}: working directory (dir) {spec.cwd}: "
                                     f"{e.strerror or e}") from None
                raise StartError(f"cannot start {spec.argv[0]}: {e.strerror or e}") from None
            except subprocess.SubprocessError:
                if cgroup is not None:
                    cgroup.remove()
                # _child_setup wrote the reason into the log before it failed.
                raise StartError(f"cannot start {spec.argv[0]}: {_last_line(self.read_log(spec.service, spec.instance_id, 1))}") from None
            finally:
                for fd in procs:
                    os.close(fd)
        pidfd = os.pidfd_open(popen.pid)
        start_time = proc_start_time(popen.pid) or 0
        return LocalProcess(popen.pid, start_time, pidfd, popen, marker, self.sweeper, cgroup)

    def _identity(self, spec: LaunchSpec) -> Identity | None:
        """Who the child becomes; None: stay as deployfs (no user named, or it is deployfs's own)."""
        if spec.user is None and spec.group is None:
            return None
        try:
            ident = resolve(spec.user if spec.user is not None else str(os.geteuid()), spec.group)
        except IdentityError as e:
            raise StartError(str(e)) from None
        if os.geteuid() != 0:
            if (ident.uid, ident.gid) != (os.geteuid(), os.getegid()):
                raise StartError(f"cannot run as {ident.user}: deployfs is not root")
            return None  # itself already: setgroups would need root
        return ident

    def _check_nofile(self, nofile: int | None) -> None:
        problem = nofile_problem(nofile)
        if problem is not None:
            raise StartError(problem)

    def marker(self, service: str, instance_id: int) -> str:
        """The value of MARKER in the environment of every process of this instance."""
        return f"{self.state_dir}:{service}:{instance_id}"

    def adopt(self, pid: int, start_time: int, service: str, instance_id: int) -> LocalProcess | None:
        if proc_start_time(pid) != start_time:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        # The pid could have died and been reused between the check and the open.
        if proc_start_time(pid) != start_time:
            os.close(pidfd)
            return None
        return LocalProcess(pid, start_time, pidfd, None, self.marker(service, instance_id), self.sweeper,
                            self.cgroups.find(service, instance_id))

    def find_unrecorded(self, wanted: set[tuple[str, int]]) -> dict[tuple[str, int], LocalProcess]:
        """The running leader of each instance that was started but whose pid was never recorded.

        A server killed between starting a process and recording its pid leaves
        it running with only its marker to tell what it is.  Its leader is the
        oldest marked process that leads its own session (children that called
        setsid are younger).
        """
        prefix = marker_prefix(self.state_dir)
        leaders: dict[tuple[str, int], tuple[int, int]] = {}  # key -> (start time, pid)
        for pid, value in marked_processes(prefix).items():
            service, _, ident = value[len(prefix):].rpartition(":")
            key = (service, int(ident)) if ident.isdigit() else None
            if key not in wanted or not _is_session_leader(pid):
                continue
            started = proc_start_time(pid)
            if started is not None and (key not in leaders or (started, pid) < leaders[key]):
                leaders[key] = (started, pid)
        found = {}
        for key, (started, pid) in leaders.items():
            proc = self.adopt(pid, started, *key)
            if proc is not None:
                found[key] = proc
        return found

    def oom_kills(self, service: str, instance_id: int) -> int:
        cgroup = self.cgroups.find(service, instance_id)  # left behind: nobody reaped it
        return 0 if cgroup is None else cgroup.oom_kills()

    async def sweep(self, keys: Iterable[tuple[str, int]]) -> None:
        """Kill whatever is left of these instances (children of a leader that is gone)."""
        keys = list(keys)
        for service, ident in keys:
            cgroup = self.cgroups.find(service, ident)
            if cgroup is not None:
                await trio.to_thread.run_sync(cgroup.kill_all)
                await trio.to_thread.run_sync(cgroup.remove)
        await self.sweeper.sweep([self.marker(service, ident) for service, ident in keys])

    def limit_problem(self, limits: Limits, nofile: int | None = None) -> tuple[str, str] | None:
        missing = self.cgroups.missing(limits)
        if missing is not None:
            return ("cpus" if missing[0] == "cpu" else missing[0], missing[1])
        problem = nofile_problem(nofile)
        return None if problem is None else ("nofile", problem)

    async def prune(self, keep: set[tuple[str, int]]) -> None:
        """Kill and remove the cgroups of instances no record lists (a crash between a
        record's removal and its cgroup's, or a stray the marker scan cannot see)."""
        await self.sweep(self.cgroups.instances() - keep)

    # -- ports -----------------------------------------------------------------------

    def allocate_port(self) -> int:
        lo, hi = self.ports
        for _ in range(hi - lo + 1):
            port = self._next_port
            self._next_port = lo if port >= hi else port + 1
            if port not in self._ports_used and _port_free(self.bind_host, port):
                if not self.port_locks.hold(port):
                    continue  # given by another deployfs on this host to an instance not listening yet
                self._ports_used.add(port)
                return port
        raise StartError(f"no free port in {lo}-{hi}")

    def claim_port(self, port: int) -> None:
        self._ports_used.add(port)
        self.port_locks.hold(port)  # (held elsewhere too: the instance is this server's all the same)

    def release_port(self, port: int) -> None:
        self._ports_used.discard(port)
        self.port_locks.release(port)

    # -- logs ------------------------------------------------------------------------

    def log_path(self, service: str, instance_id: int) -> str:
        return os.path.join(self.log_dir, service, f"{instance_id}.log")

    def log_parts(self, service: str, instance_id: int) -> list[str]:
        return logfiles.parts(self.log_dir, service, instance_id)

    def read_log(self, service: str, instance_id: int, lines: int) -> bytes:
        """The last ``lines`` lines, reading no more than the log's bound from the end of each part."""
        path = self.log_path(service, instance_id)
        data = b""
        for p in (path + ".1", path):
            try:
                with statedir.open_file(p, "rb") as f:
                    data += _tail(f, 2 * log_bound(lines))
            except FileNotFoundError:
                pass
        kept = data.splitlines(keepends=True)[-lines:]
        return b"".join(kept)

    async def bound_log(self, service: str, instance_id: int, lines: int) -> bool:
        """:meth:`trim_log` without stalling the loop: a stat here, and only a log past its
        bound goes to a worker thread (a trim reads up to twice the bound: 32 MiB at most)."""
        try:
            if os.stat(self.log_path(service, instance_id)).st_size <= log_bound(lines):
                return False
        except FileNotFoundError:
            return False
        return await trio.to_thread.run_sync(self.trim_log, service, instance_id, lines)

    def trim_log(self, service: str, instance_id: int, lines: int) -> bool:
        """Copy-truncate the log once it is past its bound; True if it was.

        The child appends with O_APPEND, so truncating in place is safe (this
        is logrotate's copytruncate: a line written between the copy and the
        truncate is lost).  Only the file's tail is read, never the whole: a
        flood of output costs the server no more memory than the bound.  The
        last ``lines`` lines go to ``.1``, so the view (``.1`` + the live file)
        always shows at least the newest ``lines`` lines.
        """
        path = self.log_path(service, instance_id)
        bound = log_bound(lines)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return False
        if size <= bound:
            return False
        with statedir.open_file(path, "r+b") as f:
            kept = b"".join(_tail(f, 2 * bound).splitlines(keepends=True)[-lines:])
            with statedir.open_file(path + ".1", "wb") as old:
                old.write(kept)
            f.truncate(0)
        return True

    def remove_log(self, service: str, instance_id: int, keep: int = 50) -> None:
        """An instance is gone: keep its log (why did it fail?) but only the newest ``keep`` per service."""
        d = os.path.join(self.log_dir, service)
        try:
            logs = sorted((e for e in os.scandir(d) if e.name.endswith(".log")), key=lambda e: e.stat().st_mtime)
        except FileNotFoundError:
            return
        for e in logs[:-keep] if len(logs) > keep else []:
            for p in (e.path, e.path + ".1"):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass


# A log's live file is copy-truncated once it passes max(64 KiB, 256 bytes a
# line), capped so that no trim reads more than 32 MiB.
LOG_BOUND_MIN, LOG_BOUND_MAX, LOG_LINE_BYTES = 64 * 1024, 16 * 1024 * 1024, 256


def log_bound(lines: int) -> int:
    """Bytes the live log file may hold before it is copy-truncated."""
    return min(LOG_BOUND_MAX, max(LOG_BOUND_MIN, lines * LOG_LINE_BYTES))


def _tail(f: IO[bytes], limit: int) -> bytes:
    """At most the last ``limit`` bytes of ``f``, from the start of a line when cut."""
    size = os.fstat(f.fileno()).st_size
    start = max(0, size - limit)
    data = os.pread(f.fileno(), size - start, start)
    if start > 0:
        data = data[data.find(b"\n") + 1:]  # the first line is cut: drop it
    return data


CAP_SYS_RESOURCE = 24


def _has_capability(cap: int) -> bool:
    """Whether this process has ``cap`` in its effective set (root without it is not enough)."""
    try:
        with open("/proc/self/status") as f:
            eff = next(line for line in f if line.startswith("CapEff:")).split()[1]
    except (OSError, StopIteration):
        return os.geteuid() == 0
    return bool(int(eff, 16) >> cap & 1)


def nofile_problem(nofile: int | None) -> str | None:
    """Why ``nofile`` cannot be set in a child of this process, or None.

    Raising the hard limit needs CAP_SYS_RESOURCE, which root lacks in many
    containers (this test machine among them); even with it, no limit goes
    above the kernel's ``fs.nr_open``."""
    if nofile is None:
        return None
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
    except (OSError, ValueError):
        nr_open = None
    if nr_open is not None and nofile > nr_open:
        return f"nofile {nofile} cannot be applied: above this host's fs.nr_open {nr_open}"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and nofile > hard and not _has_capability(CAP_SYS_RESOURCE):
        return (f"nofile {nofile} cannot be applied: above deployfs's own hard limit {hard}, which only a "
                "process with CAP_SYS_RESOURCE may raise (raise LimitNOFILE= in its unit, or ask for less)")
    return None


def ephemeral_overlap(ports: tuple[int, int]) -> tuple[int, int] | None:
    """The part of ``ports`` inside the kernel's ephemeral port range, if any."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
    except (OSError, ValueError):
        return None
    a, b = max(lo, ports[0]), min(hi, ports[1])
    return (a, b) if a <= b else None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def marked_processes(prefix: str) -> dict[int, str]:
    """Processes whose MARKER starts with ``prefix``: pid -> the marker's value.

    The marker in the environment is how deployfs recognises what it started
    (instances, the router), so nothing else is ever touched.
    """
    key = f"{MARKER}=".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        for var in environ.split(b"\0"):
            if var.startswith(key):
                value = var[len(key):].decode(errors="replace")
                if value.startswith(prefix):
                    found[int(entry)] = value
                break
    return found


def marker_prefix(state_dir: str) -> str:
    return f"{os.path.abspath(state_dir)}:"


def find_strays(state_dir: str, known: set[tuple[str, int]]) -> list[int]:
    """Processes started for this state dir that no instance record accounts for.

    What is left of an instance whose record is gone: its leader, and any
    descendant, including one that left the group with setsid.
    """
    prefix = marker_prefix(state_dir)
    strays = []
    for pid, value in marked_processes(prefix).items():
        service, _, ident = value[len(prefix):].rpartition(":")
        if service == "router":  # ours, but not an instance
            continue
        if ident.isdigit() and (service, int(ident)) not in known:
            strays.append(pid)
    return strays


def _child_setup(procs: list[int], nofile: int | None, ident: Identity | None) -> Callable[[], None]:
    """What the child does between fork and exec, in this order: enter its cgroups (as root,
    through descriptors deployfs opened), set its open-file limit (raising the hard limit
    needs root), then drop to its user and groups.  Only simple system calls: the server
    has threads, and a forked child may take no lock another thread held."""
    def setup() -> None:
        step = "enter its cgroup"
        try:
            for fd in procs:
                os.write(fd, b"0")
            if nofile is not None:
                step = f"set nofile {nofile}"
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            if ident is not None:
                step = f"switch to user {ident.user} (uid {ident.uid}, gid {ident.gid})"
                os.setgroups(list(ident.groups))
                os.setgid(ident.gid)
                os.setuid(ident.uid)
        except OSError as e:
            os.write(2, f"deployfs: cannot {step}: {e.strerror}\n".encode())
            raise
    return setup


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1].removeprefix("deployfs: ") if lines else "the child failed before exec"


def _is_session_leader(pid: int) -> bool:
    try:
        return os.getsid(pid) == pid
    except ProcessLookupError:
        return False
