"""Random command sequences and health outcomes against the engine (fake runtime, MockClock).

Invariants (docs/manifest.md):
- a start never makes more than replicas + update_batch run;
- once a rollout fails, no instance that was serving before it began is signalled,
  unless it went bad itself (then it is restarted per `restart`, docs/manifest.md);
- a failed rollout brings the good version back to `replicas` (docs/manifest.md);
- previous_version is only ever a version that completed a rollout;
- completion means exactly `replicas` instances on slots 0..replicas-1, all at the target;
- progress never goes backwards within one rollout (scale aside, or a target instance going bad);
- nothing starts while paused except one batch per `step`;
- rollback converges to the previous version.
"""


import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings, strategies as st

from deployfs.model.errors import CommandError, Kind
from tests.control.harness import Harness, manifest

VERSIONS = ["/bin/a", "/bin/b", "/bin/c", "/bin/d"]
ops = st.one_of(
    st.tuples(st.just("apply"), st.sampled_from(VERSIONS), st.sampled_from(["ok", "ok", "fail", "exit", "flaky-later"])),
    st.tuples(st.sampled_from(["pause", "resume", "step", "rollback", "restart"]), st.none(), st.none()),
    st.tuples(st.just("scale"), st.integers(0, 5).map(str), st.none()),
    st.tuples(st.just("wait"), st.floats(0, 3), st.none()),
)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=st.lists(ops, min_size=1, max_size=10), batch=st.integers(1, 3), replicas=st.integers(1, 4))
# The in-force version turns flaky while a restart of a broken release fails: restarting the
# old instance that went bad is supervision, not the failed rollout touching it.
@example(script=[("apply", "/bin/a", "flaky-later"), ("apply", "/bin/b", "exit"), ("apply", "/bin/b", "ok"),
                 ("apply", "/bin/b", "ok"), ("restart", None, None)], batch=1, replicas=1)
# A release that fails after a scale-up: the good version is brought back to the new count.
@example(script=[("apply", "/bin/b", "ok"), ("scale", "2", None), ("apply", "/bin/a", "exit")], batch=1, replicas=1)
# A command lands between the spawns of one plan (scale 4, then scale 0 and an apply): the
# rest of that plan must not start instances for the old target or undo the new status.
@example(script=[("apply", "/bin/b", "ok"), ("scale", "4", None), ("wait", 0.0, None), ("scale", "0", None),
                 ("apply", "/bin/a", "ok")], batch=1, replicas=1)
# The same with an unchanged apply: `done` at once (steady state), the scale-down still to come.
@example(script=[("apply", "/bin/c", "ok"), ("scale", "4", None), ("wait", 0.0, None), ("scale", "3", None),
                 ("apply", "/bin/c", "ok")], batch=1, replicas=3)
# ...and when the instances it scales down are failing.
@example(script=[("scale", "2", None), ("apply", "/bin/a", "fail"), ("scale", "0", None), ("apply", "/bin/a", "ok")],
         batch=1, replicas=1)
# A same-version apply that scales up instances that keep crashing: no rollout, so no completion.
@example(script=[("scale", "0", None), ("apply", "/bin/a", "exit"), ("scale", "1", None), ("wait", 0.375, None),
                 ("scale", "2", None), ("apply", "/bin/a", "ok")], batch=1, replicas=1)
