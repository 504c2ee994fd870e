"""Training losses that also work for valid-convolution networks (output smaller than the input).

A network with unpadded convolutions (``unet2015`` with ``padding="valid"``) maps a patch ``(B, C, *S)``
to ``(B, K, *S')`` with ``S' < S``; the target must then be centre-cropped to ``S'`` before the loss,
exactly as in the 2015 paper. :class:`CroppedLoss` does that for any loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceCELoss

__all__ = ["center_crop_to", "CroppedLoss", "WeightMapLoss", "dice_ce_loss", "build_loss"]


def center_crop_to(x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Centre-crop ``x`` ``(B, C, *S)`` to ``(B, C, *spatial_shape)`` (no-op when equal).

    Raises:
        ValueError: when ``spatial_shape`` is larger than ``S`` along any axis.
    """
    current = tuple(x.shape[2:])
    target = tuple(int(s) for s in spatial_shape)
    if current == target:
        return x
    if len(current) != len(target) or any(t > c for t, c in zip(target, current)):
        raise ValueError(f"cannot centre-crop a {current} target to the network output {target}")
    slices = [slice(None), slice(None)]
    for c, t in zip(current, target):
        start = (c - t) // 2
        slices.append(slice(start, start + t))
    return x[tuple(slices)]


class CroppedLoss(torch.nn.Module):
    """``loss(pred, center_crop_to(target, pred.shape[2:]))``.

    Args:
        loss: any ``(pred (B, K, *S'), target (B, C, *S')) -> scalar`` loss.
    """

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(pred, center_crop_to(target, pred.shape[2:]))


class WeightMapLoss(torch.nn.Module):
    """The seed's border-weighted cross-entropy behind MONAI's two-argument ``loss(pred, target)`` call.

    ``target`` ``(B, 1 or 2, *S)``: channel 0 is the label map, channel 1 (when present) the per-pixel weight
    map (see :func:`medunet.engines.workflow.prepare_batch_with_weights`). Targets larger than the
    logits (valid convolutions) are centre-cropped by the wrapped loss.
    """

    def __init__(self, **kwargs):
        super().__init__()
        from medunet.data.weightmap import WeightedCrossEntropyLoss

        self.loss = WeightedCrossEntropyLoss(**kwargs)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = target[:, 1:2] if target.shape[1] > 1 else None
        return self.loss(pred, target[:, :1], weight)


def dice_ce_loss(**kwargs) -> CroppedLoss:
    """Dice + cross-entropy on softmax outputs with an integer label map target ``(B, 1, *S)``."""
    options = {"to_onehot_y": True, "softmax": True, "squared_pred": False, "batch": True}
    options.update(kwargs)
    return CroppedLoss(DiceCELoss(**options))


def build_loss(name: str = "dice_ce", **kwargs) -> torch.nn.Module:
    """Loss by name: ``"dice_ce"`` (default for CT/MRI) or ``"weighted_ce"`` (the seed's border-weighted CE).

    ``weighted_ce`` expects the target to carry the label map in channel 0 and the pixel weight map in
    channel 1 (what :class:`medunet.data.weightmap.BorderWeightMapd` produces in the cells2d recipe).
    """
    if name == "dice_ce":
        return dice_ce_loss(**kwargs)
    if name == "weighted_ce":
        return WeightMapLoss(**kwargs)
    raise ValueError(f"unknown loss {name!r}; choose 'dice_ce' or 'weighted_ce'")
