"""Mirroring test-time augmentation (as nnU-Net does) and per-voxel uncertainty maps."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["mirror_combinations", "predict_probabilities", "entropy_map", "UNCERTAINTY_KINDS"]

UNCERTAINTY_KINDS = ("entropy", "variance")


def mirror_combinations(spatial_dims: int, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Every subset of the mirrored spatial axes, the identity ``()`` first (8 in 3D, 4 in 2D)."""
    axes = tuple(range(spatial_dims)) if axes is None else tuple(int(a) for a in axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def predict_probabilities(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tta: bool = False,
    mirror_axes: Sequence[int] | None = None,
    with_variance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax probabilities of ``x`` (1, C, *S), averaged over mirrored copies when ``tta``.

    Each mirrored copy is flipped, predicted, and flipped back before averaging, so the result is in
    the frame of ``x``.

    Returns:
        ``(probabilities (1, K, *S), variance (1, *S) or None)``; the variance is the across-copy
        variance of the probabilities, averaged over classes, scaled by 4 into [0, 1] (needs ``tta``).
    """
    combos = mirror_combinations(x.dim() - 2, mirror_axes) if tta else [()]
    total = squares = None
    for combo in combos:
        dims = [a + 2 for a in combo]
        xi = x.flip(dims) if dims else x
        p = torch.softmax(logits_fn(xi).float(), dim=1)
        if dims:
            p = p.flip(dims)
        total = p if total is None else total + p
        if with_variance:
            squares = p * p if squares is None else squares + p * p
    n = len(combos)
    mean = total / n
    variance = None
    if with_variance:
        variance = (squares / n - mean * mean).clamp_min(0).mean(dim=1) * 4.0
        variance = variance.clamp_(0.0, 1.0)
    return mean, variance


def entropy_map(probabilities: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Normalised entropy ``-Σ p log p / log K`` of class probabilities, in [0, 1] (0: certain).

    ``probabilities`` has the K classes along ``dim``; the result drops that axis.
    """
    k = probabilities.shape[dim]
    if k < 2:
        return torch.zeros_like(probabilities.select(dim, 0))
    p = probabilities.clamp_min(1e-12)
    h = -(p * p.log()).sum(dim=dim) / math.log(k)
    return h.clamp_(0.0, 1.0)
