"""A fake runtime and prober for driving the engine under trio's MockClock.

Health is decided per version: ``prober.behaviour[version]`` is "ok" (healthy
after ``ready_after`` seconds), "fail" (never healthy), "exit" (the process exits
after ``ready_after``) or "flaky-later" (healthy, then fails after ``fail_after``).
Manifests in these tests use ``health exec check $VERSION $INSTANCE`` so the prober
sees the version and slot.
"""

from __future__ import annotations

import itertools

import trio

from deployfs.node.health import Verdict
from deployfs.node.runtime import LaunchSpec, StartError


class FakeProcess:
    def __init__(self, rt: "FakeRuntime", pid: int, spec: LaunchSpec) -> None:
        self.rt, self.pid, self.start_time, self.spec = rt, pid, pid, spec
        self.version = spec.env["VERSION"]
        self.exit_status: int | None = None
        self.killed_by: int | None = None
        self.oom_kills = 0
        self.signals: list[int] = []
        self.signalled_at: list[float] = []
        self.went_bad_at: list[float] = []  # failed a probe by its version's behaviour (fail, flaky-later)
        self.started = trio.current_time()
        self._done = trio.Event()

    @property
    def exited(self) -> bool:
        return self._done.is_set()

    def exit(self, status: int) -> None:
        if not self.exited:
            self.exit_status = status
            self._done.set()

    async def wait(self) -> int | None:
        await self._done.wait()
        return self.exit_status

    async def stop(self, signum: int, timeout: float) -> bool:
        if not self.exited:
            self.signals.append(signum)
            self.signalled_at.append(trio.current_time())
            await trio.sleep(self.rt.stop_delay)
            self.exit(128 + signum)
        return False


class FakeRuntime:
    def __init__(self) -> None:
        self.procs: dict[int, FakeProcess] = {}
        self._pids = itertools.count(1000)
        self._ports = itertools.count(41000)
        self.stop_delay = 0.05
        self.limit_problems: dict = {}  # controller -> (directive, reason) this fake host cannot apply
        self.on_start = lambda proc: None

    def running(self, service: str | None = None) -> list[FakeProcess]:
        return [p for p in self.procs.values() if not p.exited and (service is None or p.spec.service == service)]

    def start(self, spec: LaunchSpec) -> FakeProcess:
        if spec.argv[0] == "/missing":
            raise StartError("cannot start /missing: No such file or directory")
        proc = FakeProcess(self, next(self._pids), spec)
        self.procs[proc.pid] = proc
        self.on_start(proc)
        return proc

    def marker(self, service: str, instance_id: int) -> str:
        return f"fake:{service}:{instance_id}"

    def adopt(self, pid: int, start_time: int, service: str, instance_id: int) -> FakeProcess | None:
        p = self.procs.get(pid)
        return p if p and not p.exited and p.start_time == start_time else None

    def find_unrecorded(self, wanted: set[tuple[str, int]]) -> dict[tuple[str, int], FakeProcess]:
        return {}

    async def sweep(self, keys) -> None:
        pass

    async def prune(self, keep) -> None:
        pass

    def oom_kills(self, service, instance_id) -> int:
        return 0

    def limit_problem(self, limits, nofile=None):
        return self.limit_problems.get("memory") if limits.memory else None

    def allocate_port(self) -> int:
        return next(self._ports)

    def claim_port(self, port: int) -> None: ...
    def release_port(self, port: int) -> None: ...
    def read_log(self, service: str, instance_id: int, lines: int) -> bytes: return b""
    def log_parts(self, service: str, instance_id: int) -> list[str]: return []
    async def bound_log(self, service: str, instance_id: int, lines: int) -> bool: return False
    def remove_log(self, service: str, instance_id: int) -> None: ...


class FakeProber:
    def __init__(self, rt: FakeRuntime) -> None:
        self.rt = rt
        self.behaviour: dict[str, str] = {}
        self.ready_after = 0.3
        self.fail_after = 5.0
        self._bound: dict[int, tuple[object, FakeProcess]] = {}

    def _process(self, check) -> FakeProcess | None:
        """The process this check belongs to.  ``$VERSION $INSTANCE`` alone can name two: slots
        renumber, so a new instance may get the slot a running one of the same version started on.
        Each health loop makes its own check object right after its process started, so a check is
        bound, on its first probe, to the youngest matching process no other check has."""
        bound = self._bound.get(id(check))
        if bound is not None:
            return bound[1]
        version, slot = check.target[1], check.target[2]
        procs = [p for p in self.rt.procs.values()
                 if p.version == version and p.spec.env["INSTANCE"] == slot and not p.exited]
        taken = {b[1].pid for b in self._bound.values()}
        free = [p for p in procs if p.pid not in taken] or procs
        proc = max(free, key=lambda p: (p.started, p.pid), default=None)
        if proc is not None:
            self._bound[id(check)] = (check, proc)  # the check kept alive: its id is never reused
        return proc

    async def probe(self, check, timeout: float, env=None) -> Verdict:
        version = check.target[1]
        await trio.sleep(0.01)
        proc = self._process(check)
        procs = [proc] if proc is not None and not proc.exited else []
        age = min((trio.current_time() - p.started for p in procs), default=0.0)
        how = self.behaviour.get(version, "ok")
        if how == "exit" and age >= self.ready_after:
            for p in procs:
                p.exit(1)
            return Verdict(False, "connection refused")
        if how == "fail" or (how == "flaky-later" and age >= self.fail_after):
            for p in procs:
                p.went_bad_at.append(trio.current_time())
            return Verdict(False, "http 503 from fake" if how == "fail" else "http 500 from fake")
        return Verdict(age >= self.ready_after, "ok" if age >= self.ready_after else "connection refused")


class HeldRouter:
    """A router that takes a table only when the test says so (``deliver``)."""

    def __init__(self) -> None:
        self.table: dict[str, tuple[int | None, list[tuple[str, int]]]] = {}
        self.refused: dict[str, str] = {}  # service -> why the router "could not listen"
        self.protocols: dict[str, str] = {}  # service -> tcp | http, as last given
        self._delivered = trio.Event()
        self._delivered.set()

    def set_backends(self, service: str, port: int | None, backends: list[tuple[str, int]],
                     weights: list[int] | None = None, *, protocol: str = "tcp") -> None:
        self.table[service] = (port, list(backends))
        self.protocols[service] = protocol
        if self._delivered.is_set():
            self._delivered = trio.Event()

    def deliver(self) -> None:
        self._delivered.set()

    def routed(self) -> bool:
        return self._delivered.is_set()

    def failure(self, service: str) -> str | None:
        return self.refused.get(service) if self.routed() else None

    def port_problem(self, port: int) -> tuple[int, str] | None:
        return None

    async def wait_routed(self) -> None:
        await self._delivered.wait()

    async def drain(self, service: str, backend: tuple[str, int], timeout: float) -> None:
        await self.wait_routed()
