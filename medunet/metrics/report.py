"""Evaluation reports: a per-case CSV, a summary JSON and PNG overlays of the best and worst cases.

:func:`write_report` writes them from per-case rows; :func:`medunet.metrics.evaluate_files` (the
evaluator behind ``evaluate.json`` and ``medunet evaluate``) calls it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medunet.io import atomic_write_bytes, atomic_write_text
from medunet.metrics.cells import CELL_METRIC_NAMES
from medunet.metrics.segmentation import METRIC_NAMES

__all__ = ["write_report", "summarize", "overlay_png", "representative_slice"]


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


def _stats(rows: Sequence[Mapping], key: str) -> dict:
    vals = np.array([float(r[key]) for r in rows if key in r], dtype=float)
    ok = vals[np.isfinite(vals)]
    return {
        "mean": float(ok.mean()) if ok.size else None,
        "std": float(ok.std()) if ok.size else None,
        "median": float(np.median(ok)) if ok.size else None,
        "n": int(ok.size),
        "n_undefined": int(vals.size - ok.size),
    }


def _case_metric_names(rows: Sequence[Mapping]) -> list[str]:
    """The whole-case measures (:data:`~medunet.metrics.cells.CELL_METRIC_NAMES`) the rows carry."""
    return [m for m in CELL_METRIC_NAMES if any(m in r for r in rows)]


def summarize(rows: Sequence[Mapping], label_names: Mapping[int, str]) -> dict:
    """Summary of per-case rows: per class and metric the mean/std/median over defined values, the number
    of cases where it was undefined, the overall mean Dice over foreground classes and, under
    ``"case_metrics"``, the same statistics of whole-case measures (pixel/Rand error) when scored."""
    classes: dict = {}
    for value, name in sorted(label_names.items()):
        if int(value) == 0:
            continue
        classes[name] = {m: _stats(rows, f"{m}_{name}") for m in METRIC_NAMES}
    means = [float(r["mean_dice"]) for r in rows if math.isfinite(float(r.get("mean_dice", math.nan)))]
    ordered = sorted((r for r in rows if math.isfinite(float(r.get("mean_dice", math.nan)))),
                     key=lambda r: float(r["mean_dice"]))
    return {
        "n_cases": len(rows),
        "mean_dice": float(np.mean(means)) if means else None,
        "classes": classes,
        "case_metrics": {m: _stats(rows, m) for m in _case_metric_names(rows)},
        "worst_cases": [r["case"] for r in ordered[:3]],
        "best_cases": [r["case"] for r in ordered[::-1][:3]],
    }


def write_report(rows: list[dict], label_names: Mapping[int, str], output_dir: str | os.PathLike,
                 slices: Mapping[str, tuple] | None = None, n_overlays: int = 2, extra: Mapping | None = None) -> dict:
    """Write ``metrics.csv`` (one row per case), ``summary.json`` and ``overlays/{best,worst}_<case>.png``.

    Args:
        rows: ``{"case": id, "mean_dice": x, "<metric>_<class name>": x, ...}`` per case.
        slices: case id → ``(image2d, label2d, pred2d, slice_index)`` used for overlays.
        n_overlays: how many best and how many worst cases to draw.
        extra: more entries for ``summary.json`` (e.g. the cases that failed).

    Returns:
        the summary dict (also written as ``summary.json``), with ``"files"`` listing what was written.
    """
    out = Path(output_dir)
    columns = ["case", "mean_dice"] + _case_metric_names(rows) + [
        f"{m}_{n}" for v, n in sorted(label_names.items()) if int(v) != 0 for m in METRIC_NAMES]
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
    summary.update(extra or {})
    files.append(atomic_write_text(out / "results.md", results_table(summary)))
    summary["files"] = [str(f) for f in files] + [str(out / "summary.json")]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def results_table(summary: Mapping) -> str:
    """A Markdown table of a :func:`summarize` result: mean (± std) Dice and HD95 per class, then the
    mean over classes; then the whole-case measures (pixel/Rand error) when they were scored."""

    def cell(stats, digits):
        if not stats or stats.get("mean") is None or not math.isfinite(float(stats["mean"])):
            return "–"
        return f"{float(stats['mean']):.{digits}f} ± {float(stats.get('std') or 0.0):.{digits}f}"

    lines = ["| class | Dice | HD95 (mm) |", "|---|---|---|"]
    hd = []
    for name, m in summary.get("classes", {}).items():
        lines.append(f"| {name} | {cell(m.get('dice'), 4)} | {cell(m.get('hd95'), 2)} |")
        value = (m.get("hd95") or {}).get("mean")
        if value is not None and math.isfinite(float(value)):
            hd.append(float(value))
    mean = summary.get("mean_dice")
    mean_text = f"{float(mean):.4f}" if mean is not None and math.isfinite(float(mean)) else "–"
    hd_text = f"{sum(hd) / len(hd):.2f}" if hd else "–"
    lines.append(f"| **mean** | **{mean_text}** | {hd_text} |")
    lines.append("")
    case_metrics = summary.get("case_metrics") or {}
    if case_metrics:
        lines += ["| measure (per case) | mean ± std |", "|---|---|"]
        lines += [f"| {name.replace('_', ' ')} | {cell(stats, 4)} |" for name, stats in case_metrics.items()]
        lines.append("")
    challenge = summary.get("challenge")
    if challenge:
        lines += [f"ISBI 2012 challenge scoring of the cell probability over all {challenge['n_slices']} case(s) "
                  "(1 − best F-score over thresholds 0.0…1.0):", "",
                  "| measure | error | threshold |", "|---|---|---|",
                  f"| pixel error | {float(challenge['challenge_pixel_error']):.4f} | "
                  f"{float(challenge['challenge_pixel_threshold']):.1f} |",
                  f"| Rand error | {float(challenge['challenge_rand_error']):.4f} | "
                  f"{float(challenge['challenge_rand_threshold']):.1f} |", ""]
    lines.append(f"{summary.get('n_cases', 0)} case(s) scored, {len(summary.get('failed') or [])} failed.")
    return "\n".join(lines) + "\n"
