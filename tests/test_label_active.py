"""Active learning's numbers (medunet.label.active): one score per study, and the labelling order."""

from __future__ import annotations

import numpy as np
import pytest

from medunet.io import ImageData
from medunet.label.active import is_current, rank_studies, score_record, study_uncertainty


def test_study_uncertainty_is_the_mean_inside_the_nonzero_box():
    array = np.zeros((10, 10, 4), np.float32)
    array[2:6, 3:5, :] = 100.0  # the scanned region; zero padding around it
    image = ImageData(array=array, affine=np.eye(4), path="x.nii.gz")
    unc = np.zeros(array.shape, np.float32)
    unc[2:6, 3:5, :] = 0.5
    unc[2, 3, 0] = 1.0
    expected = (0.5 * (4 * 2 * 4 - 1) + 1.0) / (4 * 2 * 4)
    assert study_uncertainty(unc, image) == pytest.approx(expected)
    # the padding does not dilute it: the same region in a larger padded volume scores the same
    padded = ImageData(array=np.pad(array, 6), affine=np.eye(4), path="y.nii.gz")
    assert study_uncertainty(np.pad(unc, 6), padded) == pytest.approx(expected)
    with pytest.raises(ValueError, match="different grids"):
        study_uncertainty(unc[:5], image)


def test_rank_studies_most_uncertain_first_then_stale_then_unscored():
    weights, old = [1, 10], [0, 10]
    images = {k: [5, 5] for k in "abcdef"}
    records = {
        "a": score_record(0.2, "entropy", weights, [5, 5], 0.1),
        "b": score_record(0.9, "entropy", weights, [5, 5], 0.1),
        "c": score_record(0.95, "entropy", old, [5, 5], 0.1),  # scored by an older model
        "d": None,  # never scored
        "e": score_record(0.5, "entropy", weights, [5, 5], 0.1),
        "f": {"error": "unreadable", "weights": weights, "image": [5, 5]},
    }
    assert is_current(records["b"], weights, [5, 5]) and not is_current(records["b"], weights, [6, 5])
    assert not is_current(records["c"], weights, [5, 5]) and not is_current(records["f"], weights, [5, 5])
    assert rank_studies(records, weights, images, now=1e9) == ["b", "e", "a", "c", "d", "f"]
    # a replaced image file makes its score stale
    assert rank_studies(records, weights, {**images, "b": [7, 5]}, now=1e9)[:4] == ["e", "a", "c", "b"]
    # a study handed out an hour ago goes after the others; after the reset it is back in front
    served = {"b": 1e9 - 3600}
    assert rank_studies(records, weights, images, served=served, now=1e9)[-1] == "b"
    assert rank_studies(records, weights, images, served=served, now=1e9, reset_s=600)[0] == "b"
