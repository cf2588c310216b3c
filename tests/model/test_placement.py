"""Placement, as a table and as a property: a ready, uncordoned node (among `nodes`) with the
fewest instances of the service, then the fewest overall (docs/cluster.md)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployfs.model.cluster import CORDONED, DOWN, DRAINING, READY, node_state
from deployfs.model.placement import Load, place


def L(name, state=READY, mine=0, total=0):
    return Load(name, state, mine, total)


CHOSEN = [
    # (loads, the `nodes` directive, the node chosen)
    ([L("n1")], (), "n1"),
    ([L("n1", mine=1, total=1), L("n2")], (), "n2"),
    ([L("n1", mine=1, total=1), L("n2", mine=1, total=5)], (), "n1"),  # tie on the service: fewest overall
    ([L("n1", mine=0, total=9), L("n2", mine=1, total=1)], (), "n1"),  # the service's spread comes first
    ([L("n2"), L("n1")], (), "n1"),  # a full tie: the first name, whatever the order given
    ([L("n1", CORDONED), L("n2", mine=3, total=3)], (), "n2"),
    ([L("n1", DRAINING), L("n2", DOWN), L("n3", mine=7, total=7)], (), "n3"),
    ([L("n1"), L("n2", mine=2, total=2)], ("n2",), "n2"),  # nodes restricts, even to a fuller node
    ([L("n1"), L("n2"), L("n3")], ("n3", "n9"), "n3"),
]

NONE = [
    ([], (), "no ready node in the cluster (no node is known)"),
    ([L("n1", CORDONED)], (), "no ready node in the cluster (n1 cordoned)"),
    ([L("b", DOWN), L("a", DRAINING)], (), "no ready node in the cluster (a draining, b down)"),
    ([L("n1")], ("n2",), "no ready node in nodes n2 (n2 unknown)"),
    ([L("n1"), L("n2", CORDONED)], ("n2", "n3"), "no ready node in nodes n2 n3 (n2 cordoned, n3 unknown)"),
]


@pytest.mark.parametrize("loads, allowed, chosen", CHOSEN)
def test_chosen(loads, allowed, chosen):
    assert place(loads, allowed).node == chosen


@pytest.mark.parametrize("loads, allowed, reason", NONE)
def test_nowhere_says_why(loads, allowed, reason):
    c = place(loads, allowed)
    assert c.node is None and c.reason == reason


@pytest.mark.parametrize("alive, cordoned, draining, instances, state", [
    (True, False, False, 0, READY), (True, True, False, 3, CORDONED), (True, True, True, 3, DRAINING),
    (True, True, True, 0, CORDONED),  # a drain with nothing left to move is done: cordoned
    (False, False, False, 0, DOWN), (False, True, True, 2, DOWN),
])
def test_node_state(alive, cordoned, draining, instances, state):
    assert node_state(alive=alive, cordoned=cordoned, draining=draining, instances=instances) == state


names = st.sampled_from(["a", "b", "c", "d", "e"])
loads = st.lists(st.builds(Load, names, st.sampled_from([READY, CORDONED, DRAINING, DOWN]),
                           st.integers(0, 5), st.integers(0, 20)), unique_by=lambda l: l.name)


@given(loads, st.frozensets(names))
def test_placement_property(loads, allowed):
    c = place(loads, allowed)
    fit = [l for l in loads if l.state == READY and (not allowed or l.name in allowed)]
    if not fit:
        assert c.node is None and c.reason
        return
    got = next(l for l in loads if l.name == c.node)
    assert got in fit  # only a ready node the directive allows
    # none fitting has fewer of the service, nor as few of it and fewer overall
    assert all((got.of_service, got.total) <= (l.of_service, l.total) for l in fit)
    assert place(list(reversed(loads)), allowed) == c  # the order given changes nothing


@given(st.integers(1, 6), st.integers(0, 40))
def test_placing_one_by_one_spreads_evenly(nodes, instances):
    """Placing a service's instances one at a time on empty ready nodes: counts never differ by more than one."""
    count = {f"n{k}": 0 for k in range(nodes)}
    for _ in range(instances):
        c = place([L(n, mine=v, total=v) for n, v in count.items()])
        count[c.node] += 1
    assert max(count.values()) - min(count.values()) <= 1
