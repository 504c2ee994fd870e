"""The evaluator: predict each case's image file the way ``medunet segment`` does, score the label map
against the case's label file in that file's own grid, and write the report.

:func:`evaluate_files` is the one implementation; ``evaluate.json`` (``medunet evaluate``) runs it through
:class:`EvaluationRun`, a one-iteration Ignite engine, so that the MLflow tracker attaches to it as it
does to a trainer.

The predictor is anything with ``predict_image(ImageData, probabilities=False) -> prediction`` whose
result has ``.label`` (an integer map ``(*S)`` in the image's grid), e.g.
:class:`medunet.inference.Predictor` (``plan`` gives the default class names); this module does not
import the inference package.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medunet.io import ImageData, InputError, image_id, read_image
from medunet.metrics.cells import CELL_METRIC_NAMES, CHALLENGE_METRIC_NAMES, cell_metrics, challenge_errors
from medunet.metrics.report import _slice2d, summarize, write_report
from medunet.metrics.segmentation import METRIC_NAMES, case_metrics

__all__ = ["Evaluation", "EvaluationRun", "evaluate_files", "score_prediction", "summary_metrics", "label_map"]

logger = logging.getLogger("medunet.metrics")

PathLike = str | os.PathLike


@dataclass
class Evaluation:
    """What :func:`evaluate_files` measured.

    Attributes:
        rows: one dict per scored case: ``"case"`` (id), ``"image"``, ``"label"`` (paths),
            ``"mean_dice"`` (mean over foreground classes with a defined Dice), ``"<metric>_<class name>"``
            per metric and class, ``"metrics"`` (``{class value: {metric: value}}``) and ``"seconds"``.
        summary: :func:`medunet.metrics.summarize` of the rows (plus ``"files"`` written and ``"failed"``).
        failures: one line per case that could not be scored (the file and the problem).
    """

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        """``eval_mean_dice`` and ``eval_<metric>_<class>`` means (see :func:`summary_metrics`)."""
        return summary_metrics(self.summary)


def summary_metrics(summary: Mapping) -> dict[str, float]:
    """Scalars of a summary for trackers: ``eval_mean_dice``, ``eval_<metric>_<class>`` and
    ``eval_<case metric>`` (e.g. ``eval_rand_error``) means."""
    out = {}
    if summary.get("mean_dice") is not None:
        out["eval_mean_dice"] = float(summary["mean_dice"])
    for metric, stats in (summary.get("case_metrics") or {}).items():
        if stats.get("mean") is not None:
            out[f"eval_{metric}"] = float(stats["mean"])
    for metric in CHALLENGE_METRIC_NAMES:
        if (summary.get("challenge") or {}).get(metric) is not None:
            out[f"eval_{metric}"] = float(summary["challenge"][metric])
    for name, per_metric in (summary.get("classes") or {}).items():
        for metric, stats in per_metric.items():
            if stats.get("mean") is not None:
                out[f"eval_{metric}_{name}"] = float(stats["mean"])
    return out


def _read_case_image(image: PathLike | Sequence[PathLike]) -> ImageData:
    """One image file, or several (one per channel, same grid) stacked on a trailing channel axis."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    parts = [read_image(p) for p in image]
    first = parts[0]
    for other in parts[1:]:
        if other.spatial_shape != first.spatial_shape or not np.allclose(other.affine, first.affine, atol=1e-3):
            raise InputError(other.path, f"channel file does not match {first.path} (shape or affine differs)")
    stacked = np.stack([np.asarray(p.array) for p in parts], axis=-1)
    return ImageData(stacked, first.affine, first.path, header=first.header, source=first.source, meta=first.meta)


def label_map(label: ImageData) -> np.ndarray:
    """A label file's integer map ``(*S)`` (rounded; a trailing singleton axis dropped)."""
    ref = np.asarray(label.array)
    if ref.ndim > label.spatial_dims and ref.size == int(np.prod(label.spatial_shape)):
        ref = ref.reshape(label.spatial_shape)  # (X, Y, Z, 1) label files
    return np.rint(ref).astype(np.int64)


