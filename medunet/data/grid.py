"""The grid a plan predicts on, and resampling between an image's own grid and that grid.

Training reorients images to ``plan.orientation`` and resamples them to ``plan.target_spacing`` with
MONAI's ``Orientation`` and ``Spacing``. :meth:`PlanGrid.resample_image` runs exactly those transforms
(on the compute device) so the network sees bit-for-bit what validation saw, and records the grid;
:meth:`PlanGrid.for_image` computes the same grid without any data. :meth:`PlanGrid.from_plan` maps
predictions back onto the input's exact voxel grid in one chunked pass: axis by axis when the map is a
reorientation plus a spacing change (every grid that is not oblique to the plan), ``grid_sample``
otherwise.

Voxel-index convention everywhere: the affine maps voxel *centres* ``(i, j, k, 1)`` to world mm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import compute_shape_offset, to_affine_nd, zoom_affine
from monai.transforms import Orientation, Spacing

__all__ = ["PlanGrid", "resample_grid", "reoriented_affine"]

_CHUNK_VOXELS = 1 << 21  # output voxels per grid_sample call (bounds the sampling grid's memory: ~20 B each)


def _orientation_change(affine: np.ndarray, axcodes: str) -> np.ndarray:
    """nibabel's ``(d, 2)`` orientation transform from ``affine``'s ((d+1)×(d+1), RAS world) voxel axes to
    ``axcodes``: per source axis, the target axis and whether it flips."""
    return nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(axcodes))


def reoriented_affine(affine: np.ndarray, shape: Sequence[int], axcodes: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine and shape after MONAI's ``Orientation(axcodes)``: ``(affine_nd, shape)``.

    ``affine`` is ``(d+1)×(d+1)`` for ``d = len(shape)`` spatial axes (RAS world).
    """
    d = len(shape)
    affine = np.asarray(affine, dtype=np.float64)
    ornt = _orientation_change(affine, axcodes[:d])
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    new_shape = tuple(int(shape[int(a)]) for a in np.argsort(ornt[:, 0]))
    return new_affine, new_shape


