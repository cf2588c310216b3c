import os
import signal

import pytest

from deployfs.runtime import MARKER


def _our_strays(root: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                continue
            if f"{MARKER}={root}".encode() in env:
                found.append(int(entry))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_stray_processes(tmp_path_factory):
    """Every instance any test started must be gone when the suite ends."""
    root = str(tmp_path_factory.getbasetemp())
    yield
    strays = _our_strays(root)
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert strays == [], f"instance processes left behind: {strays}"
