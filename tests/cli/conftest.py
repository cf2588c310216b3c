from tests.serve.conftest import mnt  # noqa: F401  (the same real-mount fixture)