# Going back to the good version fails (it broke while in force): there is nothing to restore.
@example(script=[("apply", "/bin/a", "fail"), ("apply", "/bin/b", "fail"), ("apply", "/bin/a", "ok")], batch=1, replicas=1)
def test_random_operations_keep_the_invariants(tmp_path_factory, script, batch, replicas):
    h = Harness(tmp_path_factory.mktemp("p"))
    problems: list[str] = []
    last_progress = {"key": None, "up": 0, "r": None}
    start_budget = {"paused_starts": 0}

    def on_start(proc):
        svc = h.svc
        bound = svc.rec.replicas + svc.manifest.update_batch
        running = len(h.rt.running("web"))
        if svc.rec.update_status in ("rolling", "paused") and running > bound:
            problems.append(f"{running} running > {bound}")
        if svc.rec.update_status == "paused":
            start_budget["paused_starts"] += 1

    failed_at = {"t": None}

    def on_change(name):
        svc = h.engine.services.get("web")
        if svc is not None and svc.rec.update_status == "failed" and failed_at["t"] is None:
            failed_at["t"] = trio.current_time()
        if svc is None or svc.rec.update_status not in ("rolling", "paused"):
            last_progress.update(key=None)
            return
        key, (up, r) = svc.target().key, svc.progress()
        # A target instance that goes bad itself takes progress back (and fails the rollout).
        went_bad = any((i.rec.version, i.rec.generation) == key and i.phase.value in ("unhealthy", "exited", "failed")
                       for i in svc.instances.values())
        if last_progress["key"] == key and last_progress["r"] == r and up < last_progress["up"] and not went_bad:
            problems.append(f"progress went back {last_progress['up']} -> {up}")
        last_progress.update(key=key, up=up, r=r)

    h.rt.on_start = on_start
    h.engine.listeners.append(on_change)

    async def main():
        async with trio.open_nursery() as n:
            await n.start(h.node.run)
            h.write(manifest(replicas=replicas, update_batch=batch, image="/bin/a"))
            h.cmd("apply")
            await h.settle()
            for verb, arg, how in script:
                svc = h.svc
                if verb == "wait":
                    await trio.sleep(arg)
                    continue
                serving_before = {i.rec.pid for i in svc.instances.values() if i.phase.value == "ready"}
                steps_before = svc.state.steps
                failed_at["t"] = None
                try:
                    if verb == "apply":
                        text = manifest(replicas=svc.rec.replicas, update_batch=batch, image=arg)
                        v = h.write(text)
                        h.prober.behaviour.setdefault(v, how)
                    h.cmd(verb, arg)
                    rolled = svc.rec.update_status == "rolling"  # (a same-version apply only scales)
                except CommandError as e:
                    assert e.kind in (Kind.BUSY, Kind.INVALID, Kind.NOT_FOUND), e
                    continue
                if verb == "step":
                    start_budget["paused_starts"] -= batch * (svc.state.steps - steps_before)
                if verb in ("apply", "rollback", "restart"):
                    target = svc.rec.version
                    out = await h.settle()
                    if out.startswith("failed"):
                        # From the moment of failure on, old instances are never signalled
                        # (but one that went bad itself is restarted, as outside a rollout).
                        await trio.sleep(1)
                        for pid in serving_before:
                            proc = h.rt.procs[pid]
                            if proc.version != target and any(
                                    t >= failed_at["t"] and not any(b <= t for b in proc.went_bad_at)
                                    for t in proc.signalled_at):
                                problems.append(f"failed rollout signalled old pid {pid}")
                        key = h.svc.target().key
                        good = [i for i in h.svc.instances.values()
                                if not i.leaving and (i.rec.version, i.rec.generation) != key]
                        restorable = h.svc.rec.good_version and (h.svc.rec.good_version, h.svc.rec.good_generation) != key
                        if restorable and len(good) < h.svc.rec.replicas:
                            problems.append(f"failed rollout left {len(good)} of {h.svc.rec.replicas}")
                    elif out.startswith("done") and rolled:  # (`wait` does not follow a scale)
                        insts = h.svc.by_slot()
                        slots = [i.rec.slot for i in insts]
                        if slots != list(range(h.svc.rec.replicas)) or {i.rec.version for i in insts} - {target}:
                            problems.append(f"done but slots={slots} versions={[i.rec.version for i in insts]}")
                    if verb == "rollback" and h.svc.rec.version != target:
                        problems.append("rollback did not converge")
                completed = {e.split()[-3] for e in h.events() if " complete: " in e}
                prev = h.svc.rec.previous_version
                if prev is not None and (prev not in completed or prev == h.svc.rec.version):
                    problems.append(f"previous_version {prev} never completed or is in force")
            h.cmd("resume") if h.svc.rec.update_status == "paused" else None
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert problems == []
    assert start_budget["paused_starts"] <= 0, "instances started while paused without a step"


# -- canary () -------------------------------------------------------------------------

canary_ops = st.one_of(
    st.tuples(st.just("apply"), st.sampled_from(VERSIONS), st.sampled_from(["ok", "ok", "fail", "exit", "flaky-later"])),
    st.tuples(st.sampled_from(["promote", "abort", "rollback", "pause", "resume", "step"]), st.none(), st.none()),
    st.tuples(st.just("wait"), st.floats(0, 3), st.none()),
)


