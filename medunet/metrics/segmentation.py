"""Per-case, per-class segmentation metrics (Dice, HD95, surface Dice) computed with MONAI's metric
functions, and an Ignite metric giving the per-class validation Dice.

Conventions (as nnU-Net's evaluation): a class absent from both the reference and the prediction has an
undefined Dice (NaN, left out of means); a class present in only one of them has Dice 0 and an infinite
HD95, stored as NaN with ``n_missing`` counted in the summary. Distances are in mm when a spacing is given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from ignite.metrics import Metric
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.networks.utils import one_hot

__all__ = ["case_metrics", "ClassDice", "METRIC_NAMES", "as_label_map", "label_agreement", "voxel_agreement"]

METRIC_NAMES = ("dice", "hd95", "surface_dice")


def label_agreement(a: np.ndarray, b: np.ndarray, classes: Sequence[int]) -> float:
    """Mean Dice of two label maps of one shape over ``classes`` — for comparing two predictions (e.g.
    two tilings), so, unlike :func:`case_metrics`, a class absent from both counts as agreement (1)."""
    scores = []
    for c in classes:
        x, y = a == c, b == c
        denom = x.sum() + y.sum()
        scores.append(1.0 if denom == 0 else 2.0 * np.logical_and(x, y).sum() / denom)
    return float(np.mean(scores))


def voxel_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Voxel-weighted agreement of two label maps: ``2·|same foreground label| / (|fg a| + |fg b|)``."""
    fa, fb = a > 0, b > 0
    denom = fa.sum() + fb.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(fa, a == b).sum() / denom)


def as_label_map(x, channel_first: bool = True) -> torch.Tensor:
    """An integer label map ``(*S)``.

    Args:
        x: with ``channel_first``, a label map ``(1, *S)`` or a one-hot/probability map ``(K, *S)``
            (argmax over K); otherwise already a label map ``(*S)``.
    """
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.as_tensor() if hasattr(t, "as_tensor") else t
    t = t.detach().cpu()
    if channel_first:
        t = t.argmax(0) if t.shape[0] > 1 else t[0]
    return t.round().long() if t.is_floating_point() else t.long()


def case_metrics(
    pred,
    label,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    tolerance_mm: float | Sequence[float] = 1.0,
    metrics: Sequence[str] = METRIC_NAMES,
) -> dict[int, dict[str, float]]:
    """Metrics of one case, per foreground class.

    Args:
        pred: predicted integer label map ``(*S)`` (use :func:`as_label_map` for channel-first data).
        label: reference label map ``(*S)``.
        num_classes: ``K`` including background.
        spacing: voxel size (mm) per spatial axis; ``None`` measures distances in voxels.
        tolerance_mm: surface-Dice tolerance, one value or one per foreground class.
        metrics: any of ``"dice"``, ``"hd95"``, ``"surface_dice"``.

    Returns:
        ``{class_value: {"dice": d, "hd95": h, "surface_dice": s}}`` for classes ``1..K-1`` (NaN where
        undefined, see the module docstring).
    """
    p = as_label_map(pred, channel_first=False)
    g = as_label_map(label, channel_first=False)
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and reference {tuple(g.shape)} differ in shape")
    y_pred = one_hot(p[None, None], num_classes)
    y = one_hot(g[None, None], num_classes)
    n_fg = num_classes - 1
    out: dict[int, dict[str, float]] = {c: {} for c in range(1, num_classes)}
    present_g = [bool(y[0, c].any()) for c in range(1, num_classes)]
    present_p = [bool(y_pred[0, c].any()) for c in range(1, num_classes)]
    sp = None if spacing is None else [float(s) for s in spacing][: p.dim()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "dice" in metrics:
            d = compute_dice(y_pred, y, include_background=False, ignore_empty=True)[0]
            for i in range(n_fg):
                out[i + 1]["dice"] = float(d[i])
        if "hd95" in metrics:
            h = compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95, spacing=sp)[0]
            for i in range(n_fg):
                out[i + 1]["hd95"] = float(h[i]) if (present_g[i] and present_p[i]) else math.nan
        if "surface_dice" in metrics:
            tol = [float(tolerance_mm)] * n_fg if np.isscalar(tolerance_mm) else [float(t) for t in tolerance_mm]
            s = compute_surface_dice(y_pred, y, class_thresholds=tol, include_background=False, spacing=sp)[0]
            for i in range(n_fg):
                out[i + 1]["surface_dice"] = float(s[i]) if (present_g[i] or present_p[i]) else math.nan
    for i in range(n_fg):  # a class missed entirely, or predicted where there is none, scores 0
        if "dice" in metrics and present_g[i] != present_p[i]:
            out[i + 1]["dice"] = 0.0
    return out


class ClassDice(Metric):
    """Ignite metric: mean Dice of each foreground class over the validation cases.

    ``update((y_pred, y))`` takes one-hot tensors ``(B, K, *S)`` (or lists of ``(K, *S)``, MONAI's
    decollated form, via ``monai.handlers.from_engine(["pred", "label"])``). ``compute()`` returns
    ``{"val_dice_<name>": value}`` per class, which Ignite stores as separate ``engine.state.metrics``
    entries (so StatsHandler, MLflow and the history log each class).
    """

    def __init__(self, label_names: Mapping[int, str], prefix: str = "val_dice_", output_transform=lambda x: x,
                 device="cpu"):
        self.label_names = {int(k): str(v) for k, v in label_names.items()}
        self.prefix = prefix
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []

    def update(self, output) -> None:
        y_pred, y = output
        if isinstance(y_pred, list | tuple):
            y_pred = torch.stack([torch.as_tensor(t) for t in y_pred])
            y = torch.stack([torch.as_tensor(t) for t in y])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = compute_dice(y_pred.float(), y.float(), include_background=False, ignore_empty=True)
        present_g = y[:, 1:].flatten(2).any(-1)
        present_p = y_pred[:, 1:].flatten(2).any(-1)
        d = torch.where(present_g != present_p, torch.zeros_like(d), d)
        self._scores.append(d.detach().cpu())

    def compute(self) -> dict[str, float]:
        if not self._scores:
            return {}
        scores = torch.cat(self._scores)  # (N, K-1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from monai.utils import evenly_divisible_all_gather

            scores = evenly_divisible_all_gather(scores, concat=True)
        out = {}
        for i in range(scores.shape[1]):
            col = scores[:, i]
            col = col[~torch.isnan(col)]
            name = self.label_names.get(i + 1, f"class{i + 1}")
            out[f"{self.prefix}{name}"] = float(col.mean()) if len(col) else math.nan
        return out
