"""The seed's elastic deformation: identity at σ = 0, labels stay labels, displacements have std σ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medunet.data.augment import RandElasticDeformd, coarse_to_dense, random_displacement_field, warp


def _blobs(shape, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.float32)
    for value in (1, 2, 3):
        centre = rng.integers(3, np.array(shape) - 3)
        sl = tuple(slice(c - 2, c + 2) for c in centre)
        label[sl] = value
    image = rng.normal(size=shape).astype(np.float32) + label
    return torch.as_tensor(image)[None], torch.as_tensor(label)[None]


@pytest.mark.parametrize("shape", [(48, 40), (24, 20, 16)])
def test_sigma_zero_is_identity(shape):
    image, label = _blobs(shape)
    t = RandElasticDeformd(["image", "label"], sigma=0.0)
    t.set_random_state(0)
    out = t({"image": image, "label": label})
    assert torch.equal(out["image"], image) and torch.equal(out["label"], label)


@pytest.mark.parametrize("shape,mode", [((48, 40), "bilinear"), ((48, 40), "bicubic"), ((24, 20, 16), "bilinear"),
                                        ((12, 10, 8), "bicubic")])
def test_labels_stay_integer_and_image_changes(shape, mode):
    image, label = _blobs(shape)
    t = RandElasticDeformd(["image", "label"], sigma=4.0, mode=(mode, "nearest"))
    t.set_random_state(1)
    out = t({"image": MetaTensor(image), "label": MetaTensor(label)})
    assert isinstance(out["image"], MetaTensor)
    assert out["image"].shape == image.shape and out["label"].shape == label.shape
    lab = out["label"].as_tensor()
    assert torch.equal(lab, lab.round())
    assert set(torch.unique(lab).tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert not torch.equal(out["image"].as_tensor(), image)
    # deformation is smooth: most of each object survives, just moved
    assert (lab > 0).sum() > 0.5 * (label > 0).sum()


def test_prob_zero_is_identity():
    image, label = _blobs((32, 32))
    t = RandElasticDeformd(["image", "label"], sigma=10.0, prob=0.0)
    out = t({"image": image, "label": label})
    assert torch.equal(out["image"], image)


def test_dense_field_interpolates_the_grid_nodes():
    rng = np.random.RandomState(0)
    coarse = rng.normal(size=(3, 3, 4, 3))
    dense = coarse_to_dense(coarse, (21, 31, 11))
    nodes = np.ix_(range(3), [0, 10, 20], [0, 10, 20, 30], [0, 5, 10])
    np.testing.assert_allclose(dense[nodes], coarse, atol=1e-4)
    # smooth: neighbouring voxels differ by far less than the node values
    assert np.abs(np.diff(dense, axis=1)).max() < 0.5 * np.abs(coarse).max()


@pytest.mark.parametrize("sigma", [2.0, 10.0])
def test_node_displacements_have_std_sigma(sigma):
    rng = np.random.RandomState(42)
    values = np.concatenate([random_displacement_field((16, 16), sigma, 3, rng)[0].ravel() for _ in range(150)])
    assert values.size == 150 * 2 * 9
    assert abs(values.std() - sigma) < 0.07 * sigma
    assert abs(values.mean()) < 0.1 * sigma


@pytest.mark.parametrize("shape", [(40, 36), (20, 18, 16)])
def test_warp_moves_each_axis_by_its_component(shape):
    """Warping coordinate ramps returns x + u(x): the field's component k acts on axis k."""
    dims = len(shape)
    ramps = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    _, dense = random_displacement_field(shape, 1.5, 3, np.random.RandomState(3))
    out = warp(ramps, dense, mode="bilinear", padding_mode="border")
    coords = ramps.numpy() + dense
    inside = np.all([(coords[k] >= 0) & (coords[k] <= shape[k] - 1) for k in range(dims)], axis=0)
    for k in range(dims):
        np.testing.assert_allclose(out[k].numpy()[inside], coords[k][inside], atol=1e-3)


def test_transform_displacement_magnitude_matches_sigma():
    """Through the transform: measured per-voxel shifts of a ramp have the field's spread (≈ σ scale)."""
    shape, sigma = (64, 64), 3.0
    ramp = torch.arange(shape[0], dtype=torch.float32)[:, None].expand(shape)[None].clone()
    shifts, fields = [], []
    t = RandElasticDeformd(["image"], sigma=sigma, mode="bilinear", padding_mode="border")
    t.set_random_state(7)
    for _ in range(20):
        out = t({"image": ramp})["image"]
        field = t.last_displacement[0]
        inside = (ramp[0].numpy() + field > 0) & (ramp[0].numpy() + field < shape[0] - 1)
        shifts.append((out[0] - ramp[0]).numpy()[inside])
        fields.append(field[inside])
    np.testing.assert_allclose(np.concatenate(shifts), np.concatenate(fields), atol=1e-3)
    # the interpolated field's std stays within a factor of the node σ (cubic interpolation between nodes)
    assert 0.5 * sigma < np.concatenate(fields).std() < 1.2 * sigma


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sigma"):
        RandElasticDeformd(["image"], sigma=-1)
    with pytest.raises(ValueError, match="mode"):
        RandElasticDeformd(["image"], mode="cubic")
    with pytest.raises(ValueError, match="displacement shape"):
        warp(torch.zeros(1, 8, 8), np.zeros((2, 8, 9)))
