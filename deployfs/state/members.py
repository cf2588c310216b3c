"""The one rule from records to what the derivations of model/status.py read.

The engine (rebuilding its instances when it starts on the records), and the view
(showing the records as the store's watch brings them) both turn an
:class:`InstanceRecord` into a :class:`~deployfs.model.status.Member` and a
:class:`ServiceRecord` into a :class:`~deployfs.model.status.Standing` here, so a
server started again carries on from exactly what a shell was shown.  Pure: no
store, no clock.
"""

from __future__ import annotations

from ..model import status as derive
from ..model.manifest import Manifest
from ..model.rollout import Phase
from .records import DRAIN, RUN, STOP, InstanceRecord, ServiceRecord

PHASES = {p.value: p for p in Phase}


def phase_of(rec: InstanceRecord) -> Phase:
    """The planner's phase as the node agent last wrote it (GiveUp writes "failed" itself)."""
    return PHASES.get(rec.phase, Phase.STARTING)


def leaving(rec: InstanceRecord) -> bool:
    """The controller asked to drain or stop it (an instance given up on stays, failed)."""
    return (rec.desired == DRAIN or (rec.desired == STOP and rec.state != "failed")
            or rec.state == "draining" or rec.phase == Phase.LEAVING.value)


def busy(rec: InstanceRecord) -> bool:
    """A restart in flight: the agent has not yet started the incarnation asked for."""
    return rec.desired == RUN and rec.incarnation != rec.restarts


def member_of(rec: InstanceRecord) -> derive.Member:
    return derive.Member((rec.version, rec.generation), rec.slot, phase_of(rec), leaving=leaving(rec),
                         busy=busy(rec), backend=(rec.address, rec.port) if rec.port else None)


def canaries_of(rec: ServiceRecord, m: Manifest | None) -> int:
    """How many canaries run beside the old set now: 0 outside a canary phase."""
    if not rec.canary_phase or rec.stopped or m is None or m.update != "canary":
        return 0
    return min(m.canary, rec.replicas)


def rolling_back_of(rec: ServiceRecord, m: Manifest | None) -> bool:
    """A failed rollout with ``auto_rollback yes`` that has a good version to go back to."""
    return (rec.update_status == "failed" and m is not None and m.auto_rollback
            and rec.good_version is not None and rec.version != rec.good_version)


def standing_of(rec: ServiceRecord, m: Manifest | None, *, steps: int | None = None) -> derive.Standing:
    """``steps``: the planner's own count when it has one (the record's is saved with it)."""
    return derive.Standing(version=rec.version or "", key=(rec.version or "", rec.generation),
                           replicas=rec.replicas, update_status=rec.update_status, stopped=rec.stopped,
                           deleting=rec.deleting, canary_phase=rec.canary_phase, canaries=canaries_of(rec, m),
                           steps=rec.steps if steps is None else steps, failure=rec.failure,
                           rolled_back=rec.rolled_back, rolling_back=rolling_back_of(rec, m))
