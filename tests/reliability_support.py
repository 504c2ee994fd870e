"""Helpers shared by the reliability tests: running the CLI in-process or as a (restricted) subprocess,
and checking that an output folder holds nothing half-written.

Not a conftest: import it (``from reliability_support import ...``); pytest puts ``tests/`` on the path.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bundle_helpers import TINY_PLAN
from hostile import is_root

REPO = Path(__file__).resolve().parents[1]

__all__ = [
    "CliResult", "run_cli", "run_subprocess", "medunet_argv", "temp_files", "assert_nothing_partial",
    "is_root", "permissions_enforceable", "error_lines", "traceback_in",
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


_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2


def _drop_dac_capabilities() -> None:
    """Make root obey permission bits in this process's children (drop two capabilities on exec)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _preexec(enforce_permissions: bool, fsize: int | None):
    def fn() -> None:
        if fsize is not None:
            # Writes past the limit fail with EFBIG instead of killing the process with SIGXFSZ.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if enforce_permissions and is_root():
            _drop_dac_capabilities()
    return fn


def permissions_enforceable() -> bool:
    """Whether a child process will obey permission bits (non-root, or root able to drop capabilities)."""
    if not is_root():
        return True
    r = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_preexec(True, None), capture_output=True)
    return r.returncode == 0


def run_subprocess(argv: list[str], *, cwd: Path | None = None, env: dict | None = None,
                   enforce_permissions: bool = False, fsize: int | None = None, timeout: float = 300) -> CliResult:
    """Run a command; ``enforce_permissions`` makes even root obey mode bits (chmod 000 / 0555 bite);
    ``fsize`` limits the size of any file it writes (a full disk, without needing root)."""
    full_env = dict(os.environ)
    full_env.update({"PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    full_env.pop("MEDUNET_DEBUG", None)
    if env:
        full_env.update(env)
    proc = subprocess.run(argv, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout,
                          preexec_fn=_preexec(enforce_permissions, fsize))
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


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


# --------------------------------------------------------------------------------------------------
# bundle training with tiny overrides
BUNDLE_CT = REPO / "bundles" / "ct" / "configs"
TINY_PLAN_JSON = json.dumps(TINY_PLAN["ct"])  # the engine tests' tiny CT plan overrides
_PHANTOMS: dict[int, Path] = {}


def train_command(data: Path, out: Path, epochs: int = 2, config: Path | None = None) -> list[str]:
    """The documented training command (``python -m monai.bundle run training``) with tiny overrides:
    4 phantom cases (3 train / 1 val), a 3-level 4-8-16 DynUNet on 16³ patches, no MLflow."""
    config = config or BUNDLE_CT / "train.json"
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(config),
            "--meta_file", str(BUNDLE_CT / "metadata.json"), "--logging_file", str(BUNDLE_CT / "logging.conf"),
            "--dataset_dir", str(data), "--output_dir", str(out / "eval"), "--ckpt_dir", str(out / "models"),
            "--plan_overrides", TINY_PLAN_JSON, "--max_epochs", str(epochs), "--val_interval", "1",
            "--num_workers", "0", "--progress_bar", "False", "--mlflow", "False", "--n_folds", "4",
            "--phantom_cases", "4"]


def medunet_train_argv(bundle: Path, data: Path, out: Path, epochs: int = 1) -> list[str]:
    """``medunet train BUNDLE`` (the medunet entry point for bundle training) with the same tiny overrides."""
    sets = {"num_workers": "0", "mlflow": "false", "progress_bar": "false", "plan_overrides": TINY_PLAN_JSON,
            "n_folds": "4", "phantom_cases": "4", "val_interval": "1"}
    argv = ["train", str(bundle), "--dataset-dir", str(data), "--output-dir", str(out / "eval"),
            "--ckpt-dir", str(out / "models"), "--max-epochs", str(epochs)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    return medunet_argv(*argv)


def train_env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    env.pop("MEDUNET_DEBUG", None)
    return env


def shared_ct_phantoms() -> Path:
    """4 small CT phantom cases (MSD layout), generated once per test process and removed at exit."""
    import atexit
    import shutil
    import tempfile

    from medunet.data.phantoms import generate_dataset

    if os.getpid() not in _PHANTOMS:
        base = Path(tempfile.mkdtemp(prefix="medunet-ct-"))
        atexit.register(shutil.rmtree, base, True)
        _PHANTOMS[os.getpid()] = generate_dataset("ct", base / "data", cases=4, size="small", seed=0)
    return _PHANTOMS[os.getpid()]


def make_tiny_checkpoint(folder: Path) -> Path:
    """``folder/model.pt``: a tiny 3D UNet (random weights) carrying its plan (CT normalisation, 2 mm
    grid, classes 0/1/2), and ``folder/plan.json`` beside it."""
    import torch

    from medunet import networks
    from medunet.data import Plan
    from medunet.io import save_checkpoint

    plan = Plan(labels={"background": 0, "organ": 1, "core": 2}, spatial_dims=3, modality="CT",
                target_spacing=[2.0, 2.0, 2.0], patch_size=[16, 16, 16], batch_size=1,
                normalization={"scheme": "ct", "clip": [-200.0, 300.0], "mean": 50.0, "std": 100.0},
                network={"name": "unet", **networks.get_spec("unet").tiny_options})
    torch.manual_seed(0)
    net = plan.build_network()
    Path(folder).mkdir(parents=True, exist_ok=True)
    plan.save(Path(folder) / "plan.json")
    return save_checkpoint({"model": net.state_dict(), "plan": plan.to_dict()}, Path(folder) / "model.pt")


def segment_argv(inputs, out, ckpt, *extra) -> list[str]:
    """``medunet segment`` arguments (without the program name) for a checkpoint on the CPU."""
    return ["segment", "-i", *map(str, inputs), "-o", str(out), "--checkpoint", str(ckpt), "--device", "cpu",
            "--no-progress", *extra]
