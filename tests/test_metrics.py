"""Metrics: Dice / HD95 / surface Dice on shapes with known answers, empty-class conventions, the per-class
validation Dice, and the evaluation report files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from monai.networks.utils import one_hot

from medunet.metrics import ClassDice, as_label_map, case_metrics, summarize, write_report


def _cube(shape=(24, 20, 20), start=(5, 5, 5), size=10, value=1) -> np.ndarray:
    a = np.zeros(shape, np.int64)
    a[start[0]:start[0] + size, start[1]:start[1] + size, start[2]:start[2] + size] = value
    return a


def test_shifted_cube_dice_hd95_surface_dice():
    ref = _cube()
    pred = _cube(start=(7, 5, 5))  # shifted by 2 voxels along x
    m = case_metrics(pred, ref, num_classes=2)[1]
    assert m["dice"] == pytest.approx(2 * 800 / 2000)
    assert m["hd95"] == pytest.approx(2.0)
    # every boundary point is within 2 voxels of the other boundary, not all within 1
    assert case_metrics(pred, ref, 2, tolerance_mm=2.0)[1]["surface_dice"] == pytest.approx(1.0)
    assert 0.0 < case_metrics(pred, ref, 2, tolerance_mm=1.0)[1]["surface_dice"] < 1.0
    # distances are in mm: all displacement is along x, so x spacing 2.5 scales HD95 by 2.5
    m_mm = case_metrics(pred, ref, 2, spacing=(2.5, 1.0, 1.0))[1]
    assert m_mm["hd95"] == pytest.approx(5.0) and m_mm["dice"] == pytest.approx(m["dice"])


def test_identical_and_empty_class_conventions():
    ref = _cube() + _cube(start=(0, 0, 0), size=3, value=2)
    perfect = case_metrics(ref, ref, num_classes=4)
    assert perfect[1] == {"dice": 1.0, "hd95": 0.0, "surface_dice": 1.0}
    assert perfect[2]["dice"] == 1.0
    assert all(math.isnan(v) for v in perfect[3].values())  # absent from both: undefined, not 0 or 1
    missed = case_metrics(_cube(), ref, num_classes=3)[2]  # class 2 present in reference only
    assert missed["dice"] == 0.0 and math.isnan(missed["hd95"]) and missed["surface_dice"] == 0.0
    false_positive = case_metrics(ref, _cube(), num_classes=3)[2]
    assert false_positive["dice"] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        case_metrics(ref[:-1], ref, 3)


def test_as_label_map_forms():
    lab = torch.tensor([[0, 1], [2, 1]])
    assert torch.equal(as_label_map(lab[None].float()), lab)
    assert torch.equal(as_label_map(one_hot(lab[None], 3, dim=0)), lab)
    assert torch.equal(as_label_map(lab.numpy(), channel_first=False), lab)


def test_class_dice_ignite_metric_per_class():
    ref = torch.as_tensor(_cube() + _cube(start=(0, 0, 0), size=3, value=2))
    pred_good = ref.clone()
    pred_half = torch.as_tensor(_cube(start=(10, 5, 5)))  # class 1 half overlapping, class 2 missed

    def oh(x):
        return one_hot(x[None, None], 3)

    metric = ClassDice({0: "background", 1: "liver", 2: "spleen"})
    metric.reset()
    metric.update((oh(pred_good), oh(ref)))
    metric.update(([oh(pred_half)[0]], [oh(ref)[0]]))  # decollated list form
    out = metric.compute()
    expected_liver = (1.0 + 2 * 500 / 2000) / 2
    assert out["val_dice_liver"] == pytest.approx(expected_liver)
    assert out["val_dice_spleen"] == pytest.approx(0.5)  # 1.0 and 0.0 (missed)
    assert set(out) == {"val_dice_liver", "val_dice_spleen"}


def test_write_report_csv_summary_overlays(tmp_path):
    names = {0: "background", 1: "liver", 2: "spleen"}
    rows, slices = [], {}
    rng = np.random.default_rng(0)
    for i, shift in enumerate([0, 1, 3, 5]):
        ref = _cube() + _cube(start=(0, 0, 0), size=3, value=2)
        pred = np.roll(ref, shift, axis=0)
        per = case_metrics(pred, ref, 3, spacing=(1, 1, 1))
        row = {"case": f"c{i}"}
        for c, vals in per.items():
            row.update({f"{k}_{names[c]}": v for k, v in vals.items()})
        row["mean_dice"] = float(np.nanmean([per[c]["dice"] for c in per]))
        rows.append(row)
        img = rng.normal(size=ref.shape).astype(np.float32)
        slices[f"c{i}"] = (img[..., 7], ref[..., 7], pred[..., 7], 7)
    summary = write_report(rows, names, tmp_path, slices, n_overlays=1)
    with open(tmp_path / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["case"] for r in table] == ["c0", "c1", "c2", "c3"]
    assert float(table[0]["dice_liver"]) == pytest.approx(1.0)
    on_disk = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert on_disk["n_cases"] == 4 and on_disk["best_cases"][0] == "c0" and on_disk["worst_cases"][0] == "c3"
    assert on_disk["classes"]["liver"]["dice"]["mean"] == pytest.approx(np.mean([float(r["dice_liver"]) for r in table]))
    assert summary["mean_dice"] == pytest.approx(np.mean([r["mean_dice"] for r in rows]))
    pngs = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert pngs == ["best_c0.png", "worst_c3.png"]
    assert (tmp_path / "overlays" / "best_c0.png").read_bytes()[:4] == b"\x89PNG"


def test_summarize_counts_undefined_values():
    rows = [{"case": "a", "mean_dice": 0.5, "dice_x": 0.5, "hd95_x": math.nan, "surface_dice_x": 0.4},
            {"case": "b", "mean_dice": 0.7, "dice_x": 0.7, "hd95_x": 3.0, "surface_dice_x": 0.6}]
    s = summarize(rows, {0: "bg", 1: "x"})
    assert s["classes"]["x"]["hd95"] == {"mean": 3.0, "std": 0.0, "median": 3.0, "n": 1, "n_undefined": 1}
    assert s["mean_dice"] == pytest.approx(0.6)
