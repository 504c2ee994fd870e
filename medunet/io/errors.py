"""The one exception type for bad input: it names the file and what is wrong, on one line; and
operating-system errors put in words (no ``[Errno N]``)."""

from __future__ import annotations

import errno
import os

__all__ = ["InputError", "os_error_words", "printable"]


def printable(text: str) -> str:
    """``text`` with control characters (a newline or tab in a file name...) written as escapes, so a
    message naming any file stays on one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


class InputError(ValueError):
    """Bad input file or folder. ``str(err)`` is ``"<path>: <reason>"`` on one line."""

    def __init__(self, path: str | os.PathLike | None, reason: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        super().__init__(f"{printable(self.path)}: {self.reason}" if self.path else self.reason)


_WORDS = {
    errno.EEXIST: "already exists",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied (operation not permitted)",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "file too large (over the file system's or the process's size limit)",
    errno.ENAMETOOLONG: "file name too long for the file system",
    errno.ELOOP: "symbolic link loop",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error (failing disk or network share)",
}
if hasattr(errno, "EDQUOT"):
    _WORDS[errno.EDQUOT] = "disk quota exceeded"


def os_error_words(error: OSError) -> str:
    """What went wrong, in words: ``"permission denied"``, ``"no space left on the device"``...

    The text never carries Python's ``[Errno N]`` prefix or the temporary file names an atomic write
    used; the caller names the file.
    """
    words = _WORDS.get(error.errno) if error.errno is not None else None
    if words is None:
        words = (error.strerror or " ".join(str(error).split()) or type(error).__name__).strip()
        words = words[:1].lower() + words[1:]
    return words
