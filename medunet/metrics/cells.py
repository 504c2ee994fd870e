"""The ISBI 2012 EM challenge's measures for 2D cell/membrane segmentations: pixel, Rand and warping error.

Both compare an integer label map predicted for a 2D image with its reference, ``(*S)`` each, where
value 0 is the background between cells (the membrane in EM) and values > 0 are cell classes:

* **pixel error** — the fraction of pixels whose predicted class differs from the reference.
* **Rand error** — 1 − the adapted Rand F-score (Arganda-Carreras et al., Front. Neuroanat. 2015)
  between the *segments* of prediction and reference: the connected components of each cell class
  (4-connectivity in 2D). Pixels that are background in the reference are left out; where the
  prediction says background inside a reference cell, those pixels form one more predicted segment
  (``predicted_background="segment"``) or each pixel its own (``"singletons"``, as the SNEMI3D script
  and CREMI's Python port count them).

With ``p_ij`` the number of (reference-foreground) pixels in reference segment ``i`` and predicted
segment ``j``, ``a_i = Σ_j p_ij`` and ``b_j = Σ_i p_ij``: Rand precision ``Σ p_ij² / Σ b_j²`` (low when
segments are merged), recall ``Σ p_ij² / Σ a_i²`` (low when they are split), F = 2PR / (P + R).

* **warping error** (Jain et al., 2010) — the pixel error left after the reference has been warped
  towards the prediction by flipping only *simple* pixels (whose flip changes no cell's or gap's
  topology: cells 4-connected, background 8-connected): it counts the errors that split, merge, open
  or close objects and ignores boundary shifts. Found greedily (all flippable pixels, in 9 interleaved
  sub-grids whose members never neighbour, until none is left), so an upper bound of the minimum.

These score one label map. **The challenge itself** (and the U-Net paper's figures) scored a submitted
*probability map* of the whole test stack: :func:`challenge_errors` thresholds the cell probability at
0.0, 0.1, …, 1.0 and reports, as the challenge's (now deprecated) evaluation did, the pixel error as
1 − the best F-score of the cell pixels (TP, FP, FN summed over the stack) and the Rand error as 1 − the
best F-score of the foreground-restricted Rand index (pair counts ``n(n−1)`` of 4-connected segments per
slice, summed over the stack; reference background pixels and pixels the proposal calls background are
left out). Both are lower than the fraction-of-pixels / adapted-Rand values above for the same
prediction: an F-score of the cell class counts each wrong pixel against ~2× the cell pixels, and the
best of eleven thresholds is taken.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, sparse

__all__ = ["CELL_METRIC_NAMES", "CHALLENGE_METRIC_NAMES", "CHALLENGE_THRESHOLDS", "challenge_errors", "pixel_error", "cell_segments", "adapted_rand", "rand_error", "warping_error",
           "simple_pixels", "cell_metrics"]

#: case-level measures :func:`cell_metrics` computes (names as in the evaluation report)
CELL_METRIC_NAMES = ("pixel_error", "rand_error", "warping_error")
#: stack-level measures of :func:`challenge_errors` (scored from probabilities, over all cases together)
CHALLENGE_METRIC_NAMES = ("challenge_pixel_error", "challenge_rand_error")
#: the thresholds the ISBI 2012 evaluation swept over the submitted cell probability (0.0 to 1.0, step 0.1)
CHALLENGE_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(11))


def _labels(x) -> np.ndarray:
    return np.rint(np.asarray(x)).astype(np.int64)


def pixel_error(pred, label) -> float:
    """Fraction of pixels whose class differs between ``pred`` and ``label`` (integer maps, same shape)."""
    p, g = _labels(pred), _labels(label)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and reference {g.shape} differ in shape")
    return float(np.mean(p != g)) if p.size else 0.0


def cell_segments(label, connectivity: int = 1) -> np.ndarray:
    """Segments of a semantic map ``(*S)``: the connected components of each value > 0, numbered
    1…n over all values (0 stays 0). ``connectivity`` 1: faces only (4-neighbours in 2D)."""
    lab = _labels(label)
    structure = ndimage.generate_binary_structure(lab.ndim, connectivity)
    out = np.zeros(lab.shape, dtype=np.int64)
    offset = 0
    for value in np.unique(lab[lab > 0]):
        comps, n = ndimage.label(lab == value, structure=structure)
        out[comps > 0] = comps[comps > 0] + offset
        offset += n
    return out


def _contingency(g: np.ndarray, p: np.ndarray) -> sparse.coo_matrix:
    """Overlap counts ``[i, j]`` = pixels in reference segment ``g == i`` and proposed segment ``p == j``
    (non-negative integer ids, same length)."""
    return sparse.coo_matrix((np.ones(g.size), (g, p)), shape=(int(g.max(initial=-1)) + 1, int(p.max(initial=-1)) + 1))


def adapted_rand(pred_segments, true_segments, predicted_background: str = "segment") -> tuple[float, float, float]:
    """Adapted Rand error of two segmentations (instance maps, 0 = background, same shape).

    Args:
        pred_segments: predicted segment ids ``(*S)``.
        true_segments: reference segment ids ``(*S)``; its background pixels (0) are not scored.
        predicted_background: ``"segment"`` (predicted background pixels inside reference segments are
            one segment) or ``"singletons"`` (each such pixel is a segment of its own).

    Returns:
        ``(error, precision, recall)``, error = 1 − F-score; ``(0, 1, 1)`` when the reference has no
        foreground.
    """
    if predicted_background not in ("segment", "singletons"):
        raise ValueError(f"predicted_background must be 'segment' or 'singletons', got {predicted_background!r}")
    p, g = _labels(pred_segments).ravel(), _labels(true_segments).ravel()
    if p.shape != g.shape:
        raise ValueError(f"segmentations differ in size: {p.size} vs {g.size} pixels")
    scored = g > 0
    p, g = p[scored], g[scored]
    if g.size == 0:
        return 0.0, 1.0, 1.0
    _, g = np.unique(g, return_inverse=True)
    sum_true = float(np.sum(np.bincount(g).astype(np.float64) ** 2))  # Σ a_i²
    singles = 0.0
    if predicted_background == "singletons":  # each such pixel adds 1² to Σ p_ij² and to Σ b_j²
        singles = float(np.count_nonzero(p == 0))
        g, p = g[p > 0], p[p > 0]
    _, p = np.unique(p, return_inverse=True)
    table = _contingency(g, p).tocsr()
    sum_ij = float(np.sum(table.data.astype(np.float64) ** 2)) + singles
    sum_pred = float(np.sum(np.asarray(table.sum(axis=0), dtype=np.float64) ** 2)) + singles
    precision = sum_ij / sum_pred if sum_pred else 1.0
    recall = sum_ij / sum_true if sum_true else 1.0
    f = 2.0 * precision * recall / (precision + recall) if precision + recall else 0.0
    return 1.0 - f, precision, recall


def rand_error(pred, label, connectivity: int = 1, predicted_background: str = "segment") -> float:
    """1 − adapted Rand F-score between the cell segments (:func:`cell_segments`) of a predicted and a
    reference semantic map ``(*S)``; reference background pixels ignored (see the module docstring)."""
    p, g = _labels(pred), _labels(label)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and reference {g.shape} differ in shape")
    return adapted_rand(cell_segments(p, connectivity), cell_segments(g, connectivity), predicted_background)[0]


# the 8 neighbours of a pixel in a 3×3 window, bit k of a neighbourhood code = neighbour k is a cell
_RING = ((0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0))


def _simple_table() -> np.ndarray:
    """``table[code]``: whether a pixel with neighbourhood ``code`` is simple — exactly one 4-connected
    cell component 4-adjacent to it, and exactly one 8-connected background component, in its ring."""
    four = ndimage.generate_binary_structure(2, 1)
    eight = ndimage.generate_binary_structure(2, 2)
    table = np.zeros(256, dtype=bool)
    for code in range(256):
        ring = np.zeros((3, 3), dtype=bool)
        for k, (r, c) in enumerate(_RING):
            ring[r, c] = bool(code >> k & 1)
        cells, _ = ndimage.label(ring, structure=four)
        touching = {int(cells[r, c]) for r, c in ((0, 1), (1, 0), (1, 2), (2, 1))} - {0}
        gaps = ~ring
        gaps[1, 1] = False
        _, n_gaps = ndimage.label(gaps, structure=eight)
        table[code] = len(touching) == 1 and n_gaps == 1
    return table


_SIMPLE = _simple_table()


def simple_pixels(cells: np.ndarray) -> np.ndarray:
    """Boolean map ``(H, W)``: the pixels of a binary 2D map (True = cell) whose flip keeps its topology
    (outside the image counts as background)."""
    padded = np.pad(np.asarray(cells, dtype=bool), 1)
    h, w = padded.shape[0] - 2, padded.shape[1] - 2
    code = np.zeros((h, w), dtype=np.int64)
    for k, (r, c) in enumerate(_RING):
        code |= padded[r:r + h, c:c + w].astype(np.int64) << k
    return _SIMPLE[code]


def warping_error(pred, label, max_passes: int = 10_000) -> float:
    """Warping error of a predicted 2D semantic map against its reference ``(H, W)`` (cells: value > 0):
    the fraction of pixels still differing after the reference is warped to the prediction by
    topology-preserving flips (see the module docstring)."""
    target = _labels(pred) > 0
    warped = _labels(label) > 0
    if target.shape != warped.shape or target.ndim != 2:
        raise ValueError(f"warping error needs two 2D maps of one shape, got {target.shape} and {warped.shape}")
    rows, cols = np.indices(target.shape)
    subgrids = [(rows % 3 == a) & (cols % 3 == b) for a in range(3) for b in range(3)]
    for _ in range(max_passes):
        flipped = 0
        for grid in subgrids:  # members of one sub-grid are 3 apart: their flips do not interact
            flip = grid & (warped != target) & simple_pixels(warped)
            warped ^= flip
            flipped += int(flip.sum())
        if not flipped:
            break
    return float(np.mean(warped != target)) if target.size else 0.0


def cell_metrics(pred, label, names: Sequence[str] = CELL_METRIC_NAMES) -> dict[str, float]:
    """``{name: value}`` for the requested :data:`CELL_METRIC_NAMES` of one case."""
    unknown = [n for n in names if n not in CELL_METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown cell metrics {unknown}; choose from {CELL_METRIC_NAMES}")
    out = {}
    if "pixel_error" in names:
        out["pixel_error"] = pixel_error(pred, label)
    if "rand_error" in names:
        out["rand_error"] = rand_error(pred, label)
    if "warping_error" in names:
        out["warping_error"] = warping_error(pred, label)
    return out


def _pair_counts(true_segments: np.ndarray, proposed_segments: np.ndarray) -> tuple[float, float, float]:
    """Foreground-restricted pair counts ``(same in both, same in the reference, same in the proposal)``
    of two segmentations of one slice, ordered pairs ``n(n−1)``: reference background (0) is left out
    everywhere, proposed background only from the proposal's segments."""
    scored = true_segments > 0
    g, p = true_segments[scored].astype(np.int64), proposed_segments[scored].astype(np.int64)
    if g.size == 0:
        return 0.0, 0.0, 0.0
    table = _contingency(g, p).tocsc()
    a = np.asarray(table.sum(axis=1), dtype=np.float64).ravel()  # all of a reference segment's pixels
    inside = table[:, 1:]  # proposed background is no segment
    b = np.asarray(inside.sum(axis=0), dtype=np.float64).ravel()
    c = inside.data.astype(np.float64)
    return float(np.sum(c * (c - 1))), float(np.sum(a * (a - 1))), float(np.sum(b * (b - 1)))


