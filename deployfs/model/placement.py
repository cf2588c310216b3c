"""Where a new instance goes (docs/cluster.md).  Pure: node loads in, a node (or why none) out.

A ready, uncordoned node -- among the manifest's ``nodes`` if it names any --
with the fewest instances of the service, then the fewest overall; a tie goes
to the first name, so the same loads always give the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

from .cluster import READY


@dataclass(frozen=True)
class Load:
    name: str
    state: str  # model.nodes.node_state
    of_service: int  # instances of the service being placed (leaving ones not counted)
    total: int  # instances of every service there


@dataclass(frozen=True)
class Choice:
    node: str | None  # None: no node can take it now
    reason: str = ""  # why not, in words, when node is None


def place(loads: Sequence[Load], allowed: Collection[str] = ()) -> Choice:
    """``allowed``: the manifest's ``nodes`` directive (empty: every node)."""
    fit = [n for n in loads if n.state == READY and (not allowed or n.name in allowed)]
    if fit:
        return Choice(min(fit, key=lambda n: (n.of_service, n.total, n.name)).name)
    return Choice(None, _why_none(loads, allowed))


def _why_none(loads: Sequence[Load], allowed: Collection[str]) -> str:
    known = {n.name: n for n in loads}
    candidates = [known[a] for a in sorted(allowed) if a in known] if allowed else sorted(loads, key=lambda n: n.name)
    unknown = sorted(a for a in allowed if a not in known)
    parts = [f"{n.name} {n.state}" for n in candidates] + [f"{a} unknown" for a in unknown]
    where = f"nodes {' '.join(sorted(allowed))}" if allowed else "the cluster"
    return f"no ready node in {where}" + (f" ({', '.join(parts)})" if parts else " (no node is known)")
