"""The reconcile step: given the target and the instances as they are, what next.

Pure: no I/O, no clock of its own.  The engine calls :func:`plan` whenever
anything changes (an instance turned healthy, a stop finished, a command
arrived, a timer fired), carries out the actions, and calls again.  A rollout
is therefore not a script with a program counter but a target plus a few
counters, which is what lets a restarted server simply continue one.

Rolling (docs/manifest.md), as a reconcile rule:

1. a target instance that exited or turned unhealthy fails the rollout: stop
   it and every target instance not yet ready; old ones are never touched;
2. old instances that are not serving (starting, exited, unhealthy) retire;
3. while a batch is starting or anything is draining, wait;
4. once the batch is ready, retire as many old instances as keeps exactly
   ``replicas`` serving;
5. at a batch boundary: done if only ready target instances remain, else wait
   ``update_pause``, honour pause/step, and start the next batch on new slots
   (``update_batch`` of them, more if fewer than ``replicas`` serve: up to the surge bound).

After a failure (``failed``) the good version is held at ``replicas``: a
release that passed its checks and then went bad may already have retired
old instances, and a failed rollout never leaves the service weaker than
before it started.  Instances of the good version start beside the old ones
(within the surge bound), target instances leave once the good version has
``replicas`` ready, and a target instance that goes bad is stopped, never
restarted.

A server started again mid-rollout (``State.restoring``; a clean stop takes every instance with
it) first brings the good version back to ``replicas`` while nothing of the target runs, then the
rules above (or the canary rule) carry on: never the new version everywhere at once.

Running instances never exceed ``replicas + update_batch``: a batch starts
only when nothing is draining and at most ``replicas`` run.

Canary (``update canary``), one more rule while ``Target.canary`` is set (the
canary phase, until promotion): the old set is supervised as in steady state
and never stopped (what a superseded release left beside it goes first); ``canary`` target instances start beside it (one batch,
``replicas + canary`` running) and then the rollout holds, status ``canary``,
until a person promotes (the engine clears ``Target.canary`` and the rolling
rules carry on) or rolls back.  With ``auto_promote`` the plan itself says
:class:`Promote` once every canary has been ready that long.  A canary that
goes bad fails the rollout by rule 1, like any target instance.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

Key = tuple[str, int]  # (version, generation): `restart` bumps the generation

BACKOFF_BASE = 0.1
BACKOFF_CAP = 10.0
RESTART_WINDOW = 60.0


class Phase(enum.Enum):
    STARTING = "starting"  # running, not yet ready (includes the min_healthy soak)
    READY = "ready"  # healthy and soaked: routed, counts toward replicas
    UNHEALTHY = "unhealthy"
    EXITED = "exited"
    FAILED = "failed"  # gave up restarting it (max_restarts)
    LEAVING = "leaving"  # being drained and stopped


@dataclass(frozen=True)
class Inst:
    id: int
    slot: int
    key: Key
    phase: Phase
    why: str = ""  # why it is unhealthy / exited
    exit_ok: bool = False  # exited with status 0
    last_exit: float | None = None
    recent_restarts: int = 0  # within RESTART_WINDOW


@dataclass(frozen=True)
class Target:
    key: Key
    replicas: int
    strategy: str = "rolling"
    batch: int = 1
    pause: float = 0.0
    restart: str = "always"
    max_restarts: int = 5
    good: Key | None = None  # the last key that completed a rollout: what a failure restores
    stopped: bool = False  # replicas is 0 because of `stop`, not `scale 0`
    canary: int = 0  # > 0 during a canary phase: how many target instances run beside the old set
    auto_promote: float | None = None  # seconds of ready canaries before Promote (None: a person decides)


@dataclass(frozen=True)
class State:
    status: str = "none"  # none | rolling | paused | canary | failed
    steps: int = 0  # batches `step` may still start while paused
    boundary: float | None = float("-inf")  # when the last batch finished; None mid-batch
    restoring: bool = False  # started again mid-rollout: the good version's strength comes back first


@dataclass(frozen=True)
class Start:
    slot: int
    key: Key | None = None  # None: the target's


@dataclass(frozen=True)
class Stop:
    id: int
    reason: str


@dataclass(frozen=True)
class Restart:
    id: int
    reason: str


@dataclass(frozen=True)
class GiveUp:
    id: int
    reason: str


@dataclass(frozen=True)
class Fail:
    reason: str


@dataclass(frozen=True)
class Complete:
    renumber: dict[int, int]  # instance id -> slot


@dataclass(frozen=True)
class Promote:
    reason: str


Action = Start | Stop | Restart | GiveUp | Fail | Complete | Promote


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    state: State
    wake_at: float | None = None  # call again by then even if nothing changes


def progress(target: Target, insts: list[Inst]) -> tuple[int, int]:
    up = sum(1 for i in insts if i.key == target.key and i.phase is Phase.READY)
    return up, target.replicas


def backoff(recent_restarts: int) -> float:
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(recent_restarts, 20))


def plan(t: Target, insts: list[Inst], st: State, now: float, routed: bool = True) -> Plan:
    """The next step toward ``t``.  ``routed``: the router has every ready instance (else no Complete)."""
    live = [i for i in insts if i.phase is not Phase.LEAVING]
    draining = len(live) != len(insts)
    new = [i for i in live if i.key == t.key]
    old = [i for i in live if i.key != t.key]

    if st.status == "failed":
        return _restore(t, insts, live, st, now)
    if st.status == "none":
        if old:  # a rollout that was never marked: make it one
            return plan(t, insts, replace(st, status="rolling"), now, routed)
        return _supervise(t, live, st, now, scale=True)

    # -- a rollout is in flight (rolling or paused) -----------------------------
    bad = [i for i in new if i.phase in (Phase.EXITED, Phase.UNHEALTHY, Phase.FAILED)]
    if bad:
        first = bad[0]
        doomed = [i for i in new if i.phase is not Phase.READY]
        what = first.why if first.phase is Phase.EXITED else f"{first.phase.value}: {first.why}"
        return Plan([*(Stop(i.id, "rollout failed") for i in doomed),
                     Fail(f"instance {first.slot} ({t.key[0]}) {what}".rstrip(": "))],
                    replace(st, status="failed", steps=0))
    if st.restoring:
        restoring = _restore_first(t, insts, new, old, st)
        if restoring is not None:
            return restoring
        st = replace(st, restoring=False)
    if t.canary > 0 and old:
        return _canary(t, insts, new, old, st, now, draining)
    if st.status == "canary":  # promoted (or nothing old to compare with): the rolling rules go on
        st = replace(st, status="rolling")
    not_serving = [i for i in old if i.phase is not Phase.READY]
    if not_serving:
        return Plan([Stop(i.id, "not serving during the rollout") for i in not_serving], st)
    if any(i.phase is Phase.STARTING for i in new) or draining:
        return Plan([], st)
    ready = sorted(new, key=lambda i: i.slot)

    if t.strategy == "replace":
        if old:
            return Plan([Stop(i.id, "replace") for i in old], replace(st, boundary=None))
        if len(ready) >= t.replicas:
            return _complete(ready, st, routed)
        used = {i.slot for i in ready}
        free = [s for s in range(t.replicas + len(ready)) if s not in used][: t.replicas - len(ready)]
        return Plan([Start(s) for s in free], st)

    excess = len(old) + len(ready) - t.replicas
    if excess > 0 and old:
        victims = sorted(old, key=lambda i: i.slot)[:excess]
        return Plan([Stop(i.id, "replaced") for i in victims], replace(st, boundary=None))
    if len(ready) > t.replicas:
        return Plan([Stop(i.id, "scaled down") for i in ready[t.replicas:]], st)
    if not old and len(ready) == t.replicas:
        return _complete(ready, st, routed)

    # At a batch boundary: the pause runs from when the last batch finished.
    boundary = now if st.boundary is None else st.boundary
    st = replace(st, boundary=boundary)
    if st.status == "paused" and st.steps == 0:
        return Plan([], st)
    if now < boundary + t.pause and old:
        return Plan([], st, wake_at=boundary + t.pause)
    # Nothing old to protect (a first deploy, or a start after `stop`): start all at once.
    # A batch over what serves: ``update_batch`` beside a full old set, more when some are gone
    # (lost with their node): the surge bound, never more than ``replicas + update_batch``.
    count = min(t.replicas + t.batch - len(old) - len(ready), t.replicas - len(ready)) if old else t.replicas - len(ready)
    top = max((i.slot for i in insts), default=-1) + 1
    steps = st.steps - 1 if st.status == "paused" else st.steps
    return Plan([Start(top + k) for k in range(count)], replace(st, steps=steps, boundary=None))


def _canary(t: Target, insts: list[Inst], new: list[Inst], old: list[Inst], st: State, now: float,
            draining: bool) -> Plan:
    """The canary phase: the old set as in steady state, ``canary`` target instances beside it, then hold."""
    status = "paused" if st.status == "paused" else "canary"
    p = _supervise(t, old, st, now, scale=False)  # never stopped: only restarted per policy if it goes bad
    actions: list[Action] = list(p.actions)
    wake = [p.wake_at] if p.wake_at is not None else []
    want = min(t.canary, t.replicas)
    surplus = len(old) - t.replicas
    if surplus > 0:
        # An apply during a rollout or a canary: what the superseded release started beside the old
        # set leaves first (never the good version while another will do), so the canaries fit the surge.
        order = sorted(old, key=lambda i: (i.key == t.good, i.phase is Phase.READY, -i.slot))
        return Plan(actions + [Stop(i.id, "scaled down" if i.key == t.good else "superseded") for i in order[:surplus]],
                    replace(st, status=status, boundary=None), wake_at=min(wake, default=None))
    if surplus < 0 and t.good is not None:
        # `scale` up mid-canary: the old set is what serves, so it is what grows.
        top = max((i.slot for i in insts), default=-1) + 1
        actions += [Start(top + k, t.good) for k in range(-surplus)]
        return Plan(actions, replace(st, status=status), wake_at=min(wake, default=None))
    if len(new) > want:  # `canary` was lowered by an apply of the same version
        extra = sorted(new, key=lambda i: -i.slot)[: len(new) - want]
        return Plan(actions + [Stop(i.id, "more canaries than canary") for i in extra],
                    replace(st, status=status), wake_at=min(wake, default=None))
    if len(new) < want:
        if draining or (status == "paused" and st.steps == 0):
            return Plan(actions, replace(st, status=status), wake_at=min(wake, default=None))
        top = max((i.slot for i in insts), default=-1) + 1
        steps = st.steps - 1 if status == "paused" else st.steps
        actions += [Start(top + k) for k in range(want - len(new))]
        return Plan(actions, replace(st, status=status, steps=steps, boundary=None), wake_at=min(wake, default=None))
    if any(i.phase is not Phase.READY for i in new):
        return Plan(actions, replace(st, status=status, boundary=None), wake_at=min(wake, default=None))
    # Every canary is ready: from when this was first seen (-inf: not seen yet in this phase).
    since = now if st.boundary is None or st.boundary == float("-inf") else st.boundary
    st = replace(st, status=status, boundary=since)
    if t.auto_promote is not None and status == "canary":
        if now >= since + t.auto_promote:
            actions.append(Promote(f"auto_promote: the canaries were healthy for {t.auto_promote:g}s"))
            return Plan(actions, replace(st, status="rolling", boundary=now))
        wake.append(since + t.auto_promote)
    return Plan(actions, st, wake_at=min(wake, default=None))


def split_weights(canary: list[bool], percent: int, total: int = 100) -> list[int]:
    """Routing weights for backends (True: a canary) so the canaries get ``percent`` of ``total``
    whatever their number, shared evenly on each side; the weights sum to ``total`` exactly.
    Each side's total is fixed first (the canaries' exactly ``percent``, so 3 canaries at 50
    get 50, not 49), then shared within it by largest remainder.  With no canary, or nothing
    else, every backend counts the same."""
    n_canary = sum(canary)
    n_other = len(canary) - n_canary
    if not canary:
        return []
    if n_canary == 0 or n_other == 0:
        percent = 100 if n_other == 0 else 0
    side = {True: round(percent * total / 100), False: 0}
    side[False] = total - side[True]
    count = {True: n_canary, False: n_other}
    seen = {True: 0, False: 0}
    weights = []
    for c in canary:  # the first ones on each side take the remainder
        share, extra = divmod(side[c], count[c]) if count[c] else (0, 0)
        weights.append(share + (1 if seen[c] < extra else 0))
        seen[c] += 1
    return weights


def _complete(ready: list[Inst], st: State, routed: bool) -> Plan:
    if not routed:  # done promises a port that serves: not before the router has them all
        return Plan([], st)
    return Plan([Complete({i.id: n for n, i in enumerate(ready)})],
                State(status="none", steps=0, boundary=float("-inf")))


def _restore_first(t: Target, insts: list[Inst], new: list[Inst], old: list[Inst], st: State) -> Plan | None:
    """``State.restoring`` (a server that started again with a rollout in flight): while nothing of
    the target runs, bring the good version back to ``replicas`` first (a clean stop took every
    instance with it), so the rollout or canary carries on from a full old set with its batches,
    pauses and gates instead of starting everything new at once.  None once there is nothing to
    restore, or the good version itself goes bad (the usual rules then take it from there).
    ``replace`` is exempt: it stops the old set anyway."""
    if (t.good is None or t.good == t.key or t.strategy == "replace" or new or t.replicas == 0
            or any(i.key != t.good or i.phase not in (Phase.STARTING, Phase.READY) for i in old)
            or (len(old) >= t.replicas and all(i.phase is Phase.READY for i in old))):
        return None
    used = {i.slot for i in insts}
    free = [s for s in range(len(insts) + t.replicas) if s not in used][: max(0, t.replicas - len(old))]
    # The pause (or the canary's auto_promote clock) runs from once the old set is back.
    return Plan([Start(s, t.good) for s in free], replace(st, boundary=None))


def _restore(t: Target, insts: list[Inst], live: list[Inst], st: State, now: float) -> Plan:
    """After a failed rollout: old instances are supervised as usual, the good version is held at ``replicas``."""
    new = [i for i in live if i.key == t.key]
    old = [i for i in live if i.key != t.key]
    # The failed release gets no second chance by itself: a target instance that goes bad leaves.
    actions: list[Action] = [Stop(i.id, "rollout failed") for i in new if i.phase is not Phase.READY]
    p = _supervise(t, old, st, now, scale=False)
    actions += p.actions
    if t.good is not None and t.good != t.key:  # (rolling back to the good version itself failed: nothing to restore)
        # Surge like a rollout: never more than replicas + batch, leaving ones included.
        room = t.replicas + t.batch - len(insts)
        count = max(0, min(t.replicas - len(old), room))
        used = {i.slot for i in insts}
        free = [s for s in range(len(insts) + count) if s not in used][:count]
        actions += [Start(s, t.good) for s in free]
        # Once the good version serves `replicas`, what is left of the failed release goes.
        ready_new = sorted((i for i in new if i.phase is Phase.READY), key=lambda i: -i.slot)
        surplus = sum(1 for i in old if i.phase is Phase.READY) + len(ready_new) - t.replicas
        actions += [Stop(i.id, "rollout failed; the good version is back") for i in ready_new[:max(0, surplus)]]
    return Plan(actions, st, wake_at=p.wake_at)


def _supervise(t: Target, live: list[Inst], st: State, now: float, *, scale: bool) -> Plan:
    """Steady state: restart what failed (per policy, with backoff) and scale to ``replicas``."""
    actions: list[Action] = []
    wake: list[float] = []
    for i in live:
        if i.phase not in (Phase.EXITED, Phase.UNHEALTHY):
            continue
        if t.restart == "never" or (t.restart == "on-failure" and i.phase is Phase.EXITED and i.exit_ok):
            continue
        if i.recent_restarts >= t.max_restarts:
            actions.append(GiveUp(i.id, f"{i.recent_restarts} restarts within {RESTART_WINDOW:g}s"))
            continue
        at = (i.last_exit or now) + backoff(i.recent_restarts) if i.phase is Phase.EXITED else now
        if now >= at:
            actions.append(Restart(i.id, i.why))
        else:
            wake.append(at)
    if scale:
        slots = {i.slot for i in live}
        actions += [Start(s) for s in range(t.replicas) if s not in slots]
        why = "stop" if t.stopped else "scaled down"
        actions += [Stop(i.id, why) for i in live if i.slot >= t.replicas]
    return Plan(actions, st, wake_at=min(wake, default=None))
