import os
import signal

import pytest

from deployfs.runtime import marked_processes


@pytest.fixture(scope="session", autouse=True)
def no_stray_processes(tmp_path_factory):
    """Every instance any test started must be gone when the suite ends."""
    root = str(tmp_path_factory.getbasetemp())
    yield
    strays = list(marked_processes(root))
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert strays == [], f"instance processes left behind: {strays}"
