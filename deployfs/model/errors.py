"""Why a command was refused: an errno for the front end and words for the reply."""

from __future__ import annotations


class CommandError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno, self.message = err, message