def challenge_errors(cell_probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                     thresholds: Sequence[float] = CHALLENGE_THRESHOLDS) -> dict[str, float]:
    """The ISBI 2012 challenge's pixel and Rand errors of a stack of probability maps (see the module
    docstring).

    Args:
        cell_probabilities: per slice, the probability of "cell" (not membrane) ``(H, W)`` (e.g. 1 − the
            probability of class 0); a slice is "cell" where it is ``> threshold``.
        labels: per slice, the reference ``(H, W)``: 0 membrane, > 0 cell.
        thresholds: binarisation thresholds tried (default :data:`CHALLENGE_THRESHOLDS`).

    Returns:
        ``{"challenge_pixel_error", "challenge_pixel_threshold", "challenge_rand_error",
        "challenge_rand_threshold", "n_slices"}``: each error is 1 − the best F-score over the
        thresholds (counts summed over the slices), with the threshold that gave it.
    """
    probs = [np.asarray(q, dtype=np.float32) for q in cell_probabilities]
    refs = [_labels(r) > 0 for r in labels]
    if len(probs) != len(refs) or not probs:
        raise ValueError(f"need one reference per probability map (got {len(probs)} maps, {len(refs)} references)")
    for q, r in zip(probs, refs, strict=True):
        if q.shape != r.shape:
            raise ValueError(f"probability map {q.shape} and reference {r.shape} differ in shape")
    ref_segments = [cell_segments(r.astype(np.int64)) for r in refs]
    best = {"pixel": (-1.0, math.nan), "rand": (-1.0, math.nan)}
    for t in thresholds:
        tp = fp = fn = 0
        same_both = same_true = same_proposed = 0.0
        for q, r, segs in zip(probs, refs, ref_segments, strict=True):
            cells = q > float(t)
            tp += int(np.count_nonzero(cells & r))
            fp += int(np.count_nonzero(cells & ~r))
            fn += int(np.count_nonzero(~cells & r))
            counts = _pair_counts(segs, cell_segments(cells.astype(np.int64)))
            same_both, same_true, same_proposed = (same_both + counts[0], same_true + counts[1],
                                                   same_proposed + counts[2])
        f_pixel = 2.0 * tp / (2 * tp + fp + fn) if tp else 0.0
        precision = same_both / same_proposed if same_proposed else 0.0
        recall = same_both / same_true if same_true else 0.0
        f_rand = 2.0 * precision * recall / (precision + recall) if precision + recall else 0.0
        for key, f in (("pixel", f_pixel), ("rand", f_rand)):
            if f > best[key][0]:
                best[key] = (f, float(t))
    return {"challenge_pixel_error": 1.0 - best["pixel"][0], "challenge_pixel_threshold": best["pixel"][1],
            "challenge_rand_error": 1.0 - best["rand"][0], "challenge_rand_threshold": best["rand"][1],
            "n_slices": len(probs)}
