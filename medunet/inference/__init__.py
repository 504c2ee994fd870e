"""Inference: tiled (sliding-window / overlap-tile) prediction, TTA, uncertainty, postprocessing, and the
:class:`Predictor` behind ``medunet segment``."""

from medunet.inference.bundle import resolve_plan, run_inferring, segment_inputs, trained_plan_path
from medunet.inference.geometry import PlanGrid, resample_grid
from medunet.inference.postprocess import keep_largest_component
from medunet.inference.predictor import (
    Prediction,
    Predictor,
    SegmentResult,
    body_box,
    collect_inputs,
    nonzero_box,
    nonzero_box_affine,
    output_paths,
    resolve_device,
    summary_table,
)
from medunet.inference.sliding import TiledInferer, build_inferer, mirror_pad
from medunet.inference.tta import entropy_map, mirror_combinations, predict_probabilities

__all__ = [
    "build_inferer", "TiledInferer", "mirror_pad", "Predictor", "Prediction", "SegmentResult",
    "collect_inputs", "body_box", "nonzero_box", "nonzero_box_affine", "output_paths", "resolve_device", "resolve_plan", "summary_table", "PlanGrid",
    "resample_grid", "keep_largest_component", "segment_inputs", "run_inferring", "trained_plan_path", "entropy_map", "mirror_combinations", "predict_probabilities",
]
