"""scripts/train_hippocampus.sh end to end on 5 real Hippocampus cases, for a few iterations.

Checks the one-command pipeline's contract (plan → train → evaluate → report → checkpoint), not accuracy:
the last output line is ``checkpoint=PATH``, the plan it was trained with lies beside it, the report
files exist and hold per-class Dice/HD95, and ``medunet segment --bundle bundles/mri --checkpoint PATH``
segments a real MRI with it in the input's own grid. Skips when ../shared/data/hippocampus is absent.
"""

from __future__ import annotations

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
    env = dict(os.environ, PYTHON=sys.executable, MPLBACKEND="Agg")
    env["PYTHONPATH"] = str(repo_root) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("workers", ["1", "2"])
def test_pipeline_few_iterations_on_five_real_cases(hippocampus_dir, repo_root, tmp_path, workers):
    out = tmp_path / "run"
    cmd = ["bash", str(repo_root / "scripts" / "train_hippocampus.sh"), str(hippocampus_dir), str(out),
           "--cases", "5", "--max-iterations", "3", "--eval-interval", "0", "--no-tta", "--patch", "32", "48", "32",
           "--batch", "2", "--threads", "1", "--workers", workers]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(repo_root), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{workers} training process(es) x {2 // int(workers)} sample(s) per step" in proc.stdout
    assert not (out / "models" / "_trained.pt").exists()  # the workers' hand-off file is gone
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("checkpoint="), proc.stdout[-2000:]
    ckpt = Path(last.split("=", 1)[1])
    assert ckpt.is_file() and (ckpt.parent / "plan.json").is_file()

    plan = json.loads((ckpt.parent / "plan.json").read_text())
    assert plan["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    assert plan["normalization"]["scheme"] == "zscore" and plan["target_spacing"] == [1.0, 1.0, 1.0]
    assert plan["patch_size"] == [32, 48, 32] and plan["network"]["deep_supervision"] is True

    results = json.loads((out / "results.json").read_text())
    assert results["timing"]["n_train"] == 4 and results["timing"]["n_val"] == 1  # every 5th case held out
    assert results["timing"]["iterations"] == 3
    assert results["timing"]["cpu_s"] > 0  # the worker processes' CPU time is counted too
    for name in ("anterior", "posterior"):
        cls = results["final"][name]
        assert 0.0 <= cls["dice"] <= 1.0 and (math.isnan(cls["hd95"]) or cls["hd95"] >= 0)
    assert [h["iteration"] for h in results["history"]] == [3]
    table = (out / "results.md").read_text()
    assert "| anterior |" in table and "| posterior |" in table and "HD95" in table
    for name in ("curve.png", "history.csv", "report/metrics.csv", "report/summary.json", "log.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    overlays = list((out / "report" / "overlays").glob("*.png"))
    assert any(p.name.startswith("best_") for p in overlays) and any(p.name.startswith("worst_") for p in overlays)

    # the checkpoint is what `medunet segment --bundle bundles/mri` loads
    val_image = Path(json.loads((hippocampus_dir / "dataset.json").read_text())["training"][4]["image"])
    val_image = (hippocampus_dir / val_image).resolve()
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


@pytest.mark.parametrize("option, message", [
    (["--workers", "3"], "--workers 3: must be >= 1 and divide the batch size (2)"),
    (["--device", "tpu"], "--device: expected cpu, cuda[:i] or auto, got 'tpu'"),
])
def test_pipeline_refuses_bad_workers_or_device(hippocampus_dir, repo_root, tmp_path, option, message):
    cmd = ["bash", str(repo_root / "scripts" / "train_hippocampus.sh"), str(hippocampus_dir), str(tmp_path / "o"),
           "--cases", "5", "--max-iterations", "1", "--batch", "2", *option]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(repo_root), timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_pipeline_refuses_a_folder_without_dataset_json(repo_root, tmp_path):
    proc = subprocess.run(["bash", str(repo_root / "scripts" / "train_hippocampus.sh"), str(tmp_path), str(tmp_path / "o")],
                          capture_output=True, text=True, env=_env(repo_root), timeout=60)
    assert proc.returncode == 2
    assert str(tmp_path) in proc.stderr and "dataset.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
