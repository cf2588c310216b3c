import pytest

from tests import mount as _mount


@pytest.fixture
def mnt(tmp_path):
    with _mount.running(str(tmp_path)) as m:
        yield m
