"""2D light-microscopy phantom: clusters of touching cells separated by thin background gaps.

This is the seed paper's setting (ISBI cell images): the semantic label is cell vs background, and the
instance map tells touching cells apart so the border weight map can emphasise the 1–3 pixel gaps.
Cells are the regions of a Voronoi tessellation of jittered seed points, cut back to a per-cell radius
(so some cells touch and others float free) and shrunk away from the bisectors to leave a gap.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from medunet.data.phantoms._common import PhantomCase, smooth_field

LABELS = {"background": 0, "cell": 1}
MODALITY = "microscopy"
SPATIAL_DIMS = 2
SMALL_SHAPE = (96, 96)
DEFAULT_SHAPE = (512, 512)


def make_case(rng: np.random.Generator, size="default") -> PhantomCase:
    """Generate one cell image; ``size`` is ``"small"``, ``"default"`` or an explicit ``(X, Y)``."""
    if size == "small":
        shape = SMALL_SHAPE
    elif size == "default":
        shape = DEFAULT_SHAPE
    else:
        shape = tuple(int(s) for s in size)
    if len(shape) != 2:
        raise ValueError(f"cells are 2D: size must have 2 axes, got {shape}")
    radius = rng.uniform(0.09, 0.13) * min(shape) if min(shape) < 200 else rng.uniform(18.0, 30.0)
    instances, nucleus = _tessellate(rng, shape, radius)

    image = np.full(shape, rng.uniform(0.2, 0.35), dtype=np.float32)
    n = int(instances.max())
    brightness = rng.uniform(0.55, 0.85, size=n + 1).astype(np.float32)
    brightness[0] = 0.0
    cells = instances > 0
    image[cells] = brightness[instances[cells]]
    image[nucleus] -= np.float32(rng.uniform(0.1, 0.2))
    image += smooth_field(rng, shape, max(3, min(shape) // 12), amplitude=0.04) * cells
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.5, 0.9))  # optics blur the gaps
    image += smooth_field(rng, shape, 3, amplitude=0.05)  # uneven illumination
    image += rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(0.02, 0.05))
    image8 = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return PhantomCase(image=image8, label=cells.astype(np.uint8), affine=np.eye(4),
                       instances=instances.astype(np.uint16),
                       info={"cells": n, "radius_px": float(radius), "shape": shape})


def _tessellate(rng: np.random.Generator, shape, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Instance map (0 = background, 1…N cells) and the nucleus mask."""
    # Seeds by dart throwing with a minimum spacing, in clusters so that groups of cells touch.
    area = float(np.prod(shape))
    target = int(area / (np.pi * radius**2) * rng.uniform(0.6, 0.9)) + 2
    seeds: list[np.ndarray] = []
    min_dist = 1.5 * radius
    for _ in range(target * 30):
        if len(seeds) >= target:
            break
        p = rng.uniform(0, 1, size=2) * np.asarray(shape)
        if not seeds or np.min(np.linalg.norm(np.asarray(seeds) - p, axis=1)) >= min_dist:
            seeds.append(p)
    pts = np.asarray(seeds)
    extent = rng.uniform(0.85, 1.35, size=len(pts)) * radius  # some cells reach their neighbours
    gap = rng.uniform(1.0, 1.6)  # half-width of the background gap between touching cells, pixels

    grid = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), axis=-1)
    flat = grid.reshape(-1, 2).astype(np.float64) + 0.5
    wobble = smooth_field(rng, shape, max(3, int(min(shape) / radius * 2)), amplitude=0.08).reshape(-1)
    k = min(2, len(pts))
    dist, idx = cKDTree(pts).query(flat, k=k)
    if k == 1:
        dist, idx = dist[:, None], idx[:, None]
    nearest = idx[:, 0]
    d1 = dist[:, 0]
    inside = d1 < extent[nearest] * (1.0 + wobble)
    if k == 2:
        # distance to the bisector between the nearest and second-nearest seed
        sep = np.linalg.norm(pts[idx[:, 1]] - pts[nearest], axis=1)
        to_bisector = (dist[:, 1] ** 2 - d1**2) / (2 * np.maximum(sep, 1e-6))
        inside &= to_bisector > gap
    nucleus = (d1 < 0.35 * extent[nearest]) & inside

    labels = np.where(inside, nearest + 1, 0).reshape(shape)
    # Renumber 1…N, dropping seeds whose cell vanished; split nothing (each region is one cell).
    present = np.unique(labels[labels > 0])
    lut = np.zeros(len(pts) + 1, dtype=np.int64)
    lut[present] = np.arange(1, len(present) + 1)
    return lut[labels], nucleus.reshape(shape)
