"""Write-to-temp-then-rename, so no file ever exists half-written under its final name."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]

_UMASK = os.umask(0o022)  # read the process umask once (setting it is the only way to read it)
os.umask(_UMASK)


def _split_suffix(name: str) -> tuple[str, str]:
    for ext in (".nii.gz", ".tar.gz"):
        if name.endswith(ext):
            return name[: -len(ext)], ext
    stem, ext = os.path.splitext(name)
    return stem, ext


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_orphans(folder: Path, stem: str, ext: str) -> None:
    """Delete temp files for the same final name left by a writer that was killed (its PID is gone).

    Temp names carry the writer's PID (``.<stem>.<pid>.<random>.tmp<ext>``), so a live concurrent
    writer's file is never touched.
    """
    pattern = re.compile(rf"^\.{re.escape(stem)}\.(\d+)\.[A-Za-z0-9_]{{8}}{re.escape('.tmp' + ext)}$")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                (folder / name).unlink()


def _fit_temp_stem(stem: str, ext: str, name_max: int = 255) -> str:
    """``stem`` shortened so that the temporary name (``.<stem>.<pid>.<8 chars>.tmp<ext>``) fits the
    file system's name limit even when the final name only just does."""
    room = name_max - len(os.fsencode(f"..{os.getpid()}.12345678.tmp{ext}"))
    raw = os.fsencode(stem)
    if len(raw) <= room:
        return stem
    return raw[: max(room, 1)].decode("utf-8", "ignore") or "x"  # a cut multi-byte character is dropped


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    The temporary name keeps the extension (``.nii.gz`` stays last) so writers that dispatch on it
    work, and starts with ``.`` so globbing ``*.nii.gz`` never picks it up. On any error the temporary
    file is removed and ``path`` is untouched; temp files of a writer killed before it could clean up
    (SIGKILL, power loss) are removed by the next write of the same path.
    """
    final = Path(path)
    if not overwrite and final.exists():
        raise FileExistsError(f"{final}: exists (use --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    stem, ext = _split_suffix(final.name)
    stem = _fit_temp_stem(stem, ext)
    _remove_orphans(final.parent, stem, ext)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.{os.getpid()}.", suffix=f".tmp{ext}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes 0600 files; give the result the mode a plain open() would (or the replaced file's)
        os.chmod(tmp, stat.S_IMODE(final.stat().st_mode) if final.exists() else 0o666 & ~_UMASK)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
