"""`deployfs serve` with a deliberate bug in one file's renderer (for the EIO test)."""

from deployfs.view import namespace
from deployfs.cli.serve import main


def broken(ns, s):
    raise RuntimeError("injected bug")


namespace.SERVICE_FILES["health"] = broken
main()
