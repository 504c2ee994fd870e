"""The one exception type for bad input: it names the file and what is wrong, on one line."""

from __future__ import annotations

import os

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input file or folder. ``str(err)`` is ``"<path>: <reason>"`` on one line."""

    def __init__(self, path: str | os.PathLike | None, reason: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)
