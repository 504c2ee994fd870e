"""Tiled inference (overlap-tile, gaussian sliding window), TTA, uncertainty, postprocessing, Predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medunet import networks
from medunet.data import Plan
from medunet.inference import (
    Predictor,
    TiledInferer,
    build_inferer,
    entropy_map,
    keep_largest_component,
    mirror_combinations,
    mirror_pad,
    predict_probabilities,
)
from medunet.inference import sliding as sliding_module


def _valid_unet(dims: int) -> torch.nn.Module:
    return networks.create("unet2015", spatial_dims=dims, features=(4, 8, 16), padding="valid", dropout=0.0).eval()


def _full_pass(net, x):
    """One pass over the whole image, mirrored by the margin and padded up to a valid size."""
    shape = tuple(x.shape[2:])
    margin = net.input_margin()
    full = net.valid_input_shape([s + 2 * m for s, m in zip(shape, margin)], "up")
    padded = mirror_pad(x, margin, [f - s - m for f, s, m in zip(full, shape, margin)])
    return net(padded)[(..., *[slice(0, s) for s in shape])]


@pytest.mark.parametrize("dims,shape,roi", [
    (2, (150, 97), (100, 100)),       # several tiles per axis
    (2, (20, 13), (100, 100)),        # image much smaller than one tile: mirrored many times
    (3, (30, 26, 20), (60, 60, 60)),  # 3D
])
def test_overlap_tile_equals_one_full_image_pass(dims, shape, roi):
    net = _valid_unet(dims)
    x = torch.randn(1, 1, *shape)
    inferer = TiledInferer(roi_size=roi)
    with torch.inference_mode():
        tiled = inferer(x, net)
        full = _full_pass(net, x)
    assert tiled.shape == (1, 2, *shape)
    assert inferer.last_stats["valid"] and all(m > 0 for m in inferer.last_stats["margin"])
    if dims == 2 and shape[0] > roi[0]:
        assert inferer.last_stats["windows"] > 1
    torch.testing.assert_close(tiled, full, atol=1e-4, rtol=1e-4)


def test_mirror_pad_reflects_without_repeating_the_edge():
    x = torch.arange(4.0).reshape(1, 1, 4)
    assert mirror_pad(x, [2], [3]).flatten().tolist() == [2, 1, 0, 1, 2, 3, 2, 1, 0]
    assert mirror_pad(x, [5], [0]).flatten().tolist()[:6] == [1, 2, 3, 2, 1, 0]  # repeated mirroring


def test_same_network_window_covering_the_image_equals_a_direct_pass():
    net = networks.create("unet", spatial_dims=3, **networks.get_spec("unet").tiny_options).eval()
    x = torch.randn(1, 1, 16, 12, 8)
    with torch.inference_mode():
        out = build_inferer(net, roi_size=(32, 32, 32))(x, net)
        ref = net(x)
    torch.testing.assert_close(out, ref)


def test_image_smaller_than_the_patch_is_padded_to_it_and_cropped_back():
    """B7: a 1-voxel image (a tiny volume on a coarse plan grid) would reach the bottleneck as one voxel,
    where instance norm fails; it is padded to the training patch, as nnU-Net does, and cropped back."""
    net = networks.create("unet", spatial_dims=3, **networks.get_spec("unet").tiny_options).eval()
    inferer = TiledInferer(roi_size="auto", patch_size=(16, 16, 16))
    with torch.inference_mode():
        out = inferer(torch.randn(1, 1, 1, 1, 1), net)
        assert out.shape == (1, 2, 1, 1, 1) and torch.isfinite(out).all()
        assert inferer.last_stats["tile_in"] == (16, 16, 16)
        inferer(torch.randn(1, 1, 40, 3, 20), net)  # only the short axis is padded
    assert inferer.last_stats["tile_in"][1] == 16 and inferer.last_stats["tile_in"][0] >= 16


def test_collect_inputs_passes_bad_items_through(tmp_path):
    """B1/B2: a missing -i item and a looping symlink in a folder are returned (reading them reports
    the problem for that item alone) instead of stopping the batch or vanishing."""
    from medunet.inference import collect_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(b"")
    (folder / "loop.nii.gz").symlink_to("loop2.nii.gz")
    (folder / "loop2.nii.gz").symlink_to("loop.nii.gz")
    missing = tmp_path / "missing.nii.gz"
    got = collect_inputs([folder, missing])
    assert got == [folder / "a.nii.gz", folder / "loop.nii.gz", folder / "loop2.nii.gz", missing]


def test_sliding_window_blends_many_windows_to_the_right_shape():
    net = networks.create("unet", spatial_dims=3, **networks.get_spec("unet").tiny_options).eval()
    x = torch.randn(2, 1, 20, 14, 9)
    inferer = build_inferer(net, roi_size=(8, 8, 8), overlap=0.5, sw_batch_size=4)
    with torch.inference_mode():
        out = inferer(x, net)
    assert out.shape == (2, 2, 20, 14, 9)
    assert torch.isfinite(out).all()
    assert inferer.last_stats["windows"] == 4 * 3 * 2


def test_constant_windows_are_reused_exactly():
    net = networks.create("unet", spatial_dims=3, **networks.get_spec("unet").tiny_options).eval()
    x = torch.full((1, 1, 40, 40, 8), -1.5)
    x[..., 16:24, 16:24, :] = torch.randn(8, 8, 8)
    reuse = build_inferer(net, roi_size=(8, 8, 8), overlap=0.0, skip_constant=True)
    compute = build_inferer(net, roi_size=(8, 8, 8), overlap=0.0, skip_constant=False)
    with torch.inference_mode():
        a, b = reuse(x, net), compute(x, net)
    assert reuse.last_stats["reused"] > 0 and compute.last_stats["reused"] == 0
    assert torch.equal(a, b)


def test_cpu_aggregation_fallback_when_the_device_is_short_of_memory(monkeypatch):
    real_zeros = torch.zeros
    calls = {"n": 0}

    def failing_zeros(*args, **kwargs):
        if kwargs.get("device") is not None and calls["n"] == 0:
            calls["n"] += 1
            raise torch.OutOfMemoryError("simulated")
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(sliding_module.torch, "zeros", failing_zeros)
    net = networks.create("unet", spatial_dims=2, **networks.get_spec("unet").tiny_options).eval()
    inferer = build_inferer(net, roi_size=(8, 8))
    with torch.inference_mode():
        out = inferer(torch.randn(1, 1, 20, 12), net)
    assert inferer.last_stats["cpu_aggregation"] and out.shape == (1, 2, 20, 12)


def test_build_inferer_uses_the_plan_patch_and_fits_it_to_the_network():
    plan = Plan(patch_size=[20, 20, 12], network={"name": "unet", **networks.get_spec("unet").tiny_options})
    net = plan.build_network().eval()
    inferer = build_inferer(net, plan)
    lay = inferer.layout(net, (50, 50, 30))
    assert lay["tile_in"] == (20, 20, 12) and not lay["valid"]


# -- TTA and uncertainty ----------------------------------------------------------------------------
class Pointwise(torch.nn.Module):
    """Flip-equivariant (pointwise) 2-class network."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), 3 * x[:, :1]], dim=1)


