"""Geometry of inference: the planned grid equals MONAI's/training's, and predictions come back onto the
input's exact voxel grid (oblique, LPS, anisotropic inputs)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing
from scipy.spatial.transform import Rotation

from medunet.data import Plan
from medunet.inference import PlanGrid, Predictor, resample_grid
from medunet.io import read_image

GEOMETRIES = {
    # name: (rotation Euler angles, axis flips, spacing)
    "ras_iso": ((0, 0, 0), (1, 1, 1), (1.0, 1.0, 1.0)),
    "lps_aniso": ((0, 0, 0), (-1, -1, 1), (0.8, 0.8, 3.0)),
    "oblique_aniso": ((0.35, -0.2, 0.5), (1, -1, 1), (0.7, 1.3, 2.5)),
    "oblique_lps_permuted": ((0.1, 0.3, -0.25), (-1, 1, -1), (2.0, 0.9, 1.1)),
}


def _affine(name: str, origin=(-20.0, 13.0, 7.5)) -> np.ndarray:
    euler, flips, spacing = GEOMETRIES[name]
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", euler).as_matrix() @ np.diag(flips) @ np.diag(spacing)
    if name == "oblique_lps_permuted":
        a[:3, :3] = a[:3, [2, 0, 1]]  # voxel axes stored in a permuted order
    a[:3, 3] = origin
    return a


def _blob_image(shape, affine, rng) -> np.ndarray:
    """A smooth, asymmetric 'body' (values 100..400) on a zero background, in world coordinates."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ (np.asarray(shape) / 2.0) + affine[:3, 3]
    r = np.linalg.norm((world - centre) / np.array([9.0, 7.0, 6.0]), axis=1)
    img = np.where(r < 1.0, 100 + 300 * (1 - r) + 20 * (world[:, 0] - centre[0]), 0.0)
    img = img.reshape(shape).astype(np.float32)
    img[img != 0] += rng.normal(0, 2, size=int((img != 0).sum())).astype(np.float32)
    return img


def _write(path, array, affine, sform_code=1, qform_code=1):
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    nib.save(img, str(path))
    return path


