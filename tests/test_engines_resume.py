"""Resume after a hard kill: a training run SIGKILLed after its first epoch and started again ends with the
same weights, optimizer state and history as a run that went straight through — with the bundles'
default ``num_workers=2`` DataLoader workers drawing the patches. The user's command, as a subprocess."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bundle_helpers import REPO_ROOT, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mri_data(tmp_path_factory) -> Path:
    from medunet.data.phantoms import generate_dataset

    return generate_dataset("mri", tmp_path_factory.mktemp("mri") / "data", cases=5, size="small", seed=0)


def _command(data: Path, out: Path) -> list[str]:
    values = tiny_overrides("mri", data, out, max_epochs=4, epoch_length=12, num_workers=2, n_folds=5)
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundles/mri/train.json"]
    for key, value in values.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return args


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _latest(out: Path) -> dict:
    return torch.load(out / "eval" / "checkpoint_latest.pt", weights_only=True)


def _history(out: Path) -> list[dict]:
    with open(out / "eval" / "history.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(fh)]


def test_sigkill_after_an_epoch_then_resume_is_bit_identical(mri_data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_command(mri_data, straight), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    proc = subprocess.Popen(_command(mri_data, killed), cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "eval" / "checkpoint_latest.pt"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.exists() and _latest(killed)["trainer"]["epoch"] >= 1:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its DataLoader workers, no clean-up
    finally:
        proc.wait(timeout=30)
    interrupted_at = _latest(killed)["trainer"]["epoch"]
    assert 1 <= interrupted_at < 4, "the kill must land before the run finished"

    again = subprocess.run(_command(mri_data, killed), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                           timeout=400)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"resumed from {latest} at epoch {interrupted_at}" in again.stdout + again.stderr

    a, b = _latest(straight), _latest(killed)
    assert a["trainer"] == b["trainer"] and a["trainer"]["epoch"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)
    assert a["best"] == b["best"]
    assert _history(straight) == _history(killed)  # same losses, learning rates and Dice, epoch by epoch
    final_a = torch.load(straight / "models" / "model.pt", weights_only=True)
    final_b = torch.load(killed / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert not list(killed.rglob(".*.tmp*")), "a temporary file of the killed run was left behind"