@dataclass(frozen=True)
class PlanGrid:
    """An image grid and the plan's grid for it.

    Attributes:
        image_affine: ``(d+1)×(d+1)`` voxel-to-world matrix of the input image.
        image_shape: spatial shape of the input image.
        plan_affine: voxel-to-world matrix of the grid the network sees.
        plan_shape: spatial shape of that grid.
    """

    image_affine: np.ndarray
    image_shape: tuple[int, ...]
    plan_affine: np.ndarray
    plan_shape: tuple[int, ...]

    @classmethod
    def for_image(
        cls,
        affine: np.ndarray,
        shape: Sequence[int],
        orientation: str | None = "RAS",
        target_spacing: Sequence[float] | None = None,
    ) -> PlanGrid:
        """The grid MONAI's ``Orientation(orientation)`` then ``Spacing(target_spacing)`` produce.

        Args:
            affine: 4×4 RAS voxel-to-world matrix of the image (as in ``ImageData.affine``).
            shape: spatial shape ``(X, Y[, Z])``.
            orientation: axcodes, or ``None`` to keep the voxel order.
            target_spacing: mm per axis in the reoriented frame (non-positive: keep that axis' spacing),
                or ``None`` to keep the spacing.
        """
        shape = tuple(int(s) for s in shape)
        d = len(shape)
        image_affine = to_affine_nd(d, np.asarray(affine, dtype=np.float64))
        plan_affine, plan_shape = image_affine, shape
        if orientation:
            plan_affine, plan_shape = reoriented_affine(image_affine, shape, orientation)
        if target_spacing is not None:
            spacing = np.asarray([float(s) for s in target_spacing][:d], dtype=np.float64)
            if spacing.size != d:
                raise ValueError(f"target spacing {list(target_spacing)} does not fit a {d}D image")
            # like MONAI's Spacing: a non-positive entry keeps that axis' spacing
            zoomed = zoom_affine(plan_affine, spacing, diagonal=False)
            out_shape, offset = compute_shape_offset(plan_shape, plan_affine, zoomed, False)
            zoomed[:d, -1] = offset[:d]
            plan_affine, plan_shape = zoomed, tuple(int(max(s, 1)) for s in out_shape)
        return cls(image_affine, shape, np.asarray(plan_affine, dtype=np.float64), tuple(plan_shape))

    @classmethod
    def resample_image(
        cls,
        x: torch.Tensor,
        affine: np.ndarray,
        orientation: str | None = "RAS",
        target_spacing: Sequence[float] | None = None,
        mode: str = "bilinear",
    ) -> tuple[torch.Tensor, PlanGrid]:
        """Training's ``Orientation`` → ``Spacing`` applied to ``x`` (C, *S) with its 4×4 RAS ``affine``.

        Returns ``(x in plan space (C, *plan_shape) float32, the grid)``; identical to MONAI's output
        (its transforms do the work), on ``x.device``.
        """
        d = x.dim() - 1
        affine4 = np.asarray(affine, dtype=np.float64)
        img = MetaTensor(x, affine=torch.as_tensor(affine4, dtype=torch.float64))
        with torch.no_grad():
            if orientation:
                img = _reorient(img, orientation[:d])
            if target_spacing is not None:
                img = Spacing(pixdim=[float(s) for s in target_spacing], mode=mode, dtype=torch.float32)(img)
        plan_affine = to_affine_nd(d, np.asarray(img.affine.cpu(), dtype=np.float64))
        grid = cls(to_affine_nd(d, affine4), tuple(int(s) for s in x.shape[1:]), plan_affine,
                   tuple(int(s) for s in img.shape[1:]))
        return img.as_tensor().float(), grid

    @property
    def spatial_dims(self) -> int:
        return len(self.image_shape)

    @property
    def plan_spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.plan_affine[:-1, :-1], axis=0))

    def to_plan(self, x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """``(C, *image_shape)`` → ``(C, *plan_shape)`` (``mode`` ``"bilinear"`` or ``"nearest"``) by one
        ``grid_sample`` pass; equal to :meth:`resample_image` up to float rounding."""
        index_map = np.linalg.solve(self.image_affine, self.plan_affine)  # plan voxel -> image voxel
        return resample_grid(x, index_map, self.plan_shape, mode)

    def from_plan(self, x: torch.Tensor, mode: str = "bilinear",
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``(C, *plan_shape)`` → ``(C, *image_shape)``: back onto the input's exact voxel grid
        (``reduce``: see :func:`resample_grid`; then ``(*image_shape)``)."""
        index_map = np.linalg.solve(self.plan_affine, self.image_affine)  # image voxel -> plan voxel
        return resample_grid(x, index_map, self.image_shape, mode, reduce=reduce)


def _reorient(img: MetaTensor, axcodes: str) -> MetaTensor:
    """MONAI's ``Orientation(axcodes)`` of ``img`` (C, *S), the same voxels and affine, as one
    C-contiguous copy: MONAI flips (a copy that keeps a NIfTI array's Fortran strides) and permutes
    (a view), and ``Spacing`` then copies again to make it contiguous — three input-sized arrays at
    once on a large CT instead of two."""
    pending = Orientation(axcodes=axcodes, labels=None, lazy=True)(MetaTensor(img.as_tensor(), affine=img.affine))
    affine = pending.peek_pending_affine()
    ornt = _orientation_change(to_affine_nd(img.dim() - 1, np.asarray(img.affine, dtype=np.float64)), axcodes)
    flips = [1 + a for a in range(len(ornt)) if ornt[a, 1] == -1]
    order = [0, *(1 + int(a) for a in np.argsort(ornt[:, 0]))]
    data = img.as_tensor()
    if data.device.type == "cpu":  # numpy views take negative strides: flip, permute and copy at once
        view = data.numpy()[tuple(slice(None, None, -1) if a in flips else slice(None) for a in range(data.dim()))]
        out = torch.from_numpy(np.ascontiguousarray(view.transpose(order)))
    else:
        out = (data.flip(flips) if flips else data).permute(order).contiguous()
    if tuple(out.shape[1:]) != tuple(int(s) for s in pending.peek_pending_shape()):
        raise AssertionError(f"reorientation gave {tuple(out.shape[1:])}, MONAI {pending.peek_pending_shape()}")
    return MetaTensor(out, affine=affine)


def _as_permutation(index_map: np.ndarray, src_shape: Sequence[int], dst_shape: Sequence[int]):
    """``(axes, flips, offsets)`` when ``index_map`` only permutes/flips/shifts whole voxels, else None."""
    d = len(src_shape)
    lin, shift = index_map[:d, :d], index_map[:d, d]
    rounded = np.round(lin)
    if not np.allclose(lin, rounded, atol=1e-6) or not np.allclose(shift, np.round(shift), atol=1e-4):
        return None
    if not (np.abs(rounded).sum(axis=0) == 1).all() or not (np.abs(rounded).sum(axis=1) == 1).all():
        return None
    axes = [int(np.nonzero(rounded[:, j])[0][0]) for j in range(d)]  # dst axis j reads src axis axes[j]
    signs = [int(rounded[axes[j], j]) for j in range(d)]
    offsets = [int(round(shift[axes[j]])) for j in range(d)]
    for j in range(d):
        first = offsets[j]
        last = offsets[j] + signs[j] * (dst_shape[j] - 1)
        if min(first, last) < 0 or max(first, last) > src_shape[axes[j]] - 1:
            return None  # would need padding: leave it to grid_sample
    return axes, signs, offsets


def resample_grid(x: torch.Tensor, index_map: np.ndarray, dst_shape: Sequence[int], mode: str = "bilinear",
                  padding_mode: str = "border",
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Sample ``x`` (C, *src) at ``index_map @ (dst voxel, 1)``, giving ``(C, *dst_shape)``.

    Whole-voxel permutations/flips/shifts are done exactly by indexing; anything else by
    ``grid_sample`` (trilinear/bilinear or nearest, ``padding_mode`` outside the source) in chunks so
    the sampling grid stays small. Runs on ``x.device``; keeps ``x.dtype`` for floating inputs.

    ``reduce`` (e.g. an argmax over the channels) is applied to each resampled chunk ``(C, *chunk)``
    and must return ``(*chunk)``: the result is then ``(*dst_shape)`` in the reduced dtype, and the
    ``C``-channel output never exists in full (a label map of a large CT without its probability maps).
    """
    d = x.dim() - 1
    src_shape = tuple(x.shape[1:])
    dst_shape = tuple(int(s) for s in dst_shape)
    index_map = np.asarray(index_map, dtype=np.float64)
    perm = _as_permutation(index_map, src_shape, dst_shape)
    if perm is not None:
        axes, signs, offsets = perm
        y = x.permute(0, *[a + 1 for a in axes])
        for j in range(d):
            if signs[j] < 0:
                y = y.flip(j + 1)
                start = src_shape[axes[j]] - 1 - offsets[j]
            else:
                start = offsets[j]
            y = y.narrow(j + 1, start, dst_shape[j])
        if reduce is None:
            return y.contiguous()
        return _reduced_chunks(y, reduce)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    axis_aligned = _as_axis_aligned(index_map)
    if axis_aligned is not None and mode in ("bilinear", "nearest") and padding_mode == "border":
        return _separable(x.to(dtype), *axis_aligned, dst_shape, mode, reduce)
    src = x.to(dtype).unsqueeze(0)
    # grid_sample wants normalised (align_corners=False) coordinates, last spatial axis first.
    scale = torch.tensor([2.0 / s for s in reversed(src_shape)], dtype=torch.float64, device=x.device)
    lin = torch.as_tensor(index_map[:d, :d], dtype=torch.float64, device=x.device)
    shift = torch.as_tensor(index_map[:d, d], dtype=torch.float64, device=x.device)
    out = torch.empty((x.shape[0], *dst_shape), dtype=dtype, device=x.device) if reduce is None else None
    plane = int(np.prod(dst_shape[1:])) if d > 1 else 1
    step = max(1, _CHUNK_VOXELS // max(plane, 1))
    rest = [torch.arange(s, dtype=torch.float64, device=x.device) for s in dst_shape[1:]]
    for start in range(0, dst_shape[0], step):
        first = torch.arange(start, min(start + step, dst_shape[0]), dtype=torch.float64, device=x.device)
        coords = torch.stack(torch.meshgrid(first, *rest, indexing="ij"), dim=-1)  # (*chunk, d) dst index
        src_idx = coords @ lin.T + shift  # (*chunk, d) src index
        grid = ((src_idx.flip(-1) + 0.5) * scale - 1.0).to(torch.float32 if dtype != torch.float64 else dtype)
        sampled = F.grid_sample(src, grid.unsqueeze(0).to(dtype), mode=mode, padding_mode=padding_mode,
                                align_corners=False)
        if reduce is None:
            out[:, start:start + first.numel()] = sampled[0]
            continue
        part = reduce(sampled[0])
        if out is None:
            out = torch.empty(dst_shape, dtype=part.dtype, device=x.device)
        out[start:start + first.numel()] = part
    return out


def _as_axis_aligned(index_map: np.ndarray) -> tuple[list[int], list[float], list[float]] | None:
    """``(axes, scales, shifts)`` when ``index_map`` maps every dst axis ``j`` to one src axis
    ``axes[j]`` alone (``src = scales[j] * dst + shifts[j]``: a reorientation and a spacing change, no
    rotation), else None."""
    d = index_map.shape[0] - 1
    lin = index_map[:d, :d]
    tol = 1e-9 * max(1.0, float(np.abs(lin).max()))
    nonzero = np.abs(lin) > tol
    if not (nonzero.sum(axis=0) == 1).all() or not (nonzero.sum(axis=1) == 1).all():
        return None
    axes = [int(np.nonzero(nonzero[:, j])[0][0]) for j in range(d)]
    return axes, [float(lin[axes[j], j]) for j in range(d)], [float(index_map[axes[j], d]) for j in range(d)]


def _axis_weights(scale: float, shift: float, n_dst: int, n_src: int, mode: str, device: torch.device,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Source indices and weights of one axis as ``grid_sample`` (align_corners=False, border padding)
    computes them: ``(lower index, upper index, weight of the upper)`` for ``"bilinear"``, ``(nearest
    index, same, None)`` for ``"nearest"``; the position is clamped to ``[0, n_src - 1]`` first."""
    pos = (torch.arange(n_dst, dtype=torch.float64, device=device) * scale + shift).clamp_(0, n_src - 1)
    if mode == "nearest":
        idx = torch.round(pos).long()  # round half to even, as grid_sample's nearest
        return idx, idx, None
    low = pos.floor()
    weight = (pos - low).float()
    low = low.long()
    return low, (low + 1).clamp_(max=n_src - 1), weight


def _lerp_axis(y: torch.Tensor, dim: int, low: torch.Tensor, high: torch.Tensor,
               weight: torch.Tensor | None) -> torch.Tensor:
    """``y`` sampled along ``dim`` at ``low``/``high`` and linearly mixed (``weight`` of ``high``)."""
    a = y.index_select(dim, low)
    if weight is None:
        return a
    shape = [1] * y.dim()
    shape[dim] = -1
    w = weight.to(y.dtype).view(shape)
    return a.lerp_(y.index_select(dim, high), w)


def _separable(x: torch.Tensor, axes: list[int], scales: list[float], shifts: list[float],
               dst_shape: tuple[int, ...], mode: str,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """:func:`resample_grid` for an axis-aligned map, one axis at a time (linear or nearest along each:
    the same values as ``grid_sample``'s bi/trilinear up to float rounding, a fraction of its time),
    a few planes of the first dst axis per step so every intermediate stays small."""
    d = x.dim() - 1
    y = x.permute(0, *[a + 1 for a in axes])  # a view whose axis j is dst axis j's source axis
    src_shape = tuple(y.shape[1:])
    weights = [_axis_weights(scales[j], shifts[j], dst_shape[j], src_shape[j], mode, x.device) for j in range(d)]
    widest = max(int(np.prod([max(src_shape[k], dst_shape[k]) for k in range(1, d)])) if d > 1 else 1, 1)
    step = max(1, _CHUNK_VOXELS // (widest * max(1, x.shape[0])))
    out = None
    for start in range(0, dst_shape[0], step):
        stop = min(start + step, dst_shape[0])
        low, high, w = (t[start:stop] if t is not None else None for t in weights[0])
        first, last = int(low.min()), int(high.max()) + 1
        part = _lerp_axis(y[:, first:last], 1, low - first, high - first, w)
        for j in range(1, d):
            part = _lerp_axis(part, j + 1, *weights[j])
        if reduce is not None:
            part = reduce(part)
            if out is None:
                out = torch.empty(dst_shape, dtype=part.dtype, device=x.device)
            out[start:stop] = part
        else:
            if out is None:
                out = torch.empty((x.shape[0], *dst_shape), dtype=part.dtype, device=x.device)
            out[:, start:stop] = part
    return out


def _reduced_chunks(y: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``reduce`` over a ``(C, *S)`` view, a few planes of the first spatial axis at a time."""
    plane = int(np.prod(y.shape[2:])) if y.dim() > 2 else 1
    step = max(1, _CHUNK_VOXELS // max(plane, 1))
    parts = [reduce(y[:, start:start + step]) for start in range(0, y.shape[1], step)]
    return torch.cat(parts, dim=0) if parts else reduce(y)
