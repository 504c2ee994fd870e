"""Evaluation reports: a per-case CSV, a summary JSON and PNG overlays of the best and worst cases.

:class:`EvaluationReport` is an Ignite handler for a MONAI ``SupervisedEvaluator`` (``evaluate.json``);
:func:`write_report` does the same from a list of per-case results, so any caller (CLI, notebooks) can
produce identical files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from medunet.io import atomic_write_bytes, atomic_write_text
from medunet.metrics.segmentation import METRIC_NAMES, as_label_map, case_metrics

__all__ = ["EvaluationReport", "write_report", "summarize", "overlay_png", "representative_slice"]

logger = logging.getLogger("medunet.metrics")


def representative_slice(label: np.ndarray, pred: np.ndarray) -> int:
    """Index along the last axis of a 3D map with the most foreground (reference, else prediction)."""
    for m in (label, pred):
        counts = (m > 0).reshape(-1, m.shape[-1]).sum(0)
        if counts.max() > 0:
            return int(counts.argmax())
    return m.shape[-1] // 2


def _slice2d(image: np.ndarray, label: np.ndarray, pred: np.ndarray):
    if label.ndim == 3:
        z = representative_slice(label, pred)
        return image[..., z], label[..., z], pred[..., z], z
    return image, label, pred, None


def overlay_png(image: np.ndarray, label: np.ndarray, pred: np.ndarray, title: str = "") -> bytes:
    """PNG bytes: the image slice in grey with the reference (left) and the prediction (right) overlaid.

    Args:
        image, label, pred: 2D arrays ``(X, Y)`` (NIfTI axis order; drawn with X horizontal).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n = int(max(label.max(initial=0), pred.max(initial=0), 1))
    colors = plt.get_cmap("tab10")(np.arange(n) % 10)
    cmap = ListedColormap(colors)
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3), dpi=100)
    for ax, seg, name in zip(axes, (label, pred), ("reference", "prediction")):
        ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        masked = np.ma.masked_where(seg.T == 0, seg.T - 1)
        ax.imshow(masked, cmap=cmap, vmin=0, vmax=max(n - 1, 1), alpha=0.45, origin="lower",
                  interpolation="nearest")
        for c in range(1, n + 1):
            if (seg == c).any():
                ax.contour((seg == c).T.astype(float), levels=[0.5], colors=[colors[c - 1]], linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def summarize(rows: Sequence[Mapping], label_names: Mapping[int, str]) -> dict:
    """Summary of per-case rows: per class and metric the mean/std/median over defined values, the number
    of cases where it was undefined, and the overall mean Dice over foreground classes."""
    classes: dict = {}
    for value, name in sorted(label_names.items()):
        if int(value) == 0:
            continue
        per_metric = {}
        for m in METRIC_NAMES:
            key = f"{m}_{name}"
            vals = np.array([float(r[key]) for r in rows if key in r], dtype=float)
            ok = vals[np.isfinite(vals)]
            per_metric[m] = {
                "mean": float(ok.mean()) if ok.size else None,
                "std": float(ok.std()) if ok.size else None,
                "median": float(np.median(ok)) if ok.size else None,
                "n": int(ok.size),
                "n_undefined": int(vals.size - ok.size),
            }
        classes[name] = per_metric
    means = [float(r["mean_dice"]) for r in rows if math.isfinite(float(r.get("mean_dice", math.nan)))]
    ordered = sorted((r for r in rows if math.isfinite(float(r.get("mean_dice", math.nan)))),
                     key=lambda r: float(r["mean_dice"]))
    return {
        "n_cases": len(rows),
        "mean_dice": float(np.mean(means)) if means else None,
        "classes": classes,
        "worst_cases": [r["case"] for r in ordered[:3]],
        "best_cases": [r["case"] for r in ordered[::-1][:3]],
    }


def write_report(rows: list[dict], label_names: Mapping[int, str], output_dir: str | os.PathLike,
                 slices: Mapping[str, tuple] | None = None, n_overlays: int = 2) -> dict:
    """Write ``metrics.csv`` (one row per case), ``summary.json`` and ``overlays/{best,worst}_<case>.png``.

    Args:
        rows: ``{"case": id, "mean_dice": x, "<metric>_<class name>": x, ...}`` per case.
        slices: case id → ``(image2d, label2d, pred2d, slice_index)`` used for overlays.
        n_overlays: how many best and how many worst cases to draw.

    Returns:
        the summary dict (also written as ``summary.json``), with ``"files"`` listing what was written.
    """
    out = Path(output_dir)
    columns = ["case", "mean_dice"] + [f"{m}_{n}" for v, n in sorted(label_names.items()) if int(v) != 0
                                       for m in METRIC_NAMES]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", restval="")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    files = [atomic_write_text(out / "metrics.csv", buf.getvalue())]
    summary = summarize(rows, label_names)
    slices = slices or {}
    for tag, cases in (("worst", summary["worst_cases"][:n_overlays]), ("best", summary["best_cases"][:n_overlays])):
        for case in cases:
            if case not in slices:
                continue
            img, lab, prd, z = slices[case]
            row = next(r for r in rows if r["case"] == case)
            title = f"{tag}: {case}  mean Dice {float(row['mean_dice']):.3f}" + (f"  (slice z={z})" if z is not None else "")
            files.append(atomic_write_bytes(out / "overlays" / f"{tag}_{case}.png", overlay_png(img, lab, prd, title)))
    summary["files"] = [str(f) for f in files] + [str(out / "summary.json")]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _case_id(meta_obj, fallback: str) -> str:
    meta = getattr(meta_obj, "meta", None) or {}
    name = meta.get("filename_or_obj")
    if isinstance(name, list | tuple):
        name = name[0] if name else None
    if not name:
        return fallback
    from medunet.io import image_id

    return image_id(str(name))


def _spacing(t) -> list[float] | None:
    pixdim = getattr(t, "pixdim", None)
    if pixdim is None:
        return None
    return [float(v) for v in torch.as_tensor(pixdim).flatten().tolist()]


class EvaluationReport:
    """Ignite handler for a (batch size 1 or decollated) evaluator: per-case metrics → report files.

    Reads each case's ``pred`` and ``label`` (one-hot after :func:`medunet.engines.segmentation_postprocessing`)
    and ``image`` from the decollated engine output, computes :func:`case_metrics` at the image's voxel
    spacing, and at the end of the epoch writes :func:`write_report`'s files to ``output_dir``. Summary
    scalars (``eval_mean_dice``, ``eval_<metric>_<class>``) are added to ``engine.state.metrics`` so
    a tracker attached after this handler logs them.
    """

    def __init__(self, output_dir: str | os.PathLike, label_names: Mapping[int, str],
                 tolerance_mm: float | Sequence[float] = 1.0, n_overlays: int = 2):
        self.output_dir = Path(output_dir)
        self.label_names = {int(k): str(v) for k, v in label_names.items()}
        self.num_classes = max(self.label_names) + 1
        self.tolerance_mm = tolerance_mm
        self.n_overlays = int(n_overlays)
        self.summary: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _reset(self, engine: Engine) -> None:
        self.rows: list[dict] = []
        self.slices: dict[str, tuple] = {}

    def _iteration(self, engine: Engine) -> None:
        outputs = engine.state.output
        outputs = outputs if isinstance(outputs, list) else [outputs]
        for item in outputs:
            case = _case_id(item.get("image"), fallback=f"case_{len(self.rows):04d}")
            pred = as_label_map(item["pred"])
            label = as_label_map(item["label"])
            per_class = case_metrics(pred, label, self.num_classes, spacing=_spacing(item.get("label")),
                                     tolerance_mm=self.tolerance_mm)
            row: dict = {"case": case}
            dices = []
            for c, values in per_class.items():
                name = self.label_names.get(c, f"class{c}")
                for m, v in values.items():
                    row[f"{m}_{name}"] = v
                if math.isfinite(values.get("dice", math.nan)):
                    dices.append(values["dice"])
            row["mean_dice"] = float(np.mean(dices)) if dices else math.nan
            self.rows.append(row)
            image = item.get("image")
            img = torch.as_tensor(image).detach().cpu().float()[0].numpy() if image is not None else \
                np.zeros(tuple(label.shape), np.float32)
            self.slices[case] = _slice2d(img, label.numpy(), pred.numpy())

    def _epoch(self, engine: Engine) -> None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        self.summary = write_report(self.rows, self.label_names, self.output_dir, self.slices, self.n_overlays)
        if self.summary["mean_dice"] is not None:
            engine.state.metrics["eval_mean_dice"] = self.summary["mean_dice"]
        for name, per_metric in self.summary["classes"].items():
            for m, stats in per_metric.items():
                if stats["mean"] is not None:
                    engine.state.metrics[f"eval_{m}_{name}"] = stats["mean"]
        logger.info("evaluation of %d cases: mean Dice %s; report in %s", len(self.rows),
                    self.summary["mean_dice"], self.output_dir)
