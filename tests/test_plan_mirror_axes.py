"""Plan.mirror_axes: the axes training mirrored, which test-time augmentation then mirrors (nnU-Net's rule)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medunet.data import Plan
from medunet.inference import Predictor
from medunet.io import ImageData


def test_plan_mirror_axes_roundtrip_and_validation(tmp_path):
    plan = Plan(labels={"background": 0, "a": 1}, patch_size=[8, 8, 8], mirror_axes=[0])
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").mirror_axes == [0]
    assert Plan().mirror_axes is None  # old plans: all axes
    with pytest.raises(ValueError, match="mirror_axes"):
        Plan(spatial_dims=2, patch_size=[8, 8], mirror_axes=[2])


class _CountingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.conv = torch.nn.Conv3d(1, 2, 1)

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


@pytest.mark.parametrize("axes, passes", [(None, 8), ([0], 2), ([], 1)])
def test_predictor_tta_mirrors_only_the_plan_axes(axes, passes):
    plan = Plan(labels={"background": 0, "a": 1}, modality="MRI", patch_size=[8, 8, 8], target_spacing=None,
                network={"name": "unet"}, mirror_axes=axes)
    net = _CountingNet()
    image = ImageData(array=np.random.default_rng(0).random((8, 8, 8)).astype(np.float32) + 1, affine=np.eye(4),
                      path="x.nii.gz")
    Predictor(net, plan, device="cpu", tta=True).predict_image(image)
    assert net.calls == passes
