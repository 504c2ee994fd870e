"""scripts/train_hippocampus.sh end to end on 5 real Hippocampus cases, for a few seconds of budget.

Checks the one-command pipeline's contract (the mri bundle trains with a wall-clock budget → `medunet
evaluate` scores the final weights → report → checkpoint), not accuracy: the last output line is
``checkpoint=PATH``, the plan it was trained with lies beside it, the evaluation holds per-class
Dice/HD95, and ``medunet segment --bundle bundles/mri --checkpoint PATH`` segments a real MRI with it in
the input's own grid. With ``WORKERS=2`` the same runs data-parallel under torchrun. Skips when
../shared/data/hippocampus is absent.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.realdata


def _env(repo_root: Path) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(repo_root) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def five_case_dataset(source: Path, target: Path) -> Path:
    """An MSD folder of the first 5 cases of ``source``: links to its files (never copies), its labels."""
    meta = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    cases = meta["training"][:5]
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True)
    for case in cases:
        for key in ("image", "label"):
            rel = Path(case[key])
            (target / rel).symlink_to((source / rel).resolve())
    meta.update(training=cases, test=[], numTraining=5, numTest=0)
    (target / "dataset.json").write_text(json.dumps(meta))
    return target


@pytest.mark.parametrize("workers", ["1", "2"])
def test_pipeline_few_seconds_on_five_real_cases(hippocampus_dir, repo_root, tmp_path, workers):
    data = five_case_dataset(hippocampus_dir, tmp_path / "data")
    out = tmp_path / "run"
    cmd = ["bash", str(repo_root / "scripts" / "train_hippocampus.sh"), str(data), str(out),
           "--epoch_length", "2", "--num_workers", "0", "--mlflow", "False", "--progress_bar", "False"]
    env = dict(_env(repo_root), TIME_BUDGET="6", WORKERS=workers)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("checkpoint="), output[-2000:]
    ckpt = Path(last.split("=", 1)[1])
    assert ckpt.is_file() and (ckpt.parent / "plan.json").is_file()

    plan = json.loads((ckpt.parent / "plan.json").read_text(encoding="utf-8"))
    assert plan["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    assert plan["normalization"]["scheme"] == "zscore" and plan["target_spacing"] == [1.0, 1.0, 1.0]
    assert plan["network"]["deep_supervision"] is True and plan["network"]["res_block"] is True
    assert plan["mirror_axes"] == [0]
    if workers == "2":
        ranks = sorted(line.split()[3] for line in output.splitlines() if line.startswith("medunet ddp: rank"))
        assert ranks == ["0/2", "1/2"], output[-3000:]

    # the budget ended training: a few epochs of 2 steps, the clock near 6 s, the last epoch validated
    history = list(csv.DictReader(open(out / "eval" / "history.csv")))
    assert history and float(history[-1]["elapsed_s"]) >= 6.0
    assert history[-1]["val_mean_dice"] != ""
    assert (out / "eval" / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # medunet evaluate: the 1 held-out case (every 5th) scored with Dice and HD95 per class
    evaluation = out / "eval" / "evaluation"
    summary = json.loads((evaluation / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_cases"] == 1
    rows = list(csv.DictReader(open(evaluation / "metrics.csv")))
    held_out = Path(json.loads((data / "dataset.json").read_text(encoding="utf-8"))["training"][4]["image"]).name.split(".")[0]
    assert len(rows) == 1 and held_out in json.dumps(rows[0])
    for name in ("anterior", "posterior"):
        dice, hd95 = float(rows[0][f"dice_{name}"]), float(rows[0][f"hd95_{name}"])
        assert 0.0 <= dice <= 1.0 and (math.isnan(hd95) or hd95 >= 0)
    table = (evaluation / "results.md").read_text(encoding="utf-8")
    assert "| anterior |" in table and "| posterior |" in table and "HD95" in table

    # the checkpoint is what `medunet segment --bundle bundles/mri` loads
    val_image = (data / json.loads((data / "dataset.json").read_text(encoding="utf-8"))["training"][4]["image"]).resolve()
    seg_out = tmp_path / "seg"
    medunet = [sys.executable, "-c", "import sys; from medunet.cli import main; sys.exit(main())"]
    proc = subprocess.run(medunet + ["segment", "--bundle", str(repo_root / "bundles" / "mri"), "--checkpoint",
                                     str(ckpt), "-i", str(val_image), "-o", str(seg_out), "--no-progress"],
                          capture_output=True, text=True, env=_env(repo_root), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seg = nib.load(seg_out / (val_image.name.replace(".nii.gz", "") + "_seg.nii.gz"))
    ref = nib.load(val_image)
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2}


def test_pipeline_refuses_bad_workers(hippocampus_dir, repo_root, tmp_path):
    proc = subprocess.run(["bash", str(repo_root / "scripts" / "train_hippocampus.sh"), str(hippocampus_dir),
                           str(tmp_path / "o")], capture_output=True, text=True,
                          env=dict(_env(repo_root), WORKERS="two"), timeout=60)
    assert proc.returncode == 2
    assert "WORKERS=two" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_pipeline_refuses_a_folder_without_dataset_json(repo_root, tmp_path):
    proc = subprocess.run(["bash", str(repo_root / "scripts" / "train_hippocampus.sh"), str(tmp_path), str(tmp_path / "o")],
                          capture_output=True, text=True, env=_env(repo_root), timeout=60)
    assert proc.returncode == 2
    assert str(tmp_path) in proc.stderr and "dataset.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
