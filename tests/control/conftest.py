import pytest
import trio

from tests.control.harness import Harness


@pytest.fixture
async def h(tmp_path):
    """An engine on a fake runtime, running for the length of the test (use with autojump_clock)."""
    h = Harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.node.run)
        yield h
        n.cancel_scope.cancel()
