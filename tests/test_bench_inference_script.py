"""The inference benchmark's measuring pieces: the shifted-grid reference inferer
(:mod:`medunet.inference.benchmark`) and the agreement measures as scripts/bench_inference.py imports them.
The benchmark itself is a long script run by hand, not in CI."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from medunet.inference.benchmark import ShiftedGridInferer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_inference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_inference"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_inference", None)


def _tiler() -> SlidingWindowInferer:
    return SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=2, overlap=0.5, mode="gaussian")


@pytest.mark.parametrize("shift", [1, 3, 4])
def test_shifted_grid_keeps_shape_and_is_exact_for_a_pointwise_network(bench, shift):
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, kernel_size=1).eval()
    x = torch.randn(1, 1, 13, 11, 9)
    with torch.no_grad():
        plain = _tiler()(x, net)
        shifted = ShiftedGridInferer(_tiler(), shift)(x, net)
    assert shifted.shape == plain.shape == (1, 2, 13, 11, 9)
    # a 1×1×1 network has no receptive field, so moving the window borders changes nothing
    torch.testing.assert_close(shifted, plain, rtol=1e-5, atol=1e-5)


def test_shifted_grid_moves_the_border_effects_of_a_padded_network(bench):
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, kernel_size=5, padding=2, bias=False).eval()
    x = torch.randn(1, 1, 20, 20, 20)
    with torch.no_grad():
        plain = _tiler()(x, net)
        shifted = ShiftedGridInferer(_tiler(), 3)(x, net)
        whole = net(x)
    # zero padding at window borders makes tiled outputs depend on where the grid lies
    assert not torch.allclose(shifted, plain, atol=1e-4)
    assert (whole - plain).abs().max() > 1e-3


def test_agreement_measures(bench):
    a = np.zeros((4, 4, 4), np.uint8)
    b = a.copy()
    a[:2] = 1
    b[:1] = 1
    b[3] = 2
    assert bench.dice(a, a, [1, 2]) == 1.0
    # class 1: 2·16 / (32 + 16); class 2 only in b: 0
    assert bench.dice(a, b, [1]) == pytest.approx(2 / 3)
    assert bench.dice(a, b, [1, 2]) == pytest.approx(1 / 3)
    # voxel-weighted: 16 agreeing foreground voxels out of 32 + 32
    assert bench.micro_dice(a, b) == pytest.approx(0.5)
