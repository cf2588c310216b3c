import pytest

from tests import mount as _mount


@pytest.fixture
def mnt(tmp_path):
    m = _mount.start(str(tmp_path))
    yield m
    _mount.stop(m)
