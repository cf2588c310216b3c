"""The store contract (tests/state/conformance.py) on SQLite."""

import pytest

from deployfs.state.sqlitekv import open_sqlite
from tests.state.conformance import *  # noqa: F401,F403


@pytest.fixture
async def store(tmp_path):
    async with open_sqlite(str(tmp_path / "kv.db")) as s:
        yield s


@pytest.fixture
def lease_ttl():
    return 0.3
