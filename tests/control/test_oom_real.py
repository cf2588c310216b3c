"""An instance killed for its memory limit, with a real process and a real OOM kill."""

import pytest
import trio

from deployfs.node.cgroups import detect
from deployfs.serve.local import local_source
from deployfs.view.namespace import render_instance
from tests.control.test_supervise_real import deploy, real, real_node, until  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif("memory" not in detect().controllers, reason="no memory cgroup controller here")

# Healthy first (up for one health_interval), then allocates in steps, so the kernel kills
# it at the limit (a single huge allocation would just be refused).
HOG = "import time; time.sleep(0.5); x = [bytearray(1 << 20) for _ in range(200)]; time.sleep(60)"


async def test_an_oom_kill_is_reported_restarted_and_shown(real, real_node):
    deploy(real, f"image /usr/bin/python3\nargs -c '{HOG}'\nmemory 32M\nrestart always\nhealth_interval 0.2\n")
    svc = real.services["web"]
    await until(lambda: svc.by_slot() and svc.by_slot()[0].rec.restarts >= 1)
    events = real.events.current("web").decode()
    assert "instance 0 killed: out of memory (limit 32M)\n" in events
    assert "instance 0 killed: out of memory (limit 32M), restarting (1/5)\n" in events
    inst = svc.by_slot()[0]
    source, cache = local_source(real_node)  # what instances/0 renders: the record the engine wrote
    async with trio.open_nursery() as n:
        await n.start(cache.run)
        shown = source.service("web").instances[0]
        n.cancel_scope.cancel()
    assert inst.rec.oom_kills >= 1 and render_instance(shown).endswith(f" oom_kills={inst.rec.oom_kills}\n")
