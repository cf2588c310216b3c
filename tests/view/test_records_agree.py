"""What the view derives from the records agrees with what the engine derives from its memory.

The view reads the records (through the cache the store's watch feeds), the engine its own
instances; both ask the same pure rules of model/status.py.  Sampled all through deploys, a
rolling update with a pause, a failed release, a rollback, a scale and a stop, the two must
give the same health, update_progress, endpoints and `wait` answer.
"""

import trio

from tests.control.harness import manifest


async def agree(h, ns, seconds: float, step: float = 0.05) -> int:
    """Compare at every ``step`` for ``seconds``; how many samples were taken."""
    n = 0
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        while True:  # the records as the engine last wrote them (it may write again while we wait)
            await ns.source.settled()
            if ns.source.cache.revision >= h.store.kv.revision:
                break
        shown, svc = ns.source.service("web"), h.engine.services.get("web")
        if svc is None:
            assert shown is None
        else:
            engine = (svc.health(), svc.progress(), sorted(svc.endpoints()), svc.outcome(), svc.rec.update_status)
            view = (shown.health, shown.progress, sorted(shown.endpoints), shown.outcome, shown.update_status)
            assert view == engine, f"at {trio.current_time():.2f}: records say {view}, the engine {engine}"
        n += 1
        await trio.sleep(step)
    return n


async def test_the_records_derive_what_the_engine_derives(h, ns, autojump_clock):
    kw = {"port": 18999, "update_pause": 0.5}
    h.write(manifest(replicas=3, **kw))
    h.cmd("apply")
    samples = await agree(h, ns, 4)
    assert h.svc.outcome().startswith("done")
    h.write(manifest(image="/bin/v2", replicas=3, **kw))
    h.cmd("apply")
    samples += await agree(h, ns, 0.7)
    h.cmd("pause")
    samples += await agree(h, ns, 2)
    h.cmd("resume")
    samples += await agree(h, ns, 6)
    assert h.svc.outcome().startswith("done")
    h.prober.behaviour[h.write(manifest(image="/bin/v3", replicas=3, **kw))] = "fail"
    h.cmd("apply")
    samples += await agree(h, ns, 8)
    assert h.svc.outcome().startswith("failed:")
    h.cmd("rollback")
    samples += await agree(h, ns, 8)
    h.cmd("scale", "2")
    samples += await agree(h, ns, 4)
    h.cmd("stop")
    samples += await agree(h, ns, 4)
    assert h.svc.health() == "stopped" and samples > 500
