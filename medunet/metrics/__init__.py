"""Metrics: per-class Dice, HD95 and surface Dice (MONAI metric functions), the EM challenge's pixel,
Rand and warping errors for 2D cell segmentations, an Ignite per-class Dice for validation, the
evaluator (predict each case's file, score it in its label's grid) and its reports (per-case CSV,
summary JSON, best/worst overlays)."""

from medunet.metrics.cells import (
    CELL_METRIC_NAMES,
    CHALLENGE_METRIC_NAMES,
    adapted_rand,
    cell_metrics,
    challenge_errors,
    pixel_error,
    rand_error,
    warping_error,
)
from medunet.metrics.evaluate import (
    Evaluation,
    EvaluationRun,
    evaluate_files,
    label_map,
    score_prediction,
    summary_metrics,
)
from medunet.metrics.report import overlay_png, representative_slice, summarize, write_report
from medunet.metrics.segmentation import (
    METRIC_NAMES,
    ClassDice,
    as_label_map,
    case_metrics,
    label_agreement,
    voxel_agreement,
)

__all__ = [
    "case_metrics", "ClassDice", "METRIC_NAMES", "as_label_map", "write_report", "summarize", "overlay_png",
    "representative_slice", "Evaluation", "EvaluationRun", "evaluate_files", "score_prediction",
    "summary_metrics", "label_map", "CELL_METRIC_NAMES", "adapted_rand", "cell_metrics", "pixel_error",
    "rand_error", "warping_error", "label_agreement", "voxel_agreement", "CHALLENGE_METRIC_NAMES",
    "challenge_errors",
]
