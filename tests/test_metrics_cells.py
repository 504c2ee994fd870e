"""The EM challenge's pixel, Rand and warping errors against label pairs small enough to count by hand,
and their place in the evaluation report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medunet.metrics import adapted_rand, pixel_error, rand_error, summarize, write_report
from medunet.metrics.cells import cell_metrics, cell_segments, simple_pixels, warping_error

# reference: two cells (value 1) separated by one membrane pixel (value 0)
REF = np.array([[1, 1, 0, 1, 1]])


def test_pixel_error_counts_misclassified_pixels():
    assert pixel_error(REF, REF) == 0.0
    assert pixel_error(np.array([[1, 0, 0, 1, 1]]), REF) == pytest.approx(1 / 5)
    assert pixel_error(1 - REF, REF) == 1.0
    with pytest.raises(ValueError, match="shape"):
        pixel_error(REF, REF.T)


def test_segments_are_four_connected_components():
    diagonal = np.array([[1, 0], [0, 1]])
    assert cell_segments(diagonal).max() == 2  # touching at a corner only: two cells
    assert cell_segments(np.array([[1, 1], [0, 1]])).max() == 1


def test_rand_error_of_a_merge():
    # the gap is missed: one predicted segment of 4 scored pixels over two reference cells of 2.
    # sum p_ij^2 = 2^2 + 2^2 = 8, sum a_i^2 = 8, sum b_j^2 = 4^2 = 16 -> P = 1/2, R = 1, F = 2/3
    error, precision, recall = adapted_rand(cell_segments([[1, 1, 1, 1, 1]]), cell_segments(REF))
    assert (precision, recall) == pytest.approx((0.5, 1.0))
    assert error == pytest.approx(1 / 3)
    assert rand_error(np.ones((1, 5), int), REF) == pytest.approx(1 / 3)


def test_rand_error_of_a_split_by_predicted_membrane():
    # pixel 1 (a cell pixel) predicted membrane: it is one more predicted segment; pixel 2 is membrane
    # in the reference and not scored. p_ij: 1 (cell A, seg {0}), 1 (A, membrane), 2 (B, seg {3,4})
    # sum p^2 = 6, sum a^2 = 8, sum b^2 = 6 -> P = 1, R = 3/4, F = 6/7
    pred = np.array([[1, 0, 0, 1, 1]])
    assert rand_error(pred, REF) == pytest.approx(1 / 7)
    assert rand_error(REF, REF) == 0.0


def test_predicted_membrane_as_one_segment_or_as_singletons():
    ref = np.array([[1, 1, 1, 1, 0, 1, 1]])         # cells A (4 px), B (2 px)
    pred = np.array([[1, 0, 1, 0, 0, 1, 1]])        # A cut at pixels 1 and 3
    true_seg, pred_seg = cell_segments(ref), cell_segments(pred)
    # one membrane segment M = {1, 3} (both in A): p_ij = A∩{0}:1, A∩M:2, A∩{2}:1, B∩{5,6}:2
    # sum p^2 = 1+4+1+4 = 10, sum a^2 = 16+4 = 20, sum b^2 = 1+4+1+4 = 10 -> P = 1, R = 1/2, F = 2/3
    err, p, r = adapted_rand(pred_seg, true_seg, "segment")
    assert (err, p, r) == pytest.approx((1 / 3, 1.0, 0.5))
    # singletons: pixels 1 and 3 each alone: sum p^2 = 1+1+1+1+4 = 8, sum b^2 = 8 -> P = 1, R = 2/5
    err, p, r = adapted_rand(pred_seg, true_seg, "singletons")
    assert (p, r) == pytest.approx((1.0, 0.4))
    assert err == pytest.approx(1 - 2 * 0.4 / 1.4)
    with pytest.raises(ValueError, match="predicted_background"):
        adapted_rand(pred_seg, true_seg, "ignore")


def test_rand_error_ignores_reference_membrane_and_has_no_foreground_case():
    # the last pixel is membrane in the reference: predicting it as cell (joined to the cell) costs no
    # Rand error, though it is a pixel error
    ref = np.array([[1, 1, 0]])
    assert rand_error(np.array([[1, 1, 1]]), ref) == 0.0
    assert pixel_error(np.array([[1, 1, 1]]), ref) == pytest.approx(1 / 3)
    # but a membrane pixel predicted as cell that merges two reference cells does
    two = np.array([[1, 0, 1]])
    assert rand_error(np.array([[1, 0, 1]]), two) == 0.0
    assert rand_error(np.array([[1, 1, 1]]), two) == pytest.approx(1 / 3)  # P = 2/4, R = 1
    assert adapted_rand(np.ones((2, 2)), np.zeros((2, 2))) == (0.0, 1.0, 1.0)


def test_simple_pixels():
    cells = np.zeros((5, 5), bool)
    cells[1:4, 1:4] = True
    simple = simple_pixels(cells)
    assert simple[1, 1] and simple[1, 2]  # removing a corner or an edge pixel keeps one cell, no hole
    assert not simple[2, 2]  # removing the centre would open a hole
    assert not simple[0, 0]  # adding a pixel that touches the cell at a corner only: a new 4-component
    assert simple[0, 1]  # adding one on an edge just grows the cell
    bridge = np.zeros((3, 5), bool)
    bridge[:, :2] = bridge[:, 3:] = True
    assert not simple_pixels(bridge)[1, 2]  # filling the gap would merge two cells


def test_warping_error_counts_topology_errors_only():
    ref = np.ones((9, 9), int)
    ref[:, 4] = 0  # two cells, a vertical gap from border to border
    shifted = np.ones((9, 9), int)
    shifted[:, 5] = 0  # the gap one pixel to the right: 18 pixel errors, no topological one
    assert pixel_error(shifted, ref) == pytest.approx(18 / 81)
    assert warping_error(shifted, ref) == 0.0
    assert warping_error(ref, ref) == 0.0
    # the gap missed: the two cells merge; the warped reference must keep its gap of 9 pixels
    assert warping_error(np.ones((9, 9), int), ref) == pytest.approx(9 / 81)
    # a horizontal cut splits each cell; of each cut's 4 pixels one must stay in the warped reference
    cut = ref.copy()
    cut[4, :] = 0
    assert warping_error(cut, ref) == pytest.approx(2 / 81)
    with pytest.raises(ValueError, match="2D"):
        warping_error(np.ones((2, 2, 2)), np.ones((2, 2, 2)))


def test_cell_metrics_names_and_report(tmp_path):
    pred = np.array([[1, 0, 0, 1, 1]])
    row = cell_metrics(pred, REF, ["pixel_error", "rand_error"])
    assert row == pytest.approx({"pixel_error": 0.2, "rand_error": 1 / 7})
    assert set(cell_metrics(pred, REF)) == {"pixel_error", "rand_error", "warping_error"}
    with pytest.raises(ValueError, match="unknown"):
        cell_metrics(pred, REF, ["variation_of_information"])
    rows = [{"case": "a", "mean_dice": 0.9, **row}, {"case": "b", "mean_dice": 0.8, "pixel_error": 0.0,
                                                      "rand_error": 0.0}]
    summary = summarize(rows, {0: "membrane", 1: "cell"})
    assert summary["case_metrics"]["pixel_error"]["mean"] == pytest.approx(0.1)
    assert summary["case_metrics"]["rand_error"]["n"] == 2
    written = write_report(rows, {0: "membrane", 1: "cell"}, tmp_path)
    header = (tmp_path / "metrics.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[:4] == ["case", "mean_dice", "pixel_error", "rand_error"]
    assert "rand error" in (tmp_path / "results.md").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))["case_metrics"] == written["case_metrics"]
    # without cell measures there are no case measures in the summary
    assert summarize([{"case": "c", "mean_dice": 1.0}], {0: "bg", 1: "fg"})["case_metrics"] == {}


def _brute_force_challenge(prob: np.ndarray, ref: np.ndarray, t: float) -> tuple[float, float]:
    """1 − pixel F and 1 − foreground-restricted Rand F at one threshold, by counting every ordered
    pixel pair (the definition, independent of the contingency-table code)."""
    cells = prob > t
    truth = ref > 0
    tp, fp, fn = (cells & truth).sum(), (cells & ~truth).sum(), (~cells & truth).sum()
    f_pixel = 2 * tp / (2 * tp + fp + fn)
    g, p = cell_segments(truth.astype(int)).ravel(), cell_segments(cells.astype(int)).ravel()
    idx = np.flatnonzero(g > 0)
    both = same_true = same_prop = 0
    for i in idx:
        for j in idx:
            if i == j:
                continue
            st, sp = g[i] == g[j], p[i] > 0 and p[i] == p[j]
            same_true += st
            same_prop += sp
            both += st and sp
    precision, recall = both / same_prop if same_prop else 0.0, both / same_true
    f_rand = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return 1 - f_pixel, 1 - f_rand


def test_challenge_errors_by_hand_and_against_pair_counting():
    from medunet.metrics import challenge_errors

    ref = np.array([[1, 1, 0, 1, 1]])  # two 2-pixel cells
    prob = np.array([[0.9, 0.6, 0.2, 0.9, 0.3]])
    # t = 0.0: all cell -> pixel F 8/9, the two cells merged: Rand precision 4/12, recall 1 -> F 1/2
    merged = challenge_errors([prob], [ref], thresholds=[0.0])
    assert merged["challenge_pixel_error"] == pytest.approx(1 / 9) and merged["challenge_rand_error"] == pytest.approx(0.5)
    # t = 0.5: pixel 4 called membrane -> pixel F 6/7; Rand precision 1, recall 2/4 -> F 2/3
    cut = challenge_errors([prob], [ref], thresholds=[0.5])
    assert cut["challenge_pixel_error"] == pytest.approx(1 / 7) and cut["challenge_rand_error"] == pytest.approx(1 / 3)
    # the best threshold of each measure is its own
    both = challenge_errors([prob], [ref], thresholds=[0.0, 0.5])
    assert both["challenge_pixel_threshold"] == 0.0 and both["challenge_rand_threshold"] == 0.5
    assert both["challenge_pixel_error"] == pytest.approx(1 / 9) and both["challenge_rand_error"] == pytest.approx(1 / 3)

    rng = np.random.default_rng(0)
    refs, probs = [], []
    for _ in range(2):  # a small stack: counts are summed over its slices
        r = np.ones((9, 8), int)
        r[:, rng.integers(2, 6)] = 0
        r[rng.integers(2, 7), :] = 0
        refs.append(r)
        probs.append(np.clip(r * 0.7 + rng.normal(0, 0.25, r.shape), 0, 1))
    for t in (0.3, 0.5, 0.7):
        got = challenge_errors(probs, refs, thresholds=[t])
        # pair counts summed over the slices = the count over both slices side by side with a membrane
        # column between them (no segment crosses it; reference membrane is not scored)
        gap = np.zeros((9, 1))
        joint = _brute_force_challenge(np.concatenate([probs[0], gap, probs[1]], 1),
                                       np.concatenate([refs[0], gap.astype(int), refs[1]], 1), t)
        assert got["challenge_pixel_error"] == pytest.approx(joint[0])
        assert got["challenge_rand_error"] == pytest.approx(joint[1])
    with pytest.raises(ValueError, match="one reference per"):
        challenge_errors([prob], [ref, ref])
