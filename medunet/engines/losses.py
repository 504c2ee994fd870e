"""Training losses that also work for valid-convolution networks (output smaller than the input).

A network with unpadded convolutions (``unet2015`` with ``padding="valid"``) maps a patch ``(B, C, *S)``
to ``(B, K, *S')`` with ``S' < S``; the target must then be centre-cropped to ``S'`` before the loss,
exactly as in the 2015 paper. :class:`CroppedLoss` does that for any loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

__all__ = ["center_crop_to", "CroppedLoss", "DeepSupervisionDiceCE", "WeightMapLoss", "WeightedCrossEntropyLoss",
           "dice_ce_loss", "build_loss"]


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


class DeepSupervisionDiceCE(torch.nn.Module):
    """Dice + cross-entropy on a network's output, with deep supervision when there are several heads.

    Accepts logits ``(B, K, *S)``, a list of them, or DynUNet's training output ``(B, 1 + N, K, *S)``
    (heads already upsampled to ``S``); target ``(B, 1, *S)`` class values. Heads are weighted 1, 1/2,
    1/4, … as nnU-Net does (MONAI's ``DeepSupervisionLoss``). A single head larger-than-output target
    (valid convolutions) is centre-cropped. Logits are scored in float32 (bf16/fp16 autocast outputs).

    Args:
        batch: Dice over the whole batch (nnU-Net's "batch dice") rather than per sample.
        **kwargs: more ``DiceCELoss`` options.
    """

    def __init__(self, batch: bool = True, **kwargs) -> None:
        super().__init__()
        options = {"to_onehot_y": True, "softmax": True, "squared_pred": False, "batch": batch,
                   "smooth_nr": 1e-5, "smooth_dr": 1e-5}
        options.update(kwargs)
        self.loss = CroppedLoss(DiceCELoss(**options))
        self.deep = DeepSupervisionLoss(self.loss, weight_mode="exp")

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, torch.Tensor) and logits.dim() == target.dim() + 1:
            logits = list(torch.unbind(logits, dim=1))
        if isinstance(logits, torch.Tensor):
            return self.loss(logits.float(), target)
        if len(logits) == 1:
            return self.loss(logits[0].float(), target)
        return self.deep([t.float() for t in logits], target)


class WeightedCrossEntropyLoss(torch.nn.Module):
    """Pixel-wise softmax cross-entropy weighted by a per-voxel map (the seed's training loss).

    ``forward(logits (B, C, *S), target (B, 1, *S') or (B, *S'), weight (B, 1, *S') or None)``. When
    ``S'`` is larger than ``S`` (valid-convolution networks such as ``unet2015(padding="valid")``) the
    target and weight are centre-cropped to the logits' size.

    Args:
        reduction: ``"mean"`` (Σ w·CE / number of voxels — the paper's energy, normalised), ``"sum"``,
            ``"weighted_mean"`` (Σ w·CE / Σ w) or ``"none"`` (``(B, *S)``).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "weighted_mean", "none"):
            raise ValueError(f"reduction must be mean|sum|weighted_mean|none, got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        spatial = tuple(logits.shape[2:])
        if target.dim() == logits.dim() - 1:
            target = target.unsqueeze(1)
        target = center_crop_to(target, spatial)[:, 0].long()
        # scored in float32: bf16/fp16 autocast logits would round the loss and its gradient
        ce = torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")  # (B, *S)
        if weight is not None:
            if weight.dim() == logits.dim() - 1:
                weight = weight.unsqueeze(1)
            weight = center_crop_to(weight, spatial)[:, 0].to(ce.dtype)
            ce = ce * weight
        if self.reduction == "none":
            return ce
        if self.reduction == "sum":
            return ce.sum()
        if self.reduction == "weighted_mean" and weight is not None:
            return ce.sum() / weight.sum().clamp_min(1e-8)
        return ce.mean()


class WeightMapLoss(torch.nn.Module):
    """The seed's border-weighted cross-entropy behind MONAI's two-argument ``loss(pred, target)`` call.

    ``target`` ``(B, 1 or 2, *S)``: channel 0 is the label map, channel 1 (when present) the per-pixel weight
    map (see :func:`medunet.engines.workflow.prepare_batch_with_weights`). Targets larger than the
    logits (valid convolutions) are centre-cropped by the wrapped loss.
    """

    def __init__(self, **kwargs):
        super().__init__()
        self.loss = WeightedCrossEntropyLoss(**kwargs)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = target[:, 1:2] if target.shape[1] > 1 else None
        return self.loss(pred, target[:, :1], weight)


def dice_ce_loss(**kwargs) -> DeepSupervisionDiceCE:
    """Dice + cross-entropy on softmax outputs with an integer label map target ``(B, 1, *S)``; deep
    supervision heads (DynUNet's training output) are weighted 1, 1/2, 1/4, …"""
    return DeepSupervisionDiceCE(**kwargs)


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
