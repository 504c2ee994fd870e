"""Property tests (hypothesis) of geometry: random voxel orders, flips, spacings, oblique rotations,
origins, shapes and sform/qform codes.

1. The label medunet writes for an input has the input's exact shape, affine, sform and qform
   (matrices and codes) — through ``medunet.io`` and through the whole ``Predictor``.
2. A label resampled into the plan's grid and back (``PlanGrid``, nearest) is unchanged wherever the
   plan's spacing is at least as fine as the image's along every reoriented axis.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from medunet.io import read_image, write_like

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@st.composite
def geometries(draw, max_side: int = 12, oblique: bool = True, min_side: int = 3, min_spacing: float = 0.4):
    """``(affine 4×4, shape (X, Y, Z))``: permuted/flipped axes, anisotropic spacing, optional tilt."""
    perm = draw(st.permutations([0, 1, 2]))
    flips = draw(st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3))
    spacing = draw(st.tuples(*[st.floats(min_spacing, 4.0, allow_nan=False)] * 3))
    angle = st.floats(-0.35, 0.35, allow_nan=False) if oblique else st.just(0.0)
    angles = draw(st.tuples(angle, angle, angle))
    origin = draw(st.tuples(*[st.floats(-150, 150, allow_nan=False)] * 3))
    shape = draw(st.tuples(*[st.integers(min_side, max_side)] * 3))
    axes = np.eye(3)[:, list(perm)] * np.asarray(flips)[None, :]
    affine = np.eye(4)
    affine[:3, :3] = _rotation(angles) @ axes @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine, shape


#: (sform_code, qform_code): scanner/aligned/MNI sform, qform only, and neither (pixdim fallback)
CODES = [(1, 1), (2, 1), (4, 0), (1, 0), (0, 1), (0, 0)]


def _write_input(path: Path, affine, shape, sform_code: int, qform_code: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.normal(40, 60, size=shape).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    nib.save(img, str(path))
    return path


def assert_same_header_geometry(out_path: Path, in_path: Path) -> None:
    """Shape, affine, sform/qform matrices and codes of ``out_path`` equal those of ``in_path``."""
    out, ref = nib.load(str(out_path)), nib.load(str(in_path))
    assert out.shape[:3] == ref.shape[:3]
    np.testing.assert_allclose(out.affine, ref.affine, rtol=0, atol=1e-4)
    for kind in ("sform", "qform"):
        m_out, c_out = getattr(out, f"get_{kind}")(coded=True)
        m_ref, c_ref = getattr(ref, f"get_{kind}")(coded=True)
        assert int(c_out) == int(c_ref), f"{kind}_code {int(c_out)} != input's {int(c_ref)}"
        if m_ref is not None:
            np.testing.assert_allclose(m_out, m_ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.header.get_zooms()[:3], ref.header.get_zooms()[:3], atol=1e-5)


@pytest.mark.parametrize("code_pair", CODES)
@settings(max_examples=12, **_SETTINGS)
@given(geom=geometries())
def test_io_label_keeps_input_geometry(geom, code_pair):
    affine, shape = geom
    with tempfile.TemporaryDirectory() as d:
        src = _write_input(Path(d) / "in.nii.gz", affine, shape, *code_pair)
        image = read_image(src)
        label = (image.array > 40).astype(np.uint8)
        out = write_like(label, image, Path(d) / "out_seg.nii.gz")
        assert_same_header_geometry(out, src)
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), label)


_PREDICTOR = {}


def _predictor():
    """A tiny untrained 3-class 3D predictor on a 2 mm RAS grid (built once)."""
    if "p" not in _PREDICTOR:
        from medunet import networks
        from medunet.data import Plan
        from medunet.inference import Predictor

        plan = Plan(labels={"background": 0, "a": 1, "b": 2}, spatial_dims=3, target_spacing=[2.0, 2.0, 2.0],
                    patch_size=[16, 16, 16], batch_size=1, normalization={"scheme": "zscore", "nonzero": False},
                    network={"name": "unet", **networks.get_spec("unet").tiny_options})
        torch.manual_seed(0)
        _PREDICTOR["p"] = Predictor(plan.build_network(), plan, device="cpu")
    return _PREDICTOR["p"]


@pytest.mark.parametrize("code_pair", CODES)
@settings(max_examples=2, phases=[Phase.explicit, Phase.reuse, Phase.generate], **_SETTINGS)
@given(geom=geometries(max_side=10, min_side=7, min_spacing=1.5))
def test_predictor_label_keeps_input_geometry(geom, code_pair):
    """Crop, reorientation, resampling to 2 mm and back: the written label sits on the input's grid.

    Volumes span at least 10 mm per axis (5 voxels at 2 mm, what the tiny network's two poolings need;
    smaller ones are the ``tiny_volume`` hostile case). No shrinking: each example runs a network.
    """
    affine, shape = geom
    with tempfile.TemporaryDirectory() as d:
        src = _write_input(Path(d) / "in.nii.gz", affine, shape, *code_pair)
        pred = _predictor().predict_file(src)
        assert pred.label.shape == tuple(shape) and pred.label.dtype == np.uint8
        out = write_like(pred.label, pred.image, Path(d) / "in_seg.nii.gz")
        assert_same_header_geometry(out, src)


@settings(max_examples=60, **_SETTINGS)
@given(geometries(max_side=10), st.tuples(*[st.floats(0.3, 1.0)] * 3), st.sampled_from(["RAS", "LPS", None]))
def test_label_roundtrip_through_plan_grid_is_exact_when_plan_is_finer(geom, factors, orientation):
    """Nearest resampling image → plan grid → image is the identity if the plan's spacing along each
    reoriented axis is ≤ the image's (every image voxel centre then has a plan voxel within half a
    plan voxel of it, and that voxel took its value from it)."""
    from medunet.inference.geometry import PlanGrid, reoriented_affine

    affine, shape = geom
    if orientation is not None:
        reo_affine, _ = reoriented_affine(affine, shape, orientation)
    else:
        reo_affine = affine
    native = np.linalg.norm(reo_affine[:3, :3], axis=0)
    target = [float(s * f) for s, f in zip(native, factors)]
    grid = PlanGrid.for_image(affine, shape, orientation, target)
    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.integers(0, 4, size=(1, *shape)).astype(np.float32))
    back = grid.from_plan(grid.to_plan(label, "nearest"), "nearest")
    assert back.shape == label.shape
    mismatched = int((back != label).sum())
    assert mismatched == 0, f"{mismatched} voxel(s) changed; plan shape {grid.plan_shape}, target {target}"


@settings(max_examples=40, **_SETTINGS)
@given(geometries(max_side=10), st.sampled_from(["RAS", "LPS", "PIR"]))
def test_reorientation_alone_is_a_lossless_permutation(geom, orientation):
    """Keeping the spacing: to_plan is a permutation/flip, and from_plan undoes it bit for bit
    (intensities too, not just labels)."""
    from medunet.inference.geometry import PlanGrid

    affine, shape = geom
    grid = PlanGrid.for_image(affine, shape, orientation, None)
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32))
    y = grid.to_plan(x, "bilinear")
    assert sorted(y.shape[1:]) == sorted(shape)
    assert torch.equal(grid.from_plan(y, "bilinear"), x)


@pytest.mark.parametrize("shape", [(7, 5), (12, 9)])
def test_2d_label_roundtrip(shape):
    """The same for a 2D image (a slice with its in-plane geometry)."""
    from medunet.inference.geometry import PlanGrid

    affine = np.diag([-0.7, 1.3, 1.0, 1.0])
    affine[:2, 3] = [12.0, -4.0]
    grid = PlanGrid.for_image(affine, shape, "RA", [0.5, 0.9])
    label = torch.from_numpy(np.random.default_rng(2).integers(0, 3, size=(1, *shape)).astype(np.float32))
    assert torch.equal(grid.from_plan(grid.to_plan(label, "nearest"), "nearest"), label)