def test_mirror_combinations():
    assert len(mirror_combinations(3)) == 8 and mirror_combinations(3)[0] == ()
    assert len(mirror_combinations(2)) == 4
    assert mirror_combinations(3, axes=(0, 1)) == [(), (0,), (1,), (0, 1)]


def test_tta_flips_back_correctly():
    x = torch.randn(1, 1, 9, 7, 5)
    # a pointwise net commutes with flips: TTA must give exactly the plain prediction
    plain, _ = predict_probabilities(Pointwise(), x)
    tta, var = predict_probabilities(Pointwise(), x, tta=True, with_variance=True)
    assert tta.shape == plain.shape == (1, 2, 9, 7, 5)
    torch.testing.assert_close(tta, plain)
    assert float(var.max()) < 1e-5
    # a net that is not flip-equivariant: TTA is the mean of the flipped-back predictions
    conv = torch.nn.Conv3d(1, 3, 3, padding=1).eval()
    with torch.no_grad():
        tta, _ = predict_probabilities(conv, x, tta=True)
        manual = sum(torch.softmax(conv(x.flip(dims)), 1).flip(dims) if dims else torch.softmax(conv(x), 1)
                     for dims in ([a + 2 for a in c] for c in mirror_combinations(3))) / 8
    torch.testing.assert_close(tta, manual)


