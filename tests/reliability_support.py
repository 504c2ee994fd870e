"""Helpers shared by the reliability tests: running the CLI in-process or as a (restricted) subprocess,
and checking that an output folder holds nothing half-written.

Not a conftest: import it (``from reliability_support import ...``); pytest puts ``tests/`` on the path.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOBODY_UID = 65534

__all__ = [
    "CliResult", "run_cli", "run_subprocess", "medunet_argv", "temp_files", "assert_nothing_partial",
    "world_readable_tmpdir", "can_drop_privileges", "error_lines", "traceback_in",
]


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    logged_tracebacks: int = 0

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


class _ExcInfoCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.levelno >= logging.WARNING:
            self.count += 1


def run_cli(argv: list[str]) -> CliResult:
    """Run ``medunet <argv>`` in this process; capture stdout/stderr, the exit status, and how many
    log records carried a traceback (``exc_info``) — a user would see those without ``--debug``."""
    from medunet import cli

    out, err = io.StringIO(), io.StringIO()
    counter = _ExcInfoCounter()
    root = logging.getLogger()
    root.addHandler(counter)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        root.removeHandler(counter)
    return CliResult(int(code), out.getvalue(), err.getvalue(), counter.count)


def medunet_argv(*args: str) -> list[str]:
    """The real console entry point, run with this interpreter (``python -m medunet.cli`` equivalent)."""
    return [sys.executable, "-c", "import sys; from medunet.cli import main; sys.exit(main())", *args]


def _preexec(user: int | None, fsize: int | None):
    def fn() -> None:
        if fsize is not None:
            # Writes past the limit fail with EFBIG instead of killing the process with SIGXFSZ.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if user is not None:
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)
    return fn


def run_subprocess(argv: list[str], *, cwd: Path | None = None, env: dict | None = None, user: int | None = None,
                   fsize: int | None = None, timeout: float = 300) -> CliResult:
    """Run a command, optionally as another user (needs root) and with a file-size limit (a full disk)."""
    full_env = dict(os.environ)
    full_env.update({"PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    full_env.pop("MEDUNET_DEBUG", None)
    if env:
        full_env.update(env)
    proc = subprocess.run(argv, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_preexec(user, fsize))
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def can_drop_privileges() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def world_readable_tmpdir(prefix: str = "medunet-rel-") -> Path:
    """A temp folder ``nobody`` can enter (pytest's tmp_path is 0700 under root's name)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d


def temp_files(folder: Path) -> list[Path]:
    """Leftovers of interrupted atomic writes (``.<stem>.<random>.tmp<ext>``) or other temp names."""
    found = []
    for p in Path(folder).rglob("*"):
        n = p.name
        if ".tmp" in n or n.endswith((".part", ".partial", "~")) or n.startswith("tmp"):
            found.append(p)
    return found


def assert_nothing_partial(folder: Path, must_not_exist: list[Path] = (), expected: list[Path] = ()) -> None:
    """No temp leftovers; no file under a failed case's final name; every expected output readable."""
    import nibabel as nib

    leftovers = temp_files(folder) if Path(folder).exists() else []
    assert not leftovers, f"temporary files left behind: {leftovers}"
    for p in must_not_exist:
        assert not Path(p).exists(), f"{p} exists although its case failed"
    for p in expected:
        assert Path(p).exists(), f"expected output {p} is missing"
        if str(p).endswith((".nii", ".nii.gz")):
            img = nib.load(str(p))
            img.get_fdata()  # raises on a half-written file


def traceback_in(text: str) -> bool:
    return "Traceback (most recent call last)" in text


def error_lines(text: str) -> list[str]:
    """Lines that report an error (what a user greps for)."""
    return [ln for ln in text.splitlines() if "error" in ln.lower() or "fail" in ln.lower()]
