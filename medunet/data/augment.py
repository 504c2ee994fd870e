"""The seed U-Net's elastic deformation as a MONAI dictionary transform (2D and 3D).

Ronneberger et al. (2015): random displacement vectors on a coarse grid (3 points per axis), drawn from
a Gaussian with σ = 10 pixels, interpolated smoothly (cubic) to a per-voxel displacement field; the image
is resampled with linear/cubic interpolation, the label with nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import ensure_tuple_rep
from scipy import ndimage

__all__ = ["RandElasticDeformd", "coarse_to_dense", "random_displacement_field", "warp"]

_MODES = ("nearest", "bilinear", "bicubic")
_PADDING = ("zeros", "border", "reflection")


@lru_cache(maxsize=64)
def _cubic_weights(points: int, size: int) -> np.ndarray:
    """``(size, points)`` matrix that cubic-spline-interpolates ``points`` grid values (corners aligned)
    to ``size`` samples; separable, so a D-dimensional field is D small matrix products."""
    if points == 1:
        return np.ones((size, 1))
    eye = np.eye(points)
    weights = ndimage.zoom(eye, (size / points, 1.0), order=3, mode="mirror", grid_mode=False)
    return np.ascontiguousarray(weights[:size])


def coarse_to_dense(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Cubic interpolation of a coarse displacement grid to a dense field.

    Args:
        coarse: ``(D, g_1, …, g_D)`` displacements (voxels) at grid nodes spanning the image corners.
        shape: dense spatial shape ``(n_1, …, n_D)``.

    Returns:
        ``(D, n_1, …, n_D)`` float32; equal to ``coarse`` at the node positions.
    """
    field = np.asarray(coarse, dtype=np.float64)
    for axis, n in enumerate(shape):
        w = _cubic_weights(field.shape[axis + 1], int(n))
        field = np.moveaxis(np.tensordot(w, field, axes=([1], [axis + 1])), 0, axis + 1)
    return field.astype(np.float32)


def random_displacement_field(shape: Sequence[int], sigma: float, grid_points: int | Sequence[int] = 3,
                              rng: np.random.RandomState | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw grid displacements ~ N(0, σ²) voxels and interpolate them.

    Returns:
        ``(coarse (D, *g), dense (D, *shape))``.
    """
    rng = rng if rng is not None else np.random.RandomState()
    dims = len(shape)
    points = tuple(int(g) for g in ensure_tuple_rep(grid_points, dims))
    if any(g < 1 for g in points):
        raise ValueError(f"grid_points must be >= 1, got {points}")
    coarse = rng.normal(0.0, float(sigma), size=(dims, *points))
    return coarse.astype(np.float32), coarse_to_dense(coarse, shape)


def warp(image: torch.Tensor, displacement: np.ndarray | torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "reflection") -> torch.Tensor:
    """Resample ``image`` at ``x + displacement(x)``.

    Args:
        image: ``(C, *S)`` tensor, 2D or 3D.
        displacement: ``(D, *S)`` in voxels, component ``k`` along spatial axis ``k``.
        mode: ``"nearest"`` (labels), ``"bilinear"`` (trilinear in 3D) or ``"bicubic"`` (2D via torch,
            3D via a cubic spline, ``scipy.ndimage.map_coordinates``).
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"`` (the seed mirrors at borders).

    Returns:
        ``(C, *S)`` tensor of the input's dtype.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if padding_mode not in _PADDING:
        raise ValueError(f"padding_mode must be one of {_PADDING}, got {padding_mode!r}")
    shape = tuple(image.shape[1:])
    dims = len(shape)
    disp = torch.as_tensor(np.asarray(displacement), dtype=torch.float32)
    if tuple(disp.shape) != (dims, *shape):
        raise ValueError(f"displacement shape {tuple(disp.shape)} does not match image {tuple(image.shape)}")
    data = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    dtype = data.dtype
    if mode == "bicubic" and dims == 3:
        out = _spline_warp(data, disp.numpy(), padding_mode)
        return out.to(dtype)
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (D, *S) voxel coordinates
    coords = grid + disp
    # grid_sample wants (x = last axis, …, first axis) in [-1, 1] (align_corners=True)
    norm = [2.0 * coords[k] / max(shape[k] - 1, 1) - 1.0 for k in range(dims)]
    sample_grid = torch.stack(norm[::-1], dim=-1).unsqueeze(0)
    torch_mode = "bilinear" if mode == "bilinear" else mode
    out = F.grid_sample(data.float().unsqueeze(0), sample_grid, mode=torch_mode, padding_mode=padding_mode,
                        align_corners=True)[0]
    return out.to(dtype) if dtype.is_floating_point else out.round().to(dtype)


def _spline_warp(data: torch.Tensor, disp: np.ndarray, padding_mode: str) -> torch.Tensor:
    mode = {"zeros": "constant", "border": "nearest", "reflection": "mirror"}[padding_mode]
    shape = data.shape[1:]
    coords = np.indices(shape, dtype=np.float32) + disp
    out = [ndimage.map_coordinates(c.float().numpy(), coords, order=3, mode=mode) for c in data]
    return torch.as_tensor(np.stack(out))


class RandElasticDeformd(RandomizableTransform, MapTransform):
    """Random elastic deformation (the seed U-Net's), one field shared by all ``keys``.

    Args:
        keys: keys of ``(C, *S)`` arrays to deform (image(s) and label) — 2D or 3D.
        sigma: standard deviation (voxels) of the random displacements at the coarse grid nodes;
            ``0`` gives the identity.
        grid_points: nodes per axis (int or per-axis), spanning the image corner to corner.
        prob: probability of deforming a sample.
        mode: interpolation per key: ``"bilinear"``/``"bicubic"`` for images, ``"nearest"`` for labels.
        padding_mode: how to sample outside the image (``"reflection"`` mirrors, as the seed does).

    Example:
        >>> t = RandElasticDeformd(["image", "label"], sigma=10, mode=("bilinear", "nearest"))
        >>> out = t({"image": torch.rand(1, 64, 64), "label": torch.zeros(1, 64, 64)})
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float = 10.0,
        grid_points: int | Sequence[int] = 3,
        prob: float = 1.0,
        mode: str | Sequence[str] = ("bilinear", "nearest"),
        padding_mode: str | Sequence[str] = "reflection",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)
        self.grid_points = grid_points
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        for m in self.mode:
            if m not in _MODES:
                raise ValueError(f"mode must be one of {_MODES}, got {m!r}")
        self.last_displacement: np.ndarray | None = None

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        super().randomize(None)
        self.last_displacement = None
        if self._do_transform and self.sigma > 0:
            _, self.last_displacement = random_displacement_field(spatial_shape, self.sigma, self.grid_points,
                                                                  self.R)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        first = next(iter(self.key_iterator(d)), None)
        if first is None:
            return d
        self.randomize(tuple(d[first].shape[1:]))
        if self.last_displacement is None:  # not drawn, or σ = 0: identity
            return d
        for key, mode, pad in self.key_iterator(d, self.mode, self.padding_mode):
            img = d[key]
            out = warp(img, self.last_displacement, mode=mode, padding_mode=pad)
            if isinstance(img, MetaTensor):
                out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
            d[key] = out
        return d
