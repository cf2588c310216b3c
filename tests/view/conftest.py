import pytest

from deployfs.serve.local import local_source
from deployfs.view.access import Access
from deployfs.view.namespace import Namespace
from tests import mount as _mount
from tests.control.conftest import h  # noqa: F401  (the engine on a fake runtime, one definition)


@pytest.fixture
async def ns(h, nursery):
    """The view over that engine's records, served by uid 1000: no front end, no FUSE."""
    source, cache = local_source(h.node)
    await nursery.start(cache.run)
    return Namespace(source, Access(uid=1000, gid=1000))


@pytest.fixture
def mnt(tmp_path):
    """A real `deployfs serve` mounted on FUSE: the view as a shell sees it (run under the test lock)."""
    with _mount.running(str(tmp_path)) as m:
        yield m
