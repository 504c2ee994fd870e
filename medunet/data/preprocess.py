"""The deterministic preprocessing of one case, as tensors: crop to the nonzero region → reorient to
``plan.orientation`` → resample to ``plan.target_spacing`` → normalise intensities.

This is the one implementation that :class:`medunet.inference.Predictor` (``medunet segment``, the
bundles' ``inferring`` and ``evaluating``, the MONAI Label app) runs, and it equals
:func:`medunet.data.transforms.val_transforms` (MONAI's ``CropForegroundd`` → ``Orientationd`` →
``Spacingd`` → normalisation) voxel for voxel: the geometric steps are MONAI's own ``Orientation`` and
``Spacing`` (:meth:`medunet.data.grid.PlanGrid.resample_image`), and ``tests/test_preprocess.py``
compares the two. :func:`preprocess_case` also brings a label into the same grid (nearest neighbour), so
training caches can be filled from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medunet.data.grid import PlanGrid
from medunet.data.plan import Plan, normalize_intensity
from medunet.io import ImageData, InputError

__all__ = ["nonzero_box", "nonzero_box_affine", "plan_spacing", "channels_first", "preprocess_tensor",
           "preprocess_case", "PreprocessedCase"]


def nonzero_box(x: torch.Tensor) -> tuple[slice, ...]:
    """Bounding box of voxels nonzero in any channel of ``x`` (C, *S) — the crop of training's
    ``CropForegroundd(select_fn=nonzero_region)``; the whole image when everything is zero."""
    mask = (x != 0).any(dim=0)
    if not bool(mask.any()):
        return tuple(slice(0, s) for s in mask.shape)
    box = []
    for axis in range(mask.dim()):
        other = tuple(a for a in range(mask.dim()) if a != axis)
        hits = torch.nonzero(mask.any(dim=other) if other else mask).flatten()
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def nonzero_box_affine(affine: np.ndarray, box: Sequence[slice]) -> np.ndarray:
    """The 4×4 affine of the sub-grid ``box`` (slices starting at voxel ``start``) of an image."""
    affine = np.asarray(affine, dtype=np.float64)
    out = affine.copy()
    start = np.array([b.start or 0 for b in box], dtype=np.float64)
    out[:3, 3] = affine[:3, 3] + affine[:3, : len(box)] @ start
    return out


def plan_spacing(plan: Plan, spatial_dims: int) -> list[float] | None:
    """The spacing an image of ``spatial_dims`` axes is resampled to: the plan's; a 2D plan keeps a
    volume's slice spacing (0 = keep, as training's ``Spacingd``); ``None`` keeps the spacing."""
    spacing = plan.target_spacing
    if spacing is None:
        return None
    spacing = [float(s) for s in spacing]
    if plan.spatial_dims == 2 and spatial_dims == 3:
        spacing = spacing[:2] + [0.0]
    return spacing[:spatial_dims]


def channels_first(image: ImageData) -> torch.Tensor:
    """``(C, *S)`` float32 tensor of an image (a trailing channel axis moved first), sharing the
    image's memory when it is float32 already (strides as they are).

    Raises:
        InputError: naming the file for an array that is neither ``(*S)`` nor ``(*S, C)``, or empty.
    """
    arr = np.asarray(image.array, dtype=np.float32)
    spatial = image.spatial_dims
    if arr.ndim == spatial:
        arr = arr[None]
    elif arr.ndim == spatial + 1:
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise InputError(image.path, f"unexpected array shape {arr.shape}")
    if min(arr.shape[1:]) < 1:
        raise InputError(image.path, f"empty image {image.spatial_shape}")
    if any(s < 0 for s in arr.strides) or not arr.flags.writeable:
        arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr)  # a view: NIfTI arrays are Fortran-ordered, and copying one costs its size


def preprocess_tensor(x: torch.Tensor, affine: np.ndarray, plan: Plan,
                      normalize: bool = True) -> tuple[torch.Tensor, PlanGrid, tuple[slice, ...]]:
    """Preprocess ``x`` (C, *S) with its 4×4 RAS ``affine`` (on ``x.device``).

    Returns:
        ``(image in plan space (C, *P) float32, its PlanGrid (cropped image grid ↔ plan grid), the
        nonzero crop box in x)``; ``normalize=False`` stops before intensity normalisation (e.g. HU).
    """
    d = x.dim() - 1
    box = nonzero_box(x)
    cropped = x[(slice(None), *box)]
    xp, grid = PlanGrid.resample_image(cropped, nonzero_box_affine(affine, box), plan.orientation,
                                       plan_spacing(plan, d))
    if normalize:
        xp = normalize_intensity(xp, plan.normalization)
    return xp, grid, box


@dataclass
class PreprocessedCase:
    """One case in plan space.

    Attributes:
        image: float32 ``(C, *P)``, normalised.
        label: float32 ``(1, *P)`` (nearest-neighbour resampled class values) or ``None``.
        grid: the :class:`PlanGrid` between the cropped input grid and ``P``.
        box: the nonzero crop box in the input grid.
    """

    image: torch.Tensor
    label: torch.Tensor | None
    grid: PlanGrid
    box: tuple[slice, ...]


def preprocess_case(image: ImageData, plan: Plan, label: ImageData | None = None,
                    device: str | torch.device = "cpu") -> PreprocessedCase:
    """:func:`preprocess_tensor` of an image read with :func:`medunet.io.read_image`, and its label
    cropped to the same box and resampled onto the same plan grid by nearest neighbour (what
    ``val_transforms(plan)`` gives for ``{"image", "label"}``).

    Raises:
        InputError: naming the label file when its shape differs from the image's.
    """
    x = channels_first(image).to(device)
    xp, grid, box = preprocess_tensor(x, image.affine, plan)
    lp = None
    if label is not None:
        y = channels_first(label).to(device)
        if tuple(y.shape[1:]) != tuple(x.shape[1:]):
            raise InputError(label.path, f"label shape {tuple(y.shape[1:])} does not match image {image.path} "
                                         f"{tuple(x.shape[1:])}")
        lp, _ = PlanGrid.resample_image(y[(slice(None), *box)], nonzero_box_affine(image.affine, box),
                                        plan.orientation, plan_spacing(plan, y.dim() - 1), mode="nearest")
    return PreprocessedCase(image=xp, label=lp, grid=grid, box=box)