class WeightRouter:
    """Records every weighted table the engine hands the router."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def set_backends(self, service, port, backends, weights=None, *, protocol="tcp") -> None:
        if weights is not None and (len(weights) != len(backends) or sum(weights) != 100):
            self.problems.append(f"weights {weights} for {len(backends)} backends do not sum to 100")

    def routed(self) -> bool:
        return True

    async def wait_routed(self) -> None:
        pass

    async def drain(self, service, backend, timeout) -> None:
        pass

    def failure(self, service):
        return None

    def port_problem(self, port):
        return None


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=st.lists(canary_ops, min_size=1, max_size=8), canaries=st.integers(1, 3), replicas=st.integers(1, 4),
       weight=st.sampled_from([None, 0, 10, 33, 100]), auto=st.booleans())
@example(script=[("apply", "/bin/b", "ok"), ("abort", None, None)], canaries=1, replicas=3, weight=10, auto=False)
@example(script=[("apply", "/bin/b", "ok"), ("pause", None, None), ("promote", None, None), ("step", None, None),
                 ("abort", None, None)], canaries=2, replicas=3, weight=None, auto=False)
@example(script=[("apply", "/bin/b", "flaky-later"), ("wait", 3.0, None), ("promote", None, None)],
         canaries=1, replicas=2, weight=10, auto=True)
# The good version itself goes bad while a failed canary with auto_rollback waits to restore it:
# the rollback goes ahead (and fails, saying why) instead of waiting for ever.
@example(script=[("apply", "/bin/a", "fail"), ("apply", "/bin/b", "fail")], canaries=1, replicas=1, weight=None, auto=True)
# A step while paused in a canary whose canaries are up: refused, not a step that never ends.
@example(script=[("apply", "/bin/b", "ok"), ("pause", None, None), ("step", None, None), ("resume", None, None)],
         canaries=1, replicas=2, weight=None, auto=False)
def test_canary_operations_keep_the_invariants(tmp_path_factory, script, canaries, replicas, weight, auto):
    """Never an old instance stopped before promotion (unless it went bad itself); after an abort
    (or rollback) of a canary exactly the old set remains; weights always sum to 100; never more
    than replicas + max(update_batch, canary) run."""
    h = Harness(tmp_path_factory.mktemp("c"))
    problems: list[str] = []
    h.local(router=WeightRouter(problems))  # type: ignore[arg-type]
    extra: dict[str, object] = {"update": "canary", "canary": canaries, "port": 8080}
    if weight is not None:
        extra["canary_weight"] = weight
    if auto:
        extra["auto_rollback"] = "yes"

    def on_start(proc) -> None:
        running = len(h.rt.running("web"))
        if running > replicas + max(1, canaries):
            problems.append(f"{running} running > {replicas} + max(1, {canaries})")

    def on_change(name: str) -> None:
        # Before promotion nothing old is asked to stop: only what went bad itself is restarted.
        svc = h.engine.services.get("web")
        if svc is None or not svc.rec.canary_phase:
            return
        good = (svc.rec.good_version, svc.rec.good_generation)
        for i in svc.instances.values():
            if i.leaving and (i.rec.version, i.rec.generation) == good and i.phase.value == "ready":
                problems.append(f"old instance {i.rec.slot} stopped during the canary phase")

    h.rt.on_start = on_start
    h.engine.listeners.append(on_change)

    async def main():
        async with trio.open_nursery() as n:
            await n.start(h.node.run)
            h.write(manifest(replicas=replicas, image="/bin/a", **extra))
            h.cmd("apply")
            await h.settle()
            for verb, arg, how in script:
                svc = h.svc
                if verb == "wait":
                    await trio.sleep(arg)
                    continue
                in_canary = svc.rec.canary_phase
                old = {p.pid for p in h.rt.running("web") if p.version != svc.rec.version}
                try:
                    if verb == "apply":
                        v = h.write(manifest(replicas=replicas, image=arg, **extra))
                        h.prober.behaviour.setdefault(v, how)
                    h.cmd(verb)
                except CommandError as e:
                    assert e.kind in (Kind.BUSY, Kind.INVALID, Kind.NOT_FOUND), e
                    continue
                out = await h.settle()
                if verb in ("abort", "rollback") and in_canary and out.startswith("done"):
                    now = {p.pid for p in h.rt.running("web")}
                    went_bad = {p.pid for p in h.rt.procs.values() if p.went_bad_at}
                    if not (old & went_bad) and now != old:
                        problems.append(f"after {verb} of a canary: running {sorted(now)}, the old set {sorted(old)}")
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert problems == []
