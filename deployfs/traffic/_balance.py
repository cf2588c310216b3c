"""Smooth weighted round-robin: shared by per-connection (tcp) and per-request (http) balancing."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def smooth_weighted(backends: list[T], weights: dict[T, int], credit: dict[T, int]) -> T:
    """Smooth weighted round-robin (nginx's): each pick adds every backend's weight to its credit
    and takes the one with the most, which pays the total back.  Over any run of sum(weights)
    picks each backend is chosen exactly its weight's times, spread out, not in bursts."""
    total = sum(weights.values())
    for x in backends:
        credit[x] = credit.get(x, 0) + weights[x]
    first = max(backends, key=lambda x: (credit[x], -backends.index(x)))
    credit[first] -= total
    return first
