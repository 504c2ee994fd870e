"""At MONAI's settings, ``TiledInferer(placement="monai")`` blends exactly what MONAI's
``sliding_window_inference`` blends: same windows, same gaussian, same normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer, sliding_window_inference

from medunet import networks
from medunet.data import Plan
from medunet.inference import Predictor, TiledInferer
from medunet.inference.sliding import monai_starts, tile_starts
from medunet.io import ImageData

TOL = 1e-4  # the issue's bound on max |Δ|


def _two_layer_net(dims: int = 3, hidden: int = 4, out: int = 3) -> torch.nn.Module:
    conv = getattr(torch.nn, f"Conv{dims}d")
    torch.manual_seed(0)
    return torch.nn.Sequential(conv(1, hidden, 3, padding=1), torch.nn.ReLU(), conv(hidden, out, 3, padding=1)).eval()


def _tiny_unet(dims: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return networks.create("unet", dims, 1, 3, **networks.get_spec("unet").tiny_options).eval()


def _max_diff(x, net, roi, overlap=0.5, mode="gaussian", sigma_scale=0.125, sw=4, **kw):
    ours = TiledInferer(roi_size=roi, overlap=overlap, mode=mode, sigma_scale=sigma_scale, sw_batch_size=sw,
                        placement="monai", **kw)
    with torch.inference_mode():
        ref = sliding_window_inference(x, roi, sw, net, overlap=overlap, mode=mode, sigma_scale=sigma_scale)
        out = ours(x, net)
    assert out.shape == ref.shape
    return float((out - ref).abs().max()), ours.last_stats


@pytest.mark.parametrize("shape,roi,overlap", [
    ((50, 43, 37), (24, 24, 24), 0.5),    # several windows per axis, last ones moved back to the end
    ((50, 43, 37), (24, 16, 24), 0.25),
    ((41, 30, 29), (16, 16, 16), 0.625),  # step int(16 * 0.375) = 6: many windows
])
def test_matches_monai_on_many_overlapping_windows(shape, roi, overlap):
    x = torch.randn(1, 1, *shape)
    for net in (_two_layer_net(), _tiny_unet()):
        diff, stats = _max_diff(x, net, roi, overlap=overlap)
        assert stats["windows"] >= 12
        assert diff <= TOL, diff


def test_the_even_placement_is_not_monai_s():
    """The exactness above comes from the placement: the default rule spreads windows differently."""
    x = torch.randn(1, 1, 50, 43, 37)
    net = _two_layer_net()
    even = TiledInferer(roi_size=(24, 24, 24), overlap=0.5, sw_batch_size=4)
    with torch.inference_mode():
        ref = sliding_window_inference(x, (24, 24, 24), 4, net, overlap=0.5, mode="gaussian")
        assert float((even(x, net) - ref).abs().max()) > 100 * TOL


@pytest.mark.parametrize("shape", [(12, 40, 30), (10, 9, 7)])
def test_matches_monai_when_the_image_is_smaller_than_the_window(shape):
    """MONAI pads short axes (zeros, centred) up to the window instead of shrinking the window."""
    x = torch.randn(1, 1, *shape) + 2.0
    diff, stats = _max_diff(x, _two_layer_net(), (16, 16, 16))
    assert stats["tile_in"] == (16, 16, 16)
    assert diff <= TOL


@pytest.mark.parametrize("mode,sigma_scale", [("constant", 0.125), ("gaussian", 0.25), ("gaussian", 0.05)])
def test_matches_monai_in_other_blending_modes(mode, sigma_scale):
    x = torch.randn(2, 1, 33, 27, 20)  # batch of two images
    diff, _ = _max_diff(x, _two_layer_net(), (16, 16, 16), mode=mode, sigma_scale=sigma_scale, sw=3)
    assert diff <= TOL


def test_matches_monai_in_2d():
    x = torch.randn(1, 1, 70, 53)
    diff, stats = _max_diff(x, _tiny_unet(2), (24, 24), sw=5)
    assert stats["windows"] > 9 and diff <= TOL


def test_reused_constant_windows_stay_exact():
    """Windows of air are computed once and reused; the result is still MONAI's."""
    x = torch.full((1, 1, 60, 60, 20), -1.0)
    x[..., 20:36, 24:40, 4:16] = torch.randn(16, 16, 12)
    diff, stats = _max_diff(x, _tiny_unet(), (16, 16, 16), skip_constant=True)
    assert stats["reused"] > 0 and diff <= TOL


@pytest.mark.slow
def test_matches_monai_on_the_issue_volume():
    """The issue's case: a random two-layer conv net on 150×130×110 at roi 96³, overlap 0.5, gaussian."""
    x = torch.randn(1, 1, 150, 130, 110)
    diff, stats = _max_diff(x, _two_layer_net(hidden=2), (96, 96, 96))
    assert stats["starts"] == [[0, 48, 54], [0, 34], [0, 14]]
    assert diff <= TOL


@pytest.mark.parametrize("tile", [1, 7, 16, 96])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.625, 0.9])
def test_monai_and_even_placements_need_the_same_number_of_windows(tile, overlap):
    """Neither rule costs more network time: the window counts agree for every axis length."""
    for size in range(tile, 4 * tile + 40):
        starts = monai_starts(size, tile, overlap)
        step = max(1, int(tile * (1 - overlap)))
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(0 < b - a <= step for a, b in zip(starts, starts[1:]))
        assert len(starts) == len(tile_starts(size, tile, step, aligned=False)) == \
            (1 if size == tile else math.ceil((size - tile) / step) + 1)


def test_monai_starts_refuses_an_axis_shorter_than_the_window():
    with pytest.raises(ValueError, match="shorter than the window"):
        monai_starts(5, 8, 0.5)


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="placement"):
        TiledInferer(roi_size=8, placement="grid")


def test_predictor_with_monai_placement_gives_monai_s_probabilities():
    """End to end (preprocessing, softmax, the way back to the input grid): the Predictor with MONAI's
    settings and ``placement="monai"`` equals the same Predictor running MONAI's inferer."""
    plan = Plan(labels={"background": 0, "a": 1, "b": 2}, patch_size=[16, 16, 16], target_spacing=[1.5, 1.5, 2.0],
                normalization={"scheme": "zscore"}, network={"name": "unet"})
    rng = np.random.default_rng(0)
    image = ImageData(array=rng.normal(size=(44, 37, 30)).astype(np.float32) + 3.0,
                      affine=np.diag([1.2, 1.1, 1.9, 1.0]), path="case.nii.gz")
    net = _tiny_unet()
    settings = {"roi_size": (16, 16, 16), "overlap": 0.5, "sw_batch_size": 4, "cpu_bf16": False}
    ours = Predictor(net, plan, device="cpu", placement="monai", **settings).predict_image(image)
    monai = Predictor(net, plan, device="cpu", **settings)
    monai.inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=4, overlap=0.5, mode="gaussian")
    ref = monai.predict_image(image)
    assert ours.stats["windows"] > 8
    assert float(np.abs(ours.probabilities - ref.probabilities).max()) <= TOL
    assert np.array_equal(ours.label, ref.label)
