"""Can an output be written? Checked before the work that produces it, so that a path that cannot take
the result costs a line in words, not a computed-then-lost prediction and a raw ``[Errno 17]``.

The checks mirror what :func:`medunet.io.atomic.atomic_path` will do: create the folder, make a
temporary file beside the final name, rename it over the final name.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from medunet.io.errors import os_error_words

__all__ = ["output_folder_problem", "output_file_problem", "name_max"]

_DEFAULT_NAME_MAX = 255


def name_max(folder: str | os.PathLike) -> int:
    """Longest file name (bytes) the file system of ``folder`` (or of its nearest existing parent) takes."""
    here = Path(folder)
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return int(os.pathconf(here, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return _DEFAULT_NAME_MAX


def output_folder_problem(folder: str | os.PathLike) -> str | None:
    """Why no file can be written into ``folder``, in words, or None when it can.

    Creates the folder (and its parents) when missing, as the writer would, and proves it writable by
    creating and removing an empty temporary file (permission bits, read-only mounts, ACLs and
    capabilities all answer the same way they will for the real write).
    """
    try:
        return _folder_problem(Path(folder))
    except OSError as e:  # e.g. a parent without search permission
        return f"cannot be checked: {os_error_words(e)}"


def _folder_problem(folder: Path) -> str | None:
    if folder.is_symlink() and not folder.exists():
        return f"is a broken symbolic link (to {os.readlink(folder)})"
    if folder.exists() and not folder.is_dir():
        return "exists and is a file, not a folder"
    blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None and not folder.exists():
        return f"cannot be created: {blocker} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot be created: {os_error_words(e)}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".medunet-write-check.", dir=folder)
    except OSError as e:
        return f"is not writable: {os_error_words(e)}"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def output_file_problem(path: str | os.PathLike) -> str | None:
    """Why the file ``path`` (an output's final name; its folder is :func:`output_folder_problem`'s)
    cannot be (re)placed, in words, or None when it can."""
    path = Path(path)
    limit = name_max(path.parent)
    size = len(os.fsencode(path.name))
    if size > limit:
        return f"file name is {size} bytes long, over the file system's limit of {limit} (shorten the input's name)"
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        return os_error_words(e)
    if st is not None and stat.S_ISDIR(st.st_mode):
        return "exists and is a folder; a file must go there (remove or rename the folder)"
    if st is not None and not stat.S_ISREG(st.st_mode):
        return "exists and is not a regular file (a device, FIFO or socket); refusing to replace it"
    return None
