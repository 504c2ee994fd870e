"""Building blocks shared by the CT, MRI and cell phantoms: random smooth fields, deformed ellipsoids,
orientation/oblique affines.

All shapes are spatial, in NIfTI axis order ``(X, Y[, Z])``; coordinates are millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform


@dataclass
class PhantomCase:
    """One generated case.

    Attributes:
        image: ``(X, Y[, Z])`` intensities (CT: int16 HU; MRI: float32; cells: uint8).
        label: same shape, uint8 class values.
        affine: 4×4 voxel-to-world (RAS, mm) matrix shared by image and label.
        instances: same shape, uint16 instance ids (0 = background) for instance-aware kinds, else None.
        info: free-form facts about the case (orientation, spacing, …) for reports and tests.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    instances: np.ndarray | None = None
    info: dict = field(default_factory=dict)


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], nodes: int | tuple[int, ...] = 4,
                 amplitude: float = 1.0) -> np.ndarray:
    """A smooth random field: Gaussian values on a coarse grid of ``nodes`` points per axis,
    interpolated (bi/trilinear, then once more at half-way for smoothness) to ``shape``.

    Returns a float32 array of ``shape`` with roughly unit standard deviation times ``amplitude``.
    """
    dims = len(shape)
    if isinstance(nodes, int):
        nodes = (nodes,) * dims
    coarse = rng.standard_normal(tuple(max(2, int(n)) for n in nodes)).astype(np.float32)
    t = torch.from_numpy(coarse)[None, None]
    mode = "bilinear" if dims == 2 else "trilinear"
    # two-stage upsampling: bicubic-like smoothness at a fraction of the cost of a cubic spline
    mid = tuple(max(2, min(int(s), 4 * int(n))) for s, n in zip(shape, nodes))
    t = F.interpolate(t, size=mid, mode="bicubic" if dims == 2 else "trilinear", align_corners=True)
    t = F.interpolate(t * float(amplitude), size=tuple(int(s) for s in shape), mode=mode, align_corners=True)
    return t[0, 0].numpy()


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A 3×3 rotation by up to ``max_degrees`` about a random axis."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis) + 1e-12
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def axis_slices(coords: list[np.ndarray], center: np.ndarray, radius) -> tuple[slice, ...]:
    """Index ranges of the voxels whose coordinates lie within ``radius`` mm (scalar or per axis) of
    ``center`` along each axis."""
    out = []
    radii = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(coords),))
    for c, x0, radius in zip(coords, center, radii):
        idx = np.nonzero(np.abs(c - x0) <= radius)[0]
        out.append(slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0))
    return tuple(out)


@dataclass
class Blob:
    """A deformed ellipsoid: ``|R^T (p - center) / semi_axes| < 1 + wobble(p)``.

    ``wobble`` is a sum of a few random low-frequency sinusoids of the position, so the surface is
    irregular but smooth and the shape is evaluated exactly at any resolution.
    """

    center: np.ndarray
    semi_axes: np.ndarray
    rotation: np.ndarray
    wave_vectors: np.ndarray  # (K, 3) in 1/mm
    wave_phases: np.ndarray  # (K,)
    wave_amplitude: float

    @classmethod
    def random(cls, rng: np.random.Generator, center, semi_axes, max_tilt: float = 20.0,
               irregularity: float = 0.12, waves: int = 4) -> Blob:
        semi_axes = np.asarray(semi_axes, dtype=np.float64)
        wavelength = rng.uniform(0.8, 1.6, size=waves) * float(semi_axes.mean())
        dirs = rng.standard_normal((waves, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        return cls(center=np.asarray(center, dtype=np.float64), semi_axes=semi_axes,
                   rotation=random_rotation(rng, max_tilt),
                   wave_vectors=dirs * (2 * np.pi / wavelength)[:, None],
                   wave_phases=rng.uniform(0, 2 * np.pi, size=waves), wave_amplitude=irregularity)

    @property
    def extent(self) -> np.ndarray:
        """Half-size (mm) of the world-axis-aligned box that holds the blob, per axis."""
        half = np.sqrt(((self.rotation * self.semi_axes[None, :]) ** 2).sum(axis=1))
        return half * (1 + self.wave_amplitude * 2) + 1.0

    def level(self, coords: list[np.ndarray]) -> tuple[tuple[slice, ...], np.ndarray]:
        """Evaluate the shape function near the blob.

        Args:
            coords: per-axis voxel-centre coordinates in mm (three 1D arrays of length X, Y, Z).

        Returns:
            ``(region, value)``: the index box around the blob and the values of
            ``|R^T (p - c) / a| - 1 - wobble`` inside it (negative inside the blob).
        """
        region = axis_slices(coords, self.center, self.extent)
        # float32 throughout: these arrays can hold millions of voxels
        grids = np.meshgrid(*[(c[s] - np.float32(x0)).astype(np.float32) for c, s, x0 in
                              zip(coords, region, self.center)], indexing="ij", sparse=True)
        q = np.float32(0.0)
        for k in range(3):  # scale each rotated coordinate by 1/semi-axis, then sum the squares
            w = self.rotation[:, k] / self.semi_axes[k]
            u = grids[0] * np.float32(w[0]) + grids[1] * np.float32(w[1]) + grids[2] * np.float32(w[2])
            q = q + u * u
        level = np.sqrt(q, dtype=np.float32)
        scale = np.float32(self.wave_amplitude / np.sqrt(len(self.wave_phases)))
        for vec, phase in zip(self.wave_vectors, self.wave_phases):
            arg = grids[0] * np.float32(vec[0]) + grids[1] * np.float32(vec[1]) + (grids[2] * np.float32(vec[2])
                                                                                  + np.float32(phase))
            level -= np.sin(arg) * scale
        level -= np.float32(1.0)
        return region, level

    def paint(self, target: np.ndarray, value, coords: list[np.ndarray], where: np.ndarray | None = None) -> None:
        """Set ``target`` to ``value`` inside the blob (and inside ``where`` when given)."""
        region, lev = self.level(coords)
        inside = lev < 0
        if where is not None:
            inside &= where[region]
        target[region][inside] = value


def reorient(arrays: list[np.ndarray], affine: np.ndarray, axcodes: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Store RAS-ordered ``arrays`` in the voxel order ``axcodes`` without changing world positions.

    Returns the permuted/flipped arrays and the matching affine (the anatomy stays where it was).
    """
    shape = arrays[0].shape
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(axcodes)))
    new_affine = affine @ inv_ornt_aff(transform, shape)
    return [np.ascontiguousarray(apply_orientation(a, transform)) for a in arrays], new_affine


def tilt_affine(affine: np.ndarray, rotation: np.ndarray, center_world: np.ndarray) -> np.ndarray:
    """Rotate the voxel grid (and hence the anatomy) about ``center_world``: an oblique acquisition."""
    turn = np.eye(4)
    turn[:3, :3] = rotation
    turn[:3, 3] = center_world - rotation @ center_world
    return turn @ affine


def centered_coords(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    """Per-axis voxel-centre coordinates (mm) with the grid centred on 0."""
    return [((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(shape, spacing)]


def centered_affine(shape: tuple[int, ...], spacing: tuple[float, ...], offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS affine (diagonal spacing) placing the grid centre at ``offset`` mm (2D grids get z = 0)."""
    aff = np.eye(4)
    for k, (n, s) in enumerate(zip(shape, spacing)):
        aff[k, k] = s
        aff[k, 3] = offset[k] - (n - 1) / 2.0 * s
    return aff
