"""Random command sequences and health outcomes against the engine (fake runtime, MockClock).

Invariants (DESIGN.md §4, issue 5):
- a start never makes more than replicas + update_batch run;
- once a rollout fails, no instance that was serving before it began is signalled;
- completion means exactly `replicas` instances on slots 0..replicas-1, all at the target;
- progress never goes backwards within one rollout (scale aside);
- nothing starts while paused except one batch per `step`;
- rollback converges to the previous version.
"""

import errno

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings, strategies as st

from deployfs.engine import CommandError
from tests.engine.harness import Harness, manifest

VERSIONS = ["/bin/a", "/bin/b", "/bin/c", "/bin/d"]
ops = st.one_of(
    st.tuples(st.just("apply"), st.sampled_from(VERSIONS), st.sampled_from(["ok", "ok", "fail", "exit", "flaky-later"])),
    st.tuples(st.sampled_from(["pause", "resume", "step", "rollback", "restart"]), st.none(), st.none()),
    st.tuples(st.just("scale"), st.integers(0, 5).map(str), st.none()),
    st.tuples(st.just("wait"), st.floats(0, 3), st.none()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=st.lists(ops, min_size=1, max_size=10), batch=st.integers(1, 3), replicas=st.integers(1, 4))
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
        if last_progress["key"] == key and last_progress["r"] == r and up < last_progress["up"]:
            problems.append(f"progress went back {last_progress['up']} -> {up}")
        last_progress.update(key=key, up=up, r=r)

    h.rt.on_start = on_start
    h.engine.listeners.append(on_change)

    async def main():
        async with trio.open_nursery() as n:
            await n.start(h.engine.run)
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
                except CommandError as e:
                    assert e.errno in (errno.EBUSY, errno.EINVAL, errno.ENOENT), e
                    continue
                if verb == "step":
                    start_budget["paused_starts"] -= batch * (svc.state.steps - steps_before)
                if verb in ("apply", "rollback", "restart"):
                    target = svc.rec.version
                    out = await h.settle()
                    if out.startswith("failed"):
                        # From the moment of failure on, old instances are never signalled.
                        await trio.sleep(1)
                        for pid in serving_before:
                            proc = h.rt.procs[pid]
                            if proc.version != target and any(t >= failed_at["t"] for t in proc.signalled_at):
                                problems.append(f"failed rollout signalled old pid {pid}")
                    elif out.startswith("done"):
                        insts = h.svc.by_slot()
                        slots = [i.rec.slot for i in insts]
                        if slots != list(range(h.svc.rec.replicas)) or {i.rec.version for i in insts} - {target}:
                            problems.append(f"done but slots={slots} versions={[i.rec.version for i in insts]}")
                    if verb == "rollback" and h.svc.rec.version != target:
                        problems.append("rollback did not converge")
            h.cmd("resume") if h.svc.rec.update_status == "paused" else None
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert problems == []
    assert start_budget["paused_starts"] <= 0, "instances started while paused without a step"
