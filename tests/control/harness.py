from __future__ import annotations

import trio

from deployfs.control.engine import Engine
from deployfs.serve.local import LocalNode
from deployfs.model.manifest import parse
from deployfs.state.store import SqliteStore
from tests.fakes import FakeProber, FakeRuntime


def manifest(image: str = "/bin/v1", replicas: int = 3, **kw: object) -> bytes:
    d: dict[str, object] = {"image": image, "replicas": replicas, "health": "exec check $VERSION $INSTANCE",
                            "health_interval": 0.2, "health_retries": 2, "update_deadline": 5, "stop_timeout": 1,
                            "drain_timeout": 0.5}
    d.update(kw)
    return "".join(f"{k} {v}\n" for k, v in d.items()).encode()


def version_of(text: bytes) -> str:
    return parse(text, name="web").manifest.version


class Harness:
    def __init__(self, tmp_path) -> None:
        self.store = SqliteStore(str(tmp_path))
        self.rt = FakeRuntime()
        self.prober = FakeProber(self.rt)
        self.local()

    def local(self, **kw: object) -> Engine:
        """A fresh engine and node agent on this store, as ``deployfs serve`` builds them; run ``h.node.run``."""
        self.node = LocalNode(self.store, self.rt, self.prober, **kw)  # type: ignore[arg-type]
        self.engine = self.node.engine
        return self.engine

    def write(self, text: bytes, name: str = "web") -> str:
        self.store.put_file(name, text)
        return version_of(text)

    def cmd(self, verb: str, arg: str | None = None, name: str = "web") -> str:
        return self.engine.command(name, verb, arg, "uid=0")

    @property
    def svc(self):
        return self.engine.services["web"]

    async def settle(self, timeout: float = 120) -> str:
        with trio.fail_after(timeout):
            while True:
                out = self.svc.outcome()
                if out is not None and not self._moving():
                    return out
                await self.svc.wait_change()

    def _moving(self) -> bool:
        svc = self.svc
        t = svc.target()
        want = t.replicas
        ready = [i for i in svc.instances.values() if i.phase.value == "ready" and not i.leaving]
        busy = any(i.leaving or i.busy for i in svc.instances.values())
        # A scale still being carried out (`wait` does not follow one): ready short of the
        # count, or an instance on a slot above it not yet told to leave.
        down = any(i.rec.slot >= want and not i.leaving for i in svc.instances.values())
        up = len(ready) != want and not any(  # (a scale-up may never complete if instances fail)
            i.phase.value in ("failed", "exited", "unhealthy") for i in svc.instances.values())
        return busy or (svc.rec.update_status == "none" and (down or up))

    def events(self) -> list[str]:
        return [l.split(" ", 1)[1] for l in self.engine.events.current("web").decode().splitlines()]


def watch(h: Harness, replicas: int = 3, batch: int = 1) -> dict:
    """Record the worst moments: most running at a start, fewest ready during a rollout."""
    seen: dict = {"max_running": 0, "min_ready": None}

    def on_start(proc) -> None:
        seen["max_running"] = max(seen["max_running"], len(h.rt.running("web")))

    def on_change(name: str) -> None:
        if h.svc.rec.update_status in ("rolling", "paused"):
            ready = len(h.svc.endpoints()) if h.svc.manifest.port else sum(
                1 for i in h.svc.instances.values() if i.phase.value == "ready" and not i.leaving)
            seen["min_ready"] = ready if seen["min_ready"] is None else min(seen["min_ready"], ready)

    h.rt.on_start = on_start
    h.engine.listeners.append(on_change)
    return seen


async def deploy_v1(h: Harness, **kw: object) -> str:
    v1 = h.write(manifest(**kw))
    assert h.cmd("apply").startswith("ok deployed")
    assert await h.settle() == f"done {v1}"
    return v1
