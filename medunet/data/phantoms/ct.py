"""Abdominal CT phantom: body, fat, muscle, spine, ribs, vessels, bowel and three labelled organs.

Hounsfield units follow real scans (air −1000, fat ≈ −100, muscle/soft tissue 30–60, enhanced organs
50–200, bone 400–1000); spacing is anisotropic (0.6–0.9 mm in-plane, 2.5–5 mm slices); cases are
stored in varied voxel orders (RAS, LPS, LAS, …) and some with an oblique (rotated) grid. The anatomy is
drawn in the RAS frame relative to the body outline, so it scales with the field of view.
"""

from __future__ import annotations

import numpy as np
import torch

from medunet.data.phantoms._common import (
    Blob,
    PhantomCase,
    centered_affine,
    centered_coords,
    random_rotation,
    reorient,
    smooth_field,
    tilt_affine,
)

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
MODALITY = "CT"
SPATIAL_DIMS = 3
SMALL_SHAPE = (48, 48, 24)
# Voxel orders real CT NIfTI files come in (converted DICOM is LPS, many pipelines write RAS or LAS).
AXCODES = ("RAS", "LPS", "LAS", "RPS", "LPI", "PLS")
OBLIQUE_FRACTION = 0.25


def default_shape(rng: np.random.Generator, spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """In-plane 256–512 voxels, 150–260 mm of abdomen along z."""
    n = int(rng.choice([256, 320, 384, 448, 512]))
    nz = int(round(rng.uniform(150.0, 260.0) / spacing[2]))
    return (n, n, max(nz, 16))


def make_case(rng: np.random.Generator, size="default") -> PhantomCase:
    """Generate one CT case; ``size`` is ``"small"``, ``"default"`` or an explicit ``(X, Y, Z)``."""
    spacing = (float(rng.uniform(0.6, 0.9)),) * 2 + (float(rng.choice([2.5, 3.0, 3.75, 5.0])),)
    if size == "small":
        shape = SMALL_SHAPE
    elif size == "default":
        shape = default_shape(rng, spacing)
    else:
        shape = tuple(int(s) for s in size)
    coords = centered_coords(shape, spacing)
    hu, label = _draw_abdomen(rng, shape, spacing, coords)

    axcodes = "RAS" if rng.random() < 0.3 else str(rng.choice(AXCODES))
    table = np.array([0.0, rng.uniform(-40, 40), rng.uniform(-600, -200)])
    affine = centered_affine(shape, spacing, offset=table)
    (hu, label), affine = reorient([hu, label], affine, axcodes)
    oblique = bool(rng.random() < OBLIQUE_FRACTION)
    if oblique:
        affine = tilt_affine(affine, random_rotation(rng, 15.0), table)
    return PhantomCase(image=hu, label=label, affine=affine,
                       info={"axcodes": axcodes, "oblique": oblique, "spacing": spacing, "shape": shape})


def _draw_abdomen(rng: np.random.Generator, shape, spacing, coords) -> tuple[np.ndarray, np.ndarray]:
    """Paint tissues back to front; a later structure overwrites an earlier one (labels follow)."""
    xs, ys, zs = coords
    fov_x, fov_y, length = (n * s for n, s in zip(shape, spacing))
    # Python floats keep float32 arrays float32 (NumPy scalars would promote them to float64).
    ax = float(rng.uniform(0.36, 0.44) * fov_x)  # body half-width (left-right)
    ay = float(min(ax * rng.uniform(0.62, 0.8), 0.46 * fov_y))  # body half-depth (antero-posterior)
    y0 = float(rng.uniform(-0.04, 0.04) * fov_y)

    # Body outline: ellipse with a lumpy contour, slowly varying along z.
    theta = np.arctan2((ys[None, :] - y0) / ay, xs[:, None] / ax)
    contour = 1 + 0.03 * np.sin(2 * theta + rng.uniform(0, 6.3)) + 0.02 * np.sin(3 * theta + rng.uniform(0, 6.3))
    rho2d = (np.sqrt((xs[:, None] / ax) ** 2 + ((ys[None, :] - y0) / ay) ** 2) / contour).astype(np.float32)
    zscale = (1 + 0.04 * np.sin(2 * np.pi * zs / max(length, 1.0) + rng.uniform(0, 6.3))).astype(np.float32)
    rho = rho2d[:, :, None] / zscale[None, None, :]

    fat_t = float(rng.uniform(0.06, 0.16))
    wall_t = float(rng.uniform(0.04, 0.07))
    hu = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    hu[rho < 1.0] = rng.uniform(-110, -90)  # subcutaneous fat
    wall = rho < 1.0 - fat_t
    hu[wall] = rng.uniform(40, 55)  # abdominal wall muscle
    interior = rho < 1.0 - fat_t - wall_t
    hu[interior] = rng.uniform(-105, -85)  # visceral fat

    # Bowel loops (soft tissue) with some gas, from a smooth random field.
    nodes = tuple(max(3, int(round(n * s / (0.18 * ax)))) for n, s in zip(shape, spacing))
    bowel_field = smooth_field(rng, shape, nodes)
    hu[interior & (bowel_field > 0.2)] = rng.uniform(20, 40)
    hu[interior & (bowel_field > 1.7)] = rng.uniform(-900, -700)
    del bowel_field

    def blob(cx, cy, cz, sx, sy, sz, **kw) -> Blob:
        scale = rng.uniform(0.85, 1.15)
        jitter = rng.uniform(-0.04, 0.04, size=3) * np.array([ax, ay, length])
        return Blob.random(rng, np.array([cx * ax, y0 + cy * ay, cz * length]) + jitter,
                           scale * np.array([sx * ax, sy * ay, sz * length]), **kw)

    def tube(cx, cy, rx, ry) -> Blob:  # a cylinder along z (vessel, spine): a very long ellipsoid
        return Blob.random(rng, np.array([cx * ax, y0 + cy * ay, 0.0]),
                           np.array([rx * ax, ry * ay, 3.0 * length]), max_tilt=2.0, irregularity=0.02)

    def paint(shape_: Blob, value_hu: float, value_label: int, where=interior) -> None:
        region, lev = shape_.level(coords)
        inside = (lev < 0) & where[region]
        hu[region][inside] = value_hu
        label[region][inside] = value_label

    # Spine, canal, paraspinal muscles, aorta and inferior vena cava.
    body = rho < 1.0
    for side in (-1, 1):
        paint(blob(side * 0.22, -0.74, 0.0, 0.14, 0.17, 3.0, max_tilt=3, irregularity=0.05),
              rng.uniform(45, 60), 0, body)
    vertebra = tube(0.0, -0.5, 0.13, 0.18)
    paint(vertebra, rng.uniform(700, 1000), 0, body)  # cortical shell
    region, lev = vertebra.level(coords)
    discs = (np.cos(2 * np.pi * zs / max(0.13 * length, 12.0)) > 0.8)[None, None, region[2]]
    inner = (lev < -0.2) & body[region]
    hu[region][inner] = rng.uniform(200, 350)  # cancellous bone
    hu[region][inner & discs] = rng.uniform(70, 95)  # intervertebral discs
    paint(tube(0.0, -0.72, 0.05, 0.07), rng.uniform(5, 15), 0, body)  # spinal canal (CSF)
    paint(tube(0.0, -0.86, 0.03, 0.08), rng.uniform(500, 800), 0, body)  # spinous process
    paint(tube(-0.1, -0.22, 0.075, 0.075 * ax / ay), rng.uniform(150, 250), 0)  # aorta (contrast)
    paint(tube(0.12, -0.18, 0.09, 0.07), rng.uniform(90, 140), 0)  # inferior vena cava

    # Labelled organs: kidneys (with perirenal fat and a hilum), spleen, liver.
    kidney_hu = rng.uniform(130, 200)
    for side in (-1, 1):
        z = rng.uniform(-0.15, 0.05)
        paint(blob(side * 0.37, -0.42, z, 0.22, 0.25, 0.26, irregularity=0.05), rng.uniform(-100, -80), 0)
        kidney = blob(side * 0.37, -0.42, z, 0.16, 0.19, 0.2, irregularity=0.05)
        paint(kidney, kidney_hu, LABELS["kidney"])
        hilum = Blob.random(rng, kidney.center + np.array([-side * 0.12 * ax, 0.05 * ay, 0.0]),
                            kidney.semi_axes * np.array([0.45, 0.35, 0.4]), irregularity=0.05)
        paint(hilum, rng.uniform(-90, -40), 0)  # renal sinus fat
    liver_hu = rng.uniform(55, 110)
    spleen_hu = liver_hu + rng.choice([-1, 1]) * rng.uniform(10, 25)
    paint(blob(-0.55, -0.22, 0.2, 0.16, 0.3, 0.17, max_tilt=25), spleen_hu, LABELS["spleen"])
    liver_top = rng.uniform(0.15, 0.3)
    paint(blob(0.42, 0.02, liver_top, 0.45, 0.62, 0.32, irregularity=0.1), liver_hu, LABELS["liver"])
    paint(blob(-0.08, 0.36, liver_top + 0.06, 0.35, 0.3, 0.18, irregularity=0.1), liver_hu, LABELS["liver"])
    # Portal/hepatic vessels: bright tubes crossing the liver (they stay labelled liver, as annotators do).
    for _ in range(3):
        vessel = blob(rng.uniform(0.2, 0.5), rng.uniform(-0.1, 0.3), liver_top, 0.04, 0.04, 0.3, max_tilt=60)
        region, lev = vessel.level(coords)
        hu[region][(lev < 0) & (label[region] == LABELS["liver"])] = liver_hu + rng.uniform(40, 80)

    # Ribs: short bony arcs in the wall band, in the upper abdomen, periodic along z.
    band = (rho > 1.0 - fat_t - wall_t - 0.035) & (rho < 1.0 - fat_t - 0.005)
    rib_slabs = np.cos(2 * np.pi * zs / max(0.09 * length, 10.0) + rng.uniform(0, 6.3)) > 0.55
    rib_slabs &= zs > -0.1 * length
    lateral = (np.abs(np.cos(theta)) > 0.35)[:, :, None]
    ribs = band & rib_slabs[None, None, :] & lateral
    hu[ribs] = rng.uniform(450, 800)
    label[ribs] = 0

    # Organ texture and acquisition noise; HU stored as int16 like scanner output.
    # The texture (3-8 HU) lies under 8-18 HU of white noise, so it is drawn at half the in-plane
    # resolution and repeated 2×2: a third of the cost of a full-resolution field, and invisible.
    half = (-(-shape[0] // 2), -(-shape[1] // 2), shape[2])
    texture = smooth_field(rng, half, tuple(max(3, n // 24) for n in half), amplitude=rng.uniform(3.0, 8.0))
    texture = np.repeat(np.repeat(texture, 2, axis=0), 2, axis=1)[: shape[0], : shape[1]]
    np.add(hu, texture, out=hu, where=hu > -500)
    del texture
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(int(rng.integers(2**62))))
    hu += noise.mul_(float(rng.uniform(8.0, 18.0))).numpy()
    np.clip(hu, -1024, 3071, out=hu)
    return np.rint(hu).astype(np.int16), label
