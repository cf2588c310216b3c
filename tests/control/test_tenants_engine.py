"""The engine's side of run-as users and limits, with the fake runtime: what it asks the runtime for,
limit changes as rolling updates, an OOM kill as an exit with its reason, the user policy."""

import pytest
import trio

from deployfs.model.errors import CommandError, Kind
from deployfs.node.identity import UserPolicy
from tests.control.harness import deploy_v1, manifest


async def test_user_and_limits_reach_the_runtime_and_a_limit_change_rolls(h, autojump_clock):
    v1 = await deploy_v1(h)
    v2 = h.write(manifest(user="nobody", group="nogroup", memory="64M", cpus="0.5", pids=9, nofile=99))
    assert v2 != v1 and h.cmd("apply") == f"ok rolling {v1}->{v2}"
    assert await h.settle() == f"done {v2}"
    spec = h.rt.running("web")[0].spec
    assert (spec.user, spec.group, spec.nofile) == ("nobody", "nogroup", 99)
    assert (spec.limits.memory, spec.limits.cpus, spec.limits.pids) == (64 << 20, 0.5, 9)
    v3 = h.write(manifest(user="nobody", group="nogroup", memory="128M", cpus="0.5", pids=9, nofile=99))
    assert h.cmd("apply") == f"ok rolling {v2}->{v3}"  # only the memory limit changed
    assert await h.settle() == f"done {v3}"


async def test_the_default_user_is_what_the_runtime_is_asked_for(h, autojump_clock):
    h.engine.users = h.node.agent.users = UserPolicy(default_user="nobody")  # (as serve gives both the one policy)
    h.write(manifest())
    assert h.cmd("apply").startswith("ok deployed")
    assert (await h.settle()).startswith("done")
    assert {p.spec.user for p in h.rt.running("web")} == {"nobody"}
    # Recorded with the version: a server now without the default restarts it as nobody still.
    assert "user nobody  # --default-user when applied" in h.svc.rec.manifest
    h.engine.users = h.node.agent.users = UserPolicy()  # (as serve gives both the one policy)
    h.cmd("restart")
    assert (await h.settle()).startswith("done")
    assert {p.spec.user for p in h.rt.running("web")} == {"nobody"}


async def test_an_oom_kill_is_an_exit_reported_with_its_limit_and_restarted(h, autojump_clock):
    h.write(manifest(memory="64M", replicas=1))
    h.cmd("apply")
    assert await h.settle() == f"done {h.svc.rec.version}"
    victim = h.rt.running("web")[0]
    victim.oom_kills = 1
    victim.exit(137)
    with trio.fail_after(30):
        while h.svc.by_slot()[0].rec.restarts < 1 or not h.rt.running("web"):
            await trio.sleep(0.1)
    assert "instance 0 killed: out of memory (limit 64M)" in h.events()
    assert "instance 0 killed: out of memory (limit 64M), restarting (1/5)" in h.events()
    assert h.svc.by_slot()[0].rec.oom_kills == 1 and len(h.rt.running("web")) == 1


async def test_a_refused_user_changes_nothing(h, autojump_clock):
    v1 = await deploy_v1(h)
    h.engine.users = h.node.agent.users = UserPolicy()  # (as serve gives both the one policy)
    h.write(manifest(user="root"))
    with pytest.raises(CommandError) as e:
        h.engine.command("web", "apply", None, "uid=1000")
    assert e.value.kind is Kind.PERMISSION and "user root: the instance would run as root" in e.value.message
    assert h.svc.rec.version == v1 and h.svc.rec.update_status == "none"
    h.write(manifest(user="dfst_nobody_here"))
    with pytest.raises(CommandError) as e:
        h.cmd("apply")
    assert e.value.kind is Kind.INVALID and e.value.message == "manifests/web line 9: no user 'dfst_nobody_here' on this host"
    assert h.svc.rec.version == v1


async def test_a_limit_this_host_cannot_apply_refuses_the_manifest_with_its_line(h, autojump_clock):
    v1 = await deploy_v1(h)
    h.rt.limit_problems["memory"] = ("memory", "memory 64M cannot be applied: this host has no memory cgroup controller")
    h.write(manifest(memory="64M"))
    with pytest.raises(CommandError) as e:
        h.cmd("apply")
    assert e.value.kind is Kind.INVALID
    assert e.value.message == "manifests/web line 9: memory 64M cannot be applied: this host has no memory cgroup controller"
    assert h.svc.rec.version == v1 and "apply refused: " + e.value.message in h.events()
