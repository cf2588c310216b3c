"""One real cluster (three etcd members, three `deployfs serve --cluster` nodes) shared by the
scenario tests of a module: starting it costs seconds, so tests that do not break it share it,
and a test that breaks a part (a node killed, etcd members stopped) brings it back itself."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.cluster.harness import Cluster, running_cluster


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory) -> Iterator[Cluster]:
    with running_cluster(str(tmp_path_factory.mktemp("cluster")), 3) as c:
        yield c


@pytest.fixture
def cluster(cluster3: Cluster) -> Iterator[Cluster]:
    """The module's cluster with every node running again after the test before."""
    cluster3.start()
    yield cluster3
