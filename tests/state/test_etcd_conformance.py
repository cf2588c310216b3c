"""The store contract (tests/state/conformance.py) on a real etcd member."""

import pytest

from deployfs.state.etcdkv import open_etcd
from tests.etcd import Cluster, etcd1  # noqa: F401  (fixture)
from tests.state.conformance import *  # noqa: F401,F403

_n = 0


@pytest.fixture
async def store(etcd1: Cluster):  # noqa: F811
    """An empty store: a namespace of its own on the module's member (revisions go on across tests)."""
    global _n
    _n += 1
    async with open_etcd(etcd1.urls, namespace=f"/conformance-{_n}/") as s:
        yield s


@pytest.fixture
def lease_ttl():
    return 1.0  # etcd's minimum with the tests' short raft timings (2 s with the defaults)
