"""The one evaluator (:func:`medunet.metrics.evaluate_files`): scores in the label file's grid, bad cases
cost one line, report files; predictions equal ``medunet segment``'s; and ``evaluate.json`` (through
``python -m monai.bundle run evaluating`` and ``medunet evaluate``) runs it with the MLflow evaluation
run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from test_inference_paths import random_checkpoint, tiny_plan

from medunet.data import Plan
from medunet.io import read_image
from medunet.metrics import case_metrics, evaluate_files

REPO = Path(__file__).resolve().parents[1]
NAMES = {0: "background", 1: "liver", 2: "kidney"}


class ShiftedOracle:
    """Predicts the reference label rolled by ``shift`` voxels along x (0: perfect)."""

    def __init__(self, labels: dict[str, Path], shift: int = 0):
        self.labels, self.shift = labels, shift
        self.plan = SimpleNamespace(label_names=NAMES)

    def predict_image(self, image, probabilities=True):
        ref = np.asarray(nib.load(self.labels[Path(image.path).name]).dataobj).astype(np.uint8)
        return SimpleNamespace(label=np.roll(ref, self.shift, axis=0), image=image)


def _cases(folder: Path, n: int = 3) -> tuple[list[dict], dict[str, Path]]:
    items, labels = [], {}
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    for i in range(n):
        img = np.random.default_rng(i).normal(0, 1, (24, 20, 10)).astype(np.float32)
        lab = np.zeros(img.shape, np.uint8)
        lab[4 + i:12 + i, 5:13, 2:7] = 1
        lab[15:20, 10:16, 3:8] = 2
        image_path, label_path = folder / f"case_{i}.nii.gz", folder / f"case_{i}_label.nii.gz"
        nib.save(nib.Nifti1Image(img, affine), str(image_path))
        nib.save(nib.Nifti1Image(lab, affine), str(label_path))
        items.append({"image": str(image_path), "label": str(label_path)})
        labels[image_path.name] = label_path
    return items, labels


def test_perfect_and_shifted_predictions_and_the_report(tmp_path):
    items, labels = _cases(tmp_path)
    perfect = evaluate_files(ShiftedOracle(labels), items, tmp_path / "report")
    assert [r["case"] for r in perfect.rows] == ["case_0", "case_1", "case_2"] and not perfect.failures
    for row in perfect.rows:
        assert row["mean_dice"] == 1.0 and row["dice_liver"] == 1.0 and row["hd95_kidney"] == 0.0
        assert row["metrics"][1]["dice"] == 1.0 and set(row["metrics"]) == {1, 2}
    assert perfect.summary["mean_dice"] == 1.0 and perfect.metrics["eval_dice_kidney"] == 1.0

    shifted = evaluate_files(ShiftedOracle(labels, shift=2), items, tmp_path / "report", metrics=("dice", "hd95"))
    ref = nib.load(labels["case_0.nii.gz"]).get_fdata().astype(np.int64)
    expected = case_metrics(np.roll(ref, 2, axis=0), ref, 3, spacing=(0.8, 0.8, 2.0), metrics=("dice", "hd95"))
    assert shifted.rows[0]["metrics"] == expected  # in the label file's grid, at its spacing (mm)
    assert shifted.rows[0]["hd95_liver"] == pytest.approx(1.6)
    rows = list(csv.DictReader(open(tmp_path / "report" / "metrics.csv")))
    assert len(rows) == 3 and float(rows[0]["dice_liver"]) == pytest.approx(expected[1]["dice"], abs=1e-5)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_cases"] == 3 and summary["failed"] == []
    overlays = sorted(p.name for p in (tmp_path / "report" / "overlays").iterdir())
    assert len(overlays) == 4 and all(n.startswith(("best_", "worst_")) for n in overlays)


def test_a_bad_case_costs_one_line_and_the_others_are_scored(tmp_path):
    items, labels = _cases(tmp_path)
    items[1] = {"image": items[1]["image"], "label": str(tmp_path / "missing_label.nii.gz")}
    small = tmp_path / "small_label.nii.gz"  # a label on another grid
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(small))
    items[2] = {"image": items[2]["image"], "label": str(small)}
    lines: list[str] = []
    result = evaluate_files(ShiftedOracle(labels), items, tmp_path / "report", log=lines.append)
    assert [r["case"] for r in result.rows] == ["case_0"]
    assert len(lines) == 2 and "missing_label.nii.gz" in lines[0] and "small_label.nii.gz" in lines[1]
    assert all("\n" not in line for line in lines)
    assert json.loads((tmp_path / "report" / "summary.json").read_text(encoding="utf-8"))["failed"] == result.failures


def test_evaluation_predicts_exactly_as_medunet_segment(tmp_path):
    from medunet.data.phantoms import generate_dataset
    from medunet.inference import Predictor, segment_inputs

    data = generate_dataset("ct", tmp_path / "data", cases=2, size="small", test_cases=0)
    items = [{"image": str(p), "label": str(data / "labelsTr" / p.name)} for p in sorted((data / "imagesTr").iterdir())]
    ckpt = random_checkpoint(tmp_path / "models", tiny_plan("ct"))
    predictor = Predictor.from_bundle(REPO / "bundles" / "ct", ckpt, device="cpu")
    result = evaluate_files(predictor, items)
    segment_inputs(predictor, [i["image"] for i in items], tmp_path / "seg")
    for item, row in zip(items, result.rows):
        seg = np.asarray(nib.load(tmp_path / "seg" / f"{row['case']}_seg.nii.gz").dataobj)
        label = read_image(item["label"])
        direct = case_metrics(seg, np.rint(label.array).astype(np.int64), 4, spacing=label.spacing, tolerance_mm=1.0)
        assert row["metrics"] == direct


def _mlflow_eval_run(output_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + str(output_dir / "mlflow.db"))
    exp = client.get_experiment_by_name("medunet-ct")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "evaluate-fold0"]
    assert len(runs) == 1
    return client, runs[0]


def _bundle_overrides(tmp_path: Path, bundle: str) -> dict:
    return {"dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "eval"),
            "ckpt_dir": str(tmp_path / "models"), "phantom_cases": 4, "n_folds": 4, "num_workers": 0}


def test_bundle_evaluating_command_writes_the_report_and_the_mlflow_run(tmp_path):
    plan = tiny_plan("ct")
    random_checkpoint(tmp_path / "models", plan)
    overrides = _bundle_overrides(tmp_path, "ct")
    args = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
            "['bundles/ct/train.json','bundles/ct/evaluate.json']", "--mlflow", "True"]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = tmp_path / "eval" / "evaluation"
    summary = json.loads((report / "summary.json").read_text(encoding="utf-8"))
    rows = list(csv.DictReader(open(report / "metrics.csv")))
    assert summary["n_cases"] == len(rows) == 1 and summary["failed"] == []
    assert {"dice_liver", "hd95_liver", "surface_dice_liver"} <= set(rows[0])
    assert any(p.name.startswith("best_") for p in (report / "overlays").iterdir())
    assert not (tmp_path / "eval" / "plan.json").exists()  # the training plan resolver is not run

    # the same case, scored by the evaluator directly, gives the same numbers
    from medunet.inference import Predictor

    data = tmp_path / "data"
    item = {"image": str(data / "imagesTr" / f"{rows[0]['case']}.nii.gz"),
            "label": str(data / "labelsTr" / f"{rows[0]['case']}.nii.gz")}
    direct = evaluate_files(Predictor.from_bundle(REPO / "bundles" / "ct", tmp_path / "models" / "model.pt",
                                                  device="cpu"), [item], tolerance_mm=2.0)
    assert summary["mean_dice"] == pytest.approx(direct.summary["mean_dice"], nan_ok=True)

    client, run = _mlflow_eval_run(tmp_path / "eval")
    assert run.info.status == "FINISHED" and run.data.params["tta"] == "false"
    assert run.data.params["plan.patch_size"] == json.dumps(plan.patch_size)
    assert "eval_mean_dice" in run.data.metrics or summary["mean_dice"] is None
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.csv", "summary.json", "overlays", "plan.json"} <= artifacts


def test_medunet_evaluate_with_tta(tmp_path, capsys):
    from medunet.cli import main

    random_checkpoint(tmp_path / "models", tiny_plan("mri"))
    sets = [f"{k}={v}" for k, v in _bundle_overrides(tmp_path, "mri").items() if k not in ("dataset_dir", "output_dir",
                                                                                             "ckpt_dir")]
    code = main(["evaluate", "bundles/mri", "--dataset-dir", str(tmp_path / "data"), "--output-dir",
                 str(tmp_path / "eval"), "--ckpt-dir", str(tmp_path / "models"), "--device", "cpu",
                 "--set", "mlflow=false", "--set", "tta=true", *[a for s in sets for a in ("--set", s)]])
    assert code == 0, capsys.readouterr().err[-2000:]
    summary = json.loads((tmp_path / "eval" / "evaluation" / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_cases"] == 1
    assert set(summary["classes"]) == set(Plan.load(tmp_path / "models" / "plan.json").label_names.values()) - {
        "background"}


class SoftOracle(ShiftedOracle):
    """The reference as probabilities: class 0 at ``1 - level`` inside the foreground, ``level`` outside."""

    def __init__(self, labels, level: float):
        super().__init__(labels)
        self.level = level

    def predict_image(self, image, probabilities=True):
        ref = super().predict_image(image).label
        p0 = np.where(ref > 0, 1.0 - self.level, self.level).astype(np.float32)
        rest = (1.0 - p0) / 2
        return SimpleNamespace(label=ref, image=image,
                               probabilities=np.stack([p0, rest, rest]) if probabilities else None)


def test_challenge_scoring_pools_the_cases_probabilities(tmp_path):
    from medunet.metrics import challenge_errors

    items, labels = _cases(tmp_path)
    result = evaluate_files(SoftOracle(labels, level=0.35), items, tmp_path / "report",
                            metrics=("dice", "pixel_error", "challenge_pixel_error", "challenge_rand_error"))
    refs = [nib.load(labels[Path(i["image"]).name]).get_fdata() for i in items]
    expected = challenge_errors([np.where(r > 0, 0.35, 0.65) for r in refs], refs)
    assert result.summary["challenge"] == pytest.approx(expected)
    # cell probability 0.35 inside the foreground, 0.65 outside (an inverted map): the best a threshold
    # can do is to call everything cell (t < 0.35; the first such threshold is kept)
    fg, bg = sum(int((r > 0).sum()) for r in refs), sum(int((r == 0).sum()) for r in refs)
    assert expected["challenge_pixel_threshold"] == 0.0
    assert expected["challenge_pixel_error"] == pytest.approx(bg / (2 * fg + bg))
    assert result.metrics["eval_challenge_rand_error"] == pytest.approx(expected["challenge_rand_error"])
    assert "challenge scoring" in (tmp_path / "report" / "results.md").read_text(encoding="utf-8")
    assert "challenge_pixel_error" not in result.rows[0]  # stack-level, not per case
    perfect = evaluate_files(SoftOracle(labels, level=0.9), items, None, metrics=("dice", "challenge_pixel_error"))
    assert perfect.summary["challenge"]["challenge_pixel_error"] == 0.0
    assert perfect.summary["challenge"]["challenge_rand_error"] == 0.0
    # a predictor without probabilities: each case is one failure line, not a crash
    none = evaluate_files(ShiftedOracle(labels), items, None, metrics=("dice", "challenge_rand_error"))
    assert not none.rows and len(none.failures) == 3 and all("no probabilities" in f for f in none.failures)
