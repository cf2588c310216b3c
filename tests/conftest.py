import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

from deployfs.node.runtime import marked_processes

# A suite started as a background job of a non-interactive shell (`make test &`, a CI runner)
# inherits SIGINT ignored, and an ignored signal stays ignored across exec: every `cat wait`
# the tests then Ctrl-C would shrug it off. Tests that send SIGINT mean the default action.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# `make test` (and CI) runs the same examples every time, so a case found by chance never
# blocks a landing; `make fuzz` explores at random, with many more examples, and saves what
# fails in .hypothesis/ so the next fuzz run replays it (pin it with @example).
settings.register_profile("ci", max_examples=60, derandomize=True, database=None)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "2000")), derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


@pytest.fixture
def public_tmp():
    """A directory another user can reach (pytest's tmp_path is root-only)."""
    d = tempfile.mkdtemp(prefix="deployfs-test-", dir="/tmp")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d)


def as_nobody(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command as another, unprivileged user."""
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv],
                          check=check, capture_output=True, text=True)