def score_prediction(pred_label: np.ndarray, image: ImageData, label: ImageData, label_names: Mapping[int, str],
                     tolerance_mm: float | Sequence[float] = 1.0,
                     metrics: Sequence[str] = METRIC_NAMES) -> dict[str, Any]:
    """Per-class metrics of a prediction in ``image``'s grid against ``label`` in its own grid.

    Args:
        pred_label: integer label map ``(*S)``, ``S`` = ``image.spatial_shape``.
        image: the image predicted (its grid is the prediction's).
        label: the reference; it must share the image's grid (shape and affine), else the case is refused.
        label_names: class value → name (0 = background, not scored).
        metrics: per-class :data:`~medunet.metrics.METRIC_NAMES` and whole-case
            :data:`~medunet.metrics.cells.CELL_METRIC_NAMES` (``"pixel_error"``, ``"rand_error"``, ``"warping_error"``).

    Returns:
        ``{"mean_dice", "<metric>_<name>"..., "<case metric>"..., "metrics": {class: {metric: value}}}``;
        distances in mm at the label file's spacing.

    Raises:
        InputError: naming the label file when its grid is not the image's.
    """
    ref = label_map(label)
    if tuple(ref.shape) != tuple(pred_label.shape):
        raise InputError(label.path, f"label shape {tuple(ref.shape)} does not match image {image.path} "
                                     f"of shape {tuple(pred_label.shape)}")
    scale = float(np.abs(image.affine[:3, :3]).max() or 1.0)
    if not np.allclose(label.affine, image.affine, atol=1e-3 * scale):
        raise InputError(label.path, f"label grid (affine) differs from that of image {image.path}")
    num_classes = max(int(k) for k in label_names) + 1
    pred = np.asarray(pred_label).astype(np.int64)
    per_class = case_metrics(pred, ref, num_classes, spacing=label.spacing, tolerance_mm=tolerance_mm,
                             metrics=[m for m in metrics if m not in CELL_METRIC_NAMES])
    row: dict[str, Any] = cell_metrics(pred, ref, [m for m in metrics if m in CELL_METRIC_NAMES])
    dices = []
    for c, values in per_class.items():
        name = label_names.get(c, f"class{c}")
        for m, v in values.items():
            row[f"{m}_{name}"] = v
        if math.isfinite(values.get("dice", math.nan)):
            dices.append(values["dice"])
    row["mean_dice"] = float(np.mean(dices)) if dices else math.nan
    row["metrics"] = per_class
    return row


def _clear_overlays(output_dir: Path) -> None:
    """Remove the overlays of an earlier evaluation (other cases may be best/worst now)."""
    for stale in (output_dir / "overlays").glob("*.png"):
        if stale.name.startswith(("best_", "worst_")):
            stale.unlink()