def test_uncertainty_maps_are_in_unit_range():
    p = torch.softmax(torch.randn(4, 10, 10) * 3, dim=0)
    h = entropy_map(p, dim=0)
    assert h.shape == (10, 10) and float(h.min()) >= 0 and float(h.max()) <= 1
    assert float(entropy_map(torch.full((4, 3), 0.25), dim=0).min()) == pytest.approx(1.0)
    certain = torch.zeros(3, 5)
    certain[1] = 1
    assert float(entropy_map(certain, dim=0).max()) < 1e-6
    conv = torch.nn.Conv2d(1, 3, 3, padding=1).eval()
    with torch.no_grad():
        _, var = predict_probabilities(conv, torch.randn(1, 1, 12, 12), tta=True, with_variance=True)
    assert var.shape == (1, 12, 12) and float(var.min()) >= 0 and float(var.max()) <= 1


def test_keep_largest_component_per_class():
    label = np.zeros((12, 12), np.uint8)
    label[1:5, 1:5] = 1   # big 1
    label[8, 8] = 1       # small 1
    label[1:3, 8:11] = 2  # big 2
    label[10, 1] = 2      # small 2
    out = keep_largest_component(label)
    assert out.dtype == np.uint8 and out.shape == label.shape
    assert out[8, 8] == 0 and out[10, 1] == 0
    assert (out == 1).sum() == 16 and (out == 2).sum() == 6


# -- Predictor ---------------------------------------------------------------------------------------
def _plan_2d_valid() -> Plan:
    return Plan(spatial_dims=2, modality="microscopy", patch_size=[100, 100], target_spacing=None,
                normalization={"scheme": "zscore", "nonzero": False},
                network={"name": "unet2015", "features": [4, 8, 16], "padding": "valid", "dropout": 0.0})


def test_predictor_2d_valid_network_on_an_image_of_any_size():
    from medunet.io import ImageData

    plan = _plan_2d_valid()
    predictor = Predictor(plan.build_network(), plan, device="cpu", tta=True, uncertainty="variance")
    image = ImageData(array=np.random.default_rng(0).normal(size=(83, 51)).astype(np.float32),
                      affine=np.eye(4), path="mem.png", source="2d")
    pred = predictor.predict_image(image)
    assert pred.label.shape == (83, 51) and pred.label.dtype == np.uint8
    assert pred.probabilities.shape == (2, 83, 51)
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)
    assert 0 <= pred.uncertainty.min() and pred.uncertainty.max() <= 1
    assert pred.stats["valid"]


def test_predictor_2d_model_on_a_volume_goes_slice_by_slice():
    from medunet.io import ImageData

    plan = _plan_2d_valid()
    plan.normalization = {"scheme": "none"}  # z-score would use the whole volume's statistics
    predictor = Predictor(plan.build_network(), plan, device="cpu")
    vol = np.random.default_rng(1).normal(size=(40, 30, 3)).astype(np.float32)
    pred = predictor.predict_image(ImageData(array=vol, affine=np.diag([0.5, 0.5, 2.0, 1.0]), path="v.nii"))
    assert pred.label.shape == (40, 30, 3)
    # each slice on its own gives the same answer
    one = predictor.predict_image(ImageData(array=vol[..., 1:2], affine=np.diag([0.5, 0.5, 2.0, 1.0]), path="s.nii"))
    np.testing.assert_allclose(pred.probabilities[..., 1], one.probabilities[..., 0], atol=1e-4)


def test_predictor_rejects_wrong_channels_and_dimensions():
    from medunet.io import ImageData, InputError

    plan = Plan(patch_size=[16, 16, 16], network={"name": "unet", **networks.get_spec("unet").tiny_options})
    predictor = Predictor(plan.build_network(), plan, device="cpu")
    with pytest.raises(InputError, match="channel"):
        predictor.predict_image(ImageData(array=np.zeros((8, 8, 8, 2), np.float32), affine=np.eye(4), path="a.nii"))
    with pytest.raises(InputError, match="2D image"):
        predictor.predict_image(ImageData(array=np.zeros((8, 8), np.float32), affine=np.eye(4), path="b.png",
                                          source="2d"))
    with pytest.raises(ValueError, match="variance"):
        Predictor(plan.build_network(), plan, device="cpu", uncertainty="variance")


