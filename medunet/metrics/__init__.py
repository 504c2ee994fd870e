"""Metrics: per-class Dice, HD95 and surface Dice (MONAI metric functions), an Ignite per-class Dice for
validation, and evaluation reports (per-case CSV, summary JSON, best/worst overlays)."""

from medunet.metrics.report import (
    EvaluationReport,
    overlay_png,
    representative_slice,
    summarize,
    write_report,
)
from medunet.metrics.segmentation import METRIC_NAMES, ClassDice, as_label_map, case_metrics

__all__ = [
    "case_metrics", "ClassDice", "METRIC_NAMES", "as_label_map", "EvaluationReport", "write_report",
    "summarize", "overlay_png", "representative_slice",
]
