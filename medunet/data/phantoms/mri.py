"""T1-weighted MRI crop around one hippocampus, like MSD Task04 (labels 1 anterior, 2 posterior).

Each case has its own arbitrary intensity scale, a smooth multiplicative bias field and Rician noise
(the magnitude of a complex signal with Gaussian noise in both channels); voxels are ~1 mm isotropic.
The hippocampus is a curved tube running antero-posteriorly, thick at the head (label 1, anterior) and
thin at the tail (label 2, posterior), with the temporal horn of the lateral ventricle (dark CSF) beside
it, white matter around and grey-matter blobs (amygdala, cortex) nearby.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medunet.data.phantoms._common import (
    Blob,
    PhantomCase,
    axis_slices,
    centered_affine,
    centered_coords,
    smooth_field,
)

LABELS = {"background": 0, "anterior": 1, "posterior": 2}
MODALITY = "MRI"
SPATIAL_DIMS = 3
SMALL_SHAPE = (32, 40, 32)
# T1-weighted relative intensities
WHITE, GREY, HIPPOCAMPUS, CSF = 1.0, 0.55, 0.74, 0.18


def make_case(rng: np.random.Generator, size="default") -> PhantomCase:
    """Generate one MRI case; ``size`` is ``"small"``, ``"default"`` or an explicit ``(X, Y, Z)``."""
    iso = float(rng.choice([1.0, 1.0, rng.uniform(0.9, 1.1)]))
    spacing = (iso, iso, iso * float(rng.uniform(0.97, 1.03)))
    if size == "small":
        shape = SMALL_SHAPE
    elif size == "default":  # like the MSD hippocampus crops (about 34-43 × 47-58 × 31-44 voxels)
        shape = (int(rng.integers(34, 44)), int(rng.integers(47, 59)), int(rng.integers(31, 45)))
    else:
        shape = tuple(int(s) for s in size)
    coords = centered_coords(shape, spacing)
    image, label = _draw_temporal_lobe(rng, shape, coords, min(shape[1] * spacing[1], 52.0))

    image = ndimage.gaussian_filter(image, sigma=0.6 / np.asarray(spacing))  # partial-volume blur
    bias = np.exp(smooth_field(rng, shape, 3, amplitude=rng.uniform(0.1, 0.25)))
    scale = float(np.exp(rng.uniform(np.log(30.0), np.log(3000.0))))
    signal = image * bias * scale
    sigma = rng.uniform(0.03, 0.07) * scale
    real = signal + rng.standard_normal(shape, dtype=np.float32) * sigma
    imag = rng.standard_normal(shape, dtype=np.float32) * sigma
    image = np.sqrt(real * real + imag * imag).astype(np.float32)

    offset = rng.uniform(-30, 30, size=3)
    affine = centered_affine(shape, spacing, offset=offset)
    return PhantomCase(image=image, label=label, affine=affine,
                       info={"axcodes": "RAS", "spacing": spacing, "shape": shape, "scale": scale})


def _draw_temporal_lobe(rng: np.random.Generator, shape, coords, length: float):
    xs, ys, zs = coords
    image = np.full(shape, WHITE, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    # Cortex and sulci: grey matter and CSF where a smooth field is high/low.
    field = smooth_field(rng, shape, 4)
    image[field > 1.0] = GREY
    image[field > 1.8] = CSF

    # Hippocampus centre line: from the head (anterior, +y) to the tail (posterior, −y), rising and
    # curving medially at the tail. ``side`` mirrors left/right crops.
    side = rng.choice([-1.0, 1.0])
    k = 40
    t = np.linspace(0.0, 1.0, k)
    half = 0.38 * length * rng.uniform(0.9, 1.1)
    center_line = np.stack([
        side * (rng.uniform(-2, 2) + rng.uniform(2, 5) * t ** 2),
        half - 2 * half * t,
        rng.uniform(-4, 0) + rng.uniform(4, 9) * t ** 2,
    ], axis=1)
    size = rng.uniform(0.85, 1.15)
    radius_lr = size * (6.0 - 3.5 * t)  # head ~12 mm wide, tail ~5 mm
    radius_is = size * (4.0 - 2.0 * t)
    split = rng.uniform(0.4, 0.5)  # head / body boundary along the line

    # Amygdala: grey matter just anterior-superior of the head (unlabelled, as in MSD).
    amygdala = Blob.random(rng, center_line[0] + np.array([0.0, 4.0, 5.0]), np.array([6.0, 5.0, 4.5]) * size)
    amygdala.paint(image, GREY, coords)
    # Temporal horn of the lateral ventricle: a thin CSF tube above-lateral of the hippocampus.
    horn = center_line + np.stack([side * -2.0 * np.ones(k), np.zeros(k), radius_is + 1.2], axis=1)
    _paint_tube(image, None, coords, horn, 1.4 * np.ones(k), 1.0 * np.ones(k), CSF, None)
    _paint_tube(image, label, coords, center_line, radius_lr, radius_is, HIPPOCAMPUS,
                np.where(t < split, LABELS["anterior"], LABELS["posterior"]))
    # A second grey structure medially (parahippocampal gyrus) keeps the task non-trivial.
    gyrus = Blob.random(rng, center_line[k // 2] + np.array([side * -7.0, 0.0, -5.0]), np.array([3.0, 12.0, 3.0]))
    gyrus.paint(image, GREY, coords, where=label == 0)
    return image, label


def _paint_tube(image, label, coords, line, radius_x, radius_z, value, point_labels) -> None:
    """Paint the union of ellipsoids centred on the points of ``line`` (an (N, 3) array in mm).

    Each voxel takes the label of the point whose ellipsoid it is deepest inside.
    """
    lo, hi = line.min(axis=0), line.max(axis=0)
    reach = float(max(radius_x.max(), radius_z.max())) + 1.0
    region = axis_slices(coords, (lo + hi) / 2, float(np.max((hi - lo) / 2)) + reach)
    gx, gy, gz = np.meshgrid(*[c[s] for c, s in zip(coords, region)], indexing="ij")
    step = float(np.linalg.norm(np.diff(line, axis=0), axis=1).mean())
    best = np.full(gx.shape, np.inf, dtype=np.float32)
    owner = np.zeros(gx.shape, dtype=np.int32)
    for i, (p, rx, rz) in enumerate(zip(line, radius_x, radius_z)):
        ry = max(rx, rz, 1.5 * step)
        q = ((gx - p[0]) / rx) ** 2 + ((gy - p[1]) / ry) ** 2 + ((gz - p[2]) / rz) ** 2
        closer = q < best
        best[closer] = q[closer]
        owner[closer] = i
    inside = best < 1.0
    image[region][inside] = value
    if label is not None:
        label[region][inside] = np.asarray(point_labels)[owner[inside]]