class Threshold(torch.nn.Module):
    """An 'oracle' network: class 1 where the (normalised) input exceeds 0.5, pointwise."""

    def __init__(self, spatial_dims: int = 3):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.scale = torch.nn.Parameter(torch.tensor(40.0))

    def forward(self, x):
        z = (x[:, :1] - 0.5) * self.scale
        return torch.cat([torch.zeros_like(z), z], dim=1)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_plan_grid_matches_monai_orientation_and_spacing(name):
    shape = (19, 23, 11)
    affine = _affine(name)
    x = torch.randn(2, *shape)
    ref = Spacing((1.2, 1.0, 1.7), mode="bilinear")(
        Orientation("RAS", labels=None)(MetaTensor(x.clone(), affine=torch.as_tensor(affine))))
    grid = PlanGrid.for_image(affine, shape, "RAS", (1.2, 1.0, 1.7))
    assert grid.plan_shape == tuple(ref.shape[1:])
    np.testing.assert_allclose(grid.plan_affine, np.asarray(ref.affine), atol=1e-9)
    torch.testing.assert_close(grid.to_plan(x), ref.as_tensor(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_reorientation_alone_is_exact_and_invertible(name):
    shape = (7, 9, 5)
    affine = _affine(name)
    x = torch.arange(2 * np.prod(shape), dtype=torch.float32).reshape(2, *shape)
    grid = PlanGrid.for_image(affine, shape, "RAS", None)
    ref = Orientation("RAS", labels=None)(MetaTensor(x.clone(), affine=torch.as_tensor(affine)))
    assert torch.equal(grid.to_plan(x), ref.as_tensor())
    assert torch.equal(grid.from_plan(grid.to_plan(x)), x)


def test_resample_grid_identity_and_half_voxel_shift():
    x = torch.arange(24, dtype=torch.float32).reshape(1, 4, 6)
    assert torch.equal(resample_grid(x, np.eye(3), (4, 6)), x)
    shift = np.eye(3)
    shift[1, 2] = 0.5  # dst voxel j reads src j + 0.5 along the last axis
    out = resample_grid(x, shift, (4, 5))
    torch.testing.assert_close(out, (x[:, :, :-1] + x[:, :, 1:]) / 2)


@pytest.mark.parametrize("seed", range(6))
def test_axis_aligned_resampling_equals_grid_sample(seed, monkeypatch):
    """Reorientation + spacing maps go one axis at a time; the values are grid_sample's (trilinear or
    nearest, border padding) up to float rounding, with and without a per-chunk reduction."""
    import medunet.data.grid as grid_module
    from medunet.inference.predictor import _argmax_label

    rng = np.random.default_rng(seed)
    d = 2 if seed % 3 == 0 else 3
    src, dst = tuple(rng.integers(3, 24, d)), tuple(int(v) for v in rng.integers(3, 30, d))
    index_map = np.eye(d + 1)
    index_map[:d, :d] = 0
    for j, axis in enumerate(rng.permutation(d)):
        index_map[axis, j] = rng.uniform(0.3, 3.0) * rng.choice([-1, 1])
        index_map[axis, d] = rng.uniform(-3, src[axis] + 3)  # partly outside: border padding
    x = torch.randn(3, *src)
    monkeypatch.setattr(grid_module, "_CHUNK_VOXELS", 64)  # several chunks
    fast = {m: resample_grid(x, index_map, dst, m) for m in ("bilinear", "nearest")}
    fast_label = resample_grid(x, index_map, dst, "bilinear", reduce=_argmax_label)
    monkeypatch.setattr(grid_module, "_as_axis_aligned", lambda m: None)  # the grid_sample path
    torch.testing.assert_close(fast["bilinear"], resample_grid(x, index_map, dst, "bilinear"), atol=1e-5, rtol=1e-5)
    assert (fast["nearest"] != resample_grid(x, index_map, dst, "nearest")).float().mean() < 0.01  # .5 ties only
    assert torch.equal(fast_label, fast["bilinear"].argmax(dim=0).to(torch.uint8))


def test_argmax_label_ties_go_to_the_lower_class():
    from medunet.inference.predictor import _argmax_label

    probs = torch.tensor([[0.2, 0.5, 0.1], [0.5, 0.5, 0.3], [0.3, 0.0, 0.6]])
    assert _argmax_label(probs).tolist() == probs.argmax(dim=0).tolist() == [1, 0, 2]


def test_preprocessing_matches_val_transforms(tmp_path):
    transforms = pytest.importorskip("medunet.data.transforms")
    rng = np.random.default_rng(1)
    shape = (30, 26, 14)
    for name in ("lps_aniso", "oblique_aniso", "oblique_lps_permuted"):
        affine = _affine(name)
        img = _blob_image(shape, affine, rng)
        path = _write(tmp_path / f"{name}.nii.gz", img, affine)
        for norm in ({"scheme": "zscore", "nonzero": True}, {"scheme": "ct", "clip": [80, 380], "mean": 200, "std": 60}):
            plan = Plan(target_spacing=[1.1, 1.1, 1.6], patch_size=[16, 16, 16], normalization=norm,
                        network={"name": "unet"})
            ref = transforms.val_transforms(plan, keys=("image",))({"image": str(path)})["image"]
            predictor = Predictor(Threshold(), plan, device="cpu")
            image = read_image(path)  # the file's affine (NIfTI stores it in float32)
            ours, grid, _ = predictor.preprocess(torch.from_numpy(image.array)[None], image.affine)
            assert tuple(ours.shape) == tuple(ref.shape), name
            np.testing.assert_allclose(grid.plan_affine, np.asarray(ref.affine), atol=1e-6)
            torch.testing.assert_close(ours, ref.as_tensor(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("spacing", [None, [0.6, 0.6, 0.8]])
def test_prediction_comes_back_in_the_exact_input_geometry(tmp_path, name, spacing):
    rng = np.random.default_rng(0)
    shape = (28, 24, 12)
    affine = _affine(name)
    img = _blob_image(shape, affine, rng)
    # sform and qform differ in code, so we can see that both are kept
    path = _write(tmp_path / "in.nii.gz", img, affine, sform_code=2, qform_code=1)
    plan = Plan(target_spacing=spacing, patch_size=[16, 16, 16],
                normalization={"scheme": "ct", "clip": [0, 400], "mean": 200.0, "std": 100.0},
                network={"name": "unet"})
    predictor = Predictor(Threshold(), plan, device="cpu")
    results = predictor.segment(path, tmp_path / "out")
    assert results[0].ok, results[0].message
    out = nib.load(str(tmp_path / "out" / "in_seg.nii.gz"))
    src = nib.load(str(path))
    assert out.shape == src.shape
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.affine, src.affine)
    np.testing.assert_array_equal(out.header.get_sform(), src.header.get_sform())
    np.testing.assert_array_equal(out.header.get_qform(), src.header.get_qform())
    assert int(out.header["sform_code"]) == 2 and int(out.header["qform_code"]) == 1
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
    label = np.asarray(out.dataobj)
    truth = (img > 250).astype(np.uint8)  # normalised 0.5 = 250 HU
    if spacing is None:  # reorientation only: voxel-exact
        np.testing.assert_array_equal(label, truth)
    else:  # through a resampled grid and back: same object, registered to well within a voxel
        dice = 2 * np.sum(label & truth) / (label.sum() + truth.sum())
        assert dice > 0.8, dice
        file_affine = read_image(path).affine

        def centre(mask):
            return file_affine[:3, :3] @ np.argwhere(mask).mean(0) + file_affine[:3, 3]

        assert np.linalg.norm(centre(label) - centre(truth)) < 0.8  # mm; voxels are 0.7-3 mm


def _world(affine, shape):
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _inside(index_map, points_shape_affine, grid_shape):
    affine, shape = points_shape_affine
    idx = np.einsum("ij,...j->...i", index_map[:3, :3], _world(affine, shape)) + index_map[:3, 3]
    return np.all((idx >= 0) & (idx <= np.asarray(grid_shape) - 1), axis=-1)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_round_trip_reproduces_a_linear_image_exactly(name):
    """(Bi/tri)linear interpolation is exact for a linear function of world position, so any error in
    the plan grid's affine or in the way back shows up directly."""
    affine, shape = _affine(name), (28, 24, 12)
    coef = np.array([0.3, -0.7, 1.1])
    f = torch.as_tensor(_world(affine, shape) @ coef + 5.0, dtype=torch.float32)[None]
    xp, grid = PlanGrid.resample_image(f, affine, "RAS", [1.3, 0.9, 2.0])
    expected = _world(grid.plan_affine, grid.plan_shape) @ coef + 5.0
    inside = _inside(np.linalg.inv(affine), (grid.plan_affine, grid.plan_shape), shape)
    assert inside.mean() > 0.75
    np.testing.assert_allclose(xp[0].numpy()[inside], expected[inside], atol=1e-4)
    back = grid.from_plan(torch.as_tensor(expected, dtype=torch.float32)[None])[0].numpy()
    inside = _inside(np.linalg.inv(grid.plan_affine), (affine, shape), grid.plan_shape)
    assert inside.mean() > 0.75
    np.testing.assert_allclose(back[inside], f[0].numpy()[inside], atol=1e-4)