def test_inferer_keeps_metatensor_metadata_for_invertd():
    from monai.data import MetaTensor

    net = networks.create("unet", spatial_dims=3, **networks.get_spec("unet").tiny_options).eval()
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))
    x = MetaTensor(torch.randn(1, 1, 20, 16, 8), affine=affine)
    with torch.inference_mode():
        y = build_inferer(net, roi_size=(8, 8, 8))(x, net)
    assert isinstance(y, MetaTensor) and y.shape == (1, 2, 20, 16, 8)
    torch.testing.assert_close(y.affine, affine)


def test_auto_window_is_the_whole_image_when_it_fits_else_the_patch_scaled_up():
    from medunet.inference.sliding import auto_window

    assert auto_window((256, 256, 158), (48, 48, 24), 16 * 2**20) == (256, 256, 158)
    big = auto_window((512, 512, 300), (48, 48, 24), 8 * 2**20)
    assert np.prod(big) <= 8 * 2**20 and big[0] == big[1] and abs(big[0] / big[2] - 2.0) < 0.1
    flat = auto_window((600, 600, 20), (96, 96, 96), 4 * 2**20)  # z clipped: in-plane takes the budget
    assert flat[2] == 20 and flat[0] > 400
    net = networks.create("unet", spatial_dims=3, **networks.get_spec("unet").tiny_options).eval()
    inferer = build_inferer(net, roi_size="auto", max_window_voxels=1000)
    x = torch.randn(1, 1, 20, 20, 8)
    with torch.inference_mode():
        out = inferer(x, net)
    assert out.shape == (1, 2, 20, 20, 8) and inferer.last_stats["windows"] > 1


def test_auto_window_keeps_the_training_patch_for_instance_norm_networks():
    """Instance/group norm normalise by the window's own statistics, so an IN network's output changes
    with the window size: "auto" then uses the training patch (nnU-Net's rule); a batch-norm network in
    eval mode does not care, so it gets large windows."""
    from medunet.inference.sliding import has_window_dependent_norm

    opts = {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "filters": (4, 8, 16)}
    inst = networks.create("dynunet", spatial_dims=3, in_channels=1, out_channels=2, **opts).eval()
    batch = networks.create("dynunet", spatial_dims=3, in_channels=1, out_channels=2, norm_name="batch", **opts).eval()
    assert has_window_dependent_norm(inst) and not has_window_dependent_norm(batch)
    assert has_window_dependent_norm(networks.create("segresnet", spatial_dims=3, **networks.get_spec("segresnet").tiny_options))
    x = torch.randn(1, 1, 32, 28, 12)
    for net, expected in ((inst, (8, 8, 8)), (batch, (32, 28, 12))):
        inferer = TiledInferer(roi_size="auto", patch_size=(8, 8, 8))
        with torch.inference_mode():
            out = inferer(x, net)
        assert out.shape == (1, 2, 32, 28, 12)
        assert inferer.last_stats["tile_in"] == expected
    # an image inside the patch is still predicted whole (padded to the patch)
    inferer = TiledInferer(roi_size="auto", patch_size=(8, 8, 8))
    with torch.inference_mode():
        inferer(torch.randn(1, 1, 8, 6, 8), inst)
    assert inferer.last_stats["tile_in"] == (8, 8, 8) and inferer.last_stats["windows"] == 1


def test_body_box_finds_the_body_on_a_coarse_grid_and_widens_it():
    from medunet.inference import body_box

    x = torch.full((1, 40, 36, 20), -1000.0)
    x[0, 10:21, 8:30, 5:9] = 40.0  # soft tissue
    box = body_box(x, threshold=-500.0, margin=2, factor=4)
    # coarse blocks [8,24) x [8,32) x [4,12), widened by 2 and clipped
    assert box == (slice(6, 26), slice(6, 34), slice(2, 14))
    assert body_box(torch.full((1, 8, 8, 8), -1000.0)) == (slice(0, 8),) * 3  # no body: everything


