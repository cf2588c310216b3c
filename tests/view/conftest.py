import pytest
import trio

from deployfs.control.facade import EngineFacade
from deployfs.view.access import Access
from deployfs.view.namespace import Namespace
from tests import mount as _mount
from tests.control.harness import Harness


@pytest.fixture
async def h(tmp_path):
    """An engine on a fake runtime, running for the length of the test (use with autojump_clock)."""
    h = Harness(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(h.engine.run)
        yield h
        n.cancel_scope.cancel()


@pytest.fixture
def ns(h):
    """The view over that engine, served by uid 1000: no front end, no FUSE."""
    return Namespace(EngineFacade(h.engine), Access(uid=1000, gid=1000))


@pytest.fixture
def mnt(tmp_path):
    """A real `deployfs serve` mounted on FUSE: the view as a shell sees it (run under the test lock)."""
    with _mount.running(str(tmp_path)) as m:
        yield m
