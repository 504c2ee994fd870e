"""Active learning from medunet's uncertainty: one number per study, and the order to label them in.

The label server's scoring method (``uncertainty_<model>`` in :mod:`medunet.label.main`) predicts each
unlabelled study with mirroring TTA and keeps :func:`study_uncertainty` of the per-voxel uncertainty
map (the variance of the TTA copies, or the entropy of their mean) in the datastore; its strategy of the
same name hands out the studies in :func:`rank_studies` order, so 3D Slicer's *Next Sample* opens the
study the model is least sure of. A score belongs to one model file and one image file: when either
changes (fine-tuning, a replaced volume) the score is stale and the study is scored again.
Importable without monailabel.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medunet.io import ImageData

__all__ = ["SCORE_KEY", "file_stamp", "study_uncertainty", "score_record", "is_current", "rank_studies"]

#: datastore image-info key of a model's score: ``f"{SCORE_KEY}_{model}"``
SCORE_KEY = "medunet_uncertainty"


def file_stamp(path: str | os.PathLike) -> list[int] | None:
    """``[mtime_ns, size]`` of a file (what makes a score stale), None when it does not exist."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def study_uncertainty(uncertainty: np.ndarray, image: ImageData) -> float:
    """Mean per-voxel uncertainty over the region the network predicts: the bounding box of the
    image's nonzero voxels (:func:`medunet.data.preprocess.nonzero_box`, the Predictor's crop; outside
    it the label is background by construction, so scanner padding does not dilute the score).

    Args:
        uncertainty: ``image.spatial_shape`` map in [0, 1] (:class:`medunet.inference.Prediction`'s).
        image: the image it was predicted from.
    """
    from medunet.data.preprocess import channels_first, nonzero_box

    unc = np.asarray(uncertainty, dtype=np.float64)
    if unc.shape != tuple(image.spatial_shape):
        raise ValueError(f"uncertainty map {unc.shape} and image {image.spatial_shape} have different grids")
    if not unc.size:
        return 0.0
    return float(unc[nonzero_box(channels_first(image))].mean())


def score_record(score: float, kind: str, weights: list[int] | None, image: list[int] | None,
                 seconds: float) -> dict[str, Any]:
    """What the datastore keeps for one study and model."""
    return {"score": round(float(score), 6), "kind": kind, "weights": weights, "image": image,
            "seconds": round(float(seconds), 3), "ts": int(time.time())}


def is_current(record: Mapping[str, Any] | None, weights: list[int] | None, image: list[int] | None) -> bool:
    """Whether ``record`` scores this model file and image file (both unchanged)."""
    return bool(record) and "score" in record and record.get("weights") == weights and record.get("image") == image


def rank_studies(records: Mapping[str, Mapping[str, Any] | None], weights: list[int] | None,
                 images: Mapping[str, list[int] | None], served: Mapping[str, float] | None = None,
                 now: float | None = None, reset_s: float = 24 * 3600) -> list[str]:
    """Studies in the order to label them: the most uncertain first.

    Args:
        records: study id → its :func:`score_record` for this model, or None (never scored).
        weights: :func:`file_stamp` of the model file now served.
        images: study id → :func:`file_stamp` of its image file now.
        served: study id → when (``time.time()``) this strategy last handed it out; a study handed out
            within ``reset_s`` goes after all the others (two *Next Sample* clicks give two studies).
        now: the current time (default ``time.time()``).

    Order: studies not handed out recently before the others; within each, current scores (highest
    first), then scores of an older model or image file (highest first), then unscored studies (by id).
    """
    now = time.time() if now is None else now
    served = served or {}

    def key(study: str):
        record = records.get(study)
        recent = now - float(served.get(study, 0.0)) < reset_s
        if is_current(record, weights, images.get(study)):
            tier, score = 0, float(record["score"])
        elif record and "score" in record:
            tier, score = 1, float(record["score"])
        else:
            tier, score = 2, 0.0
        return recent, tier, -score, study

    return sorted(records, key=key)