def test_body_crop_predicts_background_outside_the_body_box():
    from medunet.io import ImageData

    plan = Plan(patch_size=[16, 16, 16], target_spacing=[1.0, 1.0, 1.0],
                normalization={"scheme": "ct", "clip": [-200.0, 300.0], "mean": 50.0, "std": 100.0},
                network={"name": "unet", **networks.get_spec("unet").tiny_options})
    torch.manual_seed(0)
    net = plan.build_network()
    arr = np.full((48, 40, 24), -1000.0, dtype=np.float32)
    arr[16:30, 12:28, 8:16] = 60.0
    image = ImageData(array=arr, affine=np.eye(4), path="ct.nii.gz")
    full = Predictor(net, plan, device="cpu", cpu_bf16=False).predict_image(image)
    crop = Predictor(net, plan, device="cpu", cpu_bf16=False, body_crop=True, body_margin=4).predict_image(image)
    assert crop.label.shape == arr.shape and crop.stats["body_box"] == ((12, 36), (8, 32), (4, 20))
    outside = np.ones(arr.shape, bool)
    outside[12:36, 8:32, 4:20] = False
    assert (crop.label[outside] == 0).all() and np.allclose(crop.probabilities[0][outside], 1.0)
    assert full.stats.get("body_box") is None


@pytest.mark.parametrize("geometry", ["resampled_oblique", "reoriented_only"])
def test_label_without_probabilities_equals_the_full_way_back(geometry, monkeypatch):
    """probabilities=False (label decided a few planes at a time) gives the same label as the full
    K-channel way back, with resampling or a pure axis permutation, a nonzero crop and the body crop."""
    from medunet.data import grid as grid_module
    from medunet.io import ImageData

    monkeypatch.setattr(grid_module, "_CHUNK_VOXELS", 500)  # many chunks even on a small volume
    spacing = [1.3, 0.9, 2.1] if geometry == "resampled_oblique" else [1.0, 1.0, 1.0]
    plan = Plan(patch_size=[16, 16, 16], target_spacing=spacing,
                labels={"background": 0, "a": 1, "b": 2},
                normalization={"scheme": "ct", "clip": [-200.0, 300.0], "mean": 50.0, "std": 100.0},
                network={"name": "unet", **networks.get_spec("unet").tiny_options})
    torch.manual_seed(0)
    net = plan.build_network()
    rng = np.random.default_rng(0)
    arr = np.full((30, 26, 18), -1000.0, dtype=np.float32)
    arr[8:24, 6:20, 4:14] = rng.normal(40.0, 80.0, (16, 14, 10))
    arr[:3] = 0.0  # zero slabs: cropped away as outside the nonzero region
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS storage: reoriented to RAS
    if geometry == "resampled_oblique":
        c, s = np.cos(0.3), np.sin(0.3)
        affine = affine @ np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    image = ImageData(array=arr, affine=affine, path="ct.nii.gz")
    for body in (False, True):
        predictor = Predictor(net, plan, device="cpu", cpu_bf16=False, body_crop=body, body_margin=2)
        full = predictor.predict_image(image)
        lean = predictor.predict_image(image, probabilities=False)
        assert lean.probabilities is None and lean.label.dtype == np.uint8 and lean.label.shape == arr.shape
        np.testing.assert_array_equal(lean.label, full.label)
        assert len(np.unique(full.label)) > 1  # the comparison is not between two empty labels
    blank = predictor.predict_image(ImageData(array=np.zeros((8, 8, 8), np.float32), affine=np.eye(4),
                                              path="blank.nii.gz"), probabilities=False)
    assert blank.probabilities is None and not blank.label.any()
    # release_input (what segment asks for): the same label, and the image keeps its shape without its voxels
    released = ImageData(array=arr.copy(), affine=affine, path="ct.nii.gz")
    freed = predictor.predict_image(released, probabilities=False, release_input=True)
    np.testing.assert_array_equal(freed.label, lean.label)
    assert released.spatial_shape == arr.shape and released.array.strides == (0, 0, 0) and not released.array.any()