def evaluate_files(
    predictor,
    items: Iterable[Mapping],
    output_dir: PathLike | None = None,
    label_names: Mapping[int, str] | None = None,
    tolerance_mm: float | Sequence[float] = 1.0,
    metrics: Sequence[str] = METRIC_NAMES,
    n_overlays: int = 2,
    log: Callable[[str], None] | None = None,
) -> Evaluation:
    """Predict and score every case of ``items``; with ``output_dir``, write the report there.

    Args:
        predictor: e.g. :class:`medunet.inference.Predictor` (see the module docstring); its TTA,
            windows and precision are what is evaluated.
        items: ``{"image": path or [paths, one per channel], "label": path}`` per case (a datalist).
        output_dir: where :func:`medunet.metrics.write_report` writes ``metrics.csv``, ``summary.json``
            and ``overlays/{best,worst}_<case>.png``; ``None`` writes nothing.
        label_names: class value → name; default the predictor's ``plan.label_names``.
        tolerance_mm: surface-Dice tolerance (one value or one per foreground class).
        metrics: any of ``"dice"``, ``"hd95"``, ``"surface_dice"`` (per class) and ``"pixel_error"``,
            ``"rand_error"``, ``"warping_error"`` (per case, :mod:`medunet.metrics.cells`), and
            ``"challenge_pixel_error"``/``"challenge_rand_error"``: the ISBI 2012 challenge's scoring of
            the cell probability (1 − that of class 0) of all cases together
            (:func:`~medunet.metrics.cells.challenge_errors`; summary entry ``"challenge"``).
        n_overlays: how many best and worst cases get an overlay.
        log: called with one line per case that fails (default: a logging warning); the others go on.

    Returns:
        :class:`Evaluation` (rows, summary, failures).
    """
    if label_names is None:
        label_names = predictor.plan.label_names
    label_names = {int(k): str(v) for k, v in label_names.items()}
    log = log or logger.warning
    result = Evaluation()
    slices: dict[str, tuple] = {}
    challenge = any(m in CHALLENGE_METRIC_NAMES for m in metrics)
    stack: list[tuple[np.ndarray, np.ndarray]] = []  # (cell probability, reference) per case, for the challenge
    for item in items:
        start = time.perf_counter()
        image_path = item.get("image")
        first = image_path if isinstance(image_path, (str, os.PathLike)) else (list(image_path or []) or ["?"])[0]
        try:
            image = _read_case_image(image_path)
            prediction = predictor.predict_image(image, probabilities=challenge)
            label = read_image(item["label"])
            row = score_prediction(np.asarray(prediction.label), image, label, label_names, tolerance_mm,
                                   [m for m in metrics if m not in CHALLENGE_METRIC_NAMES])
            if challenge and getattr(prediction, "probabilities", None) is None:
                raise ValueError("the predictor gave no probabilities, which the challenge measures score")
        except InputError as e:
            message = str(e)
        except (KeyError, ValueError, RuntimeError, OSError, MemoryError) as e:
            message = f"{first}: {' '.join(str(e).split()) or type(e).__name__}"
        else:
            case = image_id(first)
            row = {"case": case, "image": str(first), "label": str(item["label"]), **row,
                   "seconds": time.perf_counter() - start}
            result.rows.append(row)
            pixels = np.asarray(image.array, dtype=np.float32)
            if pixels.ndim > image.spatial_dims:
                pixels = pixels[..., 0]
            slices[case] = _slice2d(pixels, label_map(label), np.asarray(prediction.label))
            if challenge:  # the cell probability: 1 − that of class 0 (membrane)
                stack.append((1.0 - np.asarray(prediction.probabilities[0], dtype=np.float32), label_map(label)))
            logger.info("evaluated %s: mean Dice %.4f (%.1f s)", case, row["mean_dice"], row["seconds"])
            continue
        result.failures.append(message)
        log(f"evaluation skipped: {message}")
    extra: dict[str, Any] = {"failed": list(result.failures)}
    if stack:
        extra["challenge"] = challenge_errors([q for q, _ in stack], [r for _, r in stack])
    if output_dir is not None:
        out = Path(output_dir)
        _clear_overlays(out)
        result.summary = write_report(result.rows, label_names, out, slices, n_overlays, extra=extra)
        logger.info("evaluation of %d case(s): mean Dice %s; report in %s", len(result.rows),
                    result.summary["mean_dice"], out)
    else:
        result.summary = {**summarize(result.rows, label_names), **extra}
    return result


class EvaluationRun:
    """:func:`evaluate_files` as a one-iteration Ignite engine, for bundle configs.

    Ignite handlers in ``handlers`` (e.g. ``medunet.engines.MLflowTracker``) attach to the engine: at
    epoch end ``engine.state.metrics`` holds :func:`summary_metrics` of the evaluation, and on
    completion the report files exist. ``None`` entries (handlers disabled in a config) are skipped.

    Args:
        predictor, items, output_dir, label_names, tolerance_mm, metrics, n_overlays: as
            :func:`evaluate_files`.
        handlers: objects with ``attach(engine)``.
    """

    def __init__(self, predictor, items: Iterable[Mapping], output_dir: PathLike,
                 label_names: Mapping[int, str] | None = None, tolerance_mm: float | Sequence[float] = 1.0,
                 metrics: Sequence[str] = METRIC_NAMES, n_overlays: int = 2, handlers: Sequence | None = None):
        self.predictor = predictor
        self.items = list(items)
        self.output_dir = output_dir
        self.label_names = label_names
        self.tolerance_mm = tolerance_mm
        self.metrics = tuple(metrics)
        self.n_overlays = int(n_overlays)
        self.handlers = [h for h in (handlers or []) if h is not None]
        self.result: Evaluation | None = None

    def _step(self, engine, _batch) -> Evaluation:
        self.result = evaluate_files(self.predictor, self.items, self.output_dir, self.label_names,
                                     self.tolerance_mm, self.metrics, self.n_overlays)
        engine.state.metrics.update(self.result.metrics)
        return self.result

    def run(self) -> Evaluation:
        """Evaluate; raises ``RuntimeError`` naming the first failure when no case could be scored."""
        from ignite.engine import Engine

        engine = Engine(self._step)
        for handler in self.handlers:
            handler.attach(engine)
        engine.run([0], max_epochs=1)
        if self.items and not self.result.rows:
            raise RuntimeError(f"no validation case could be evaluated ({len(self.result.failures)} failed; first: "
                               f"{self.result.failures[0] if self.result.failures else '?'})")
        return self.result
