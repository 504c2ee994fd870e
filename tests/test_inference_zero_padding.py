"""'Same' networks see zero padding (the normalised mean) at inference, as in training.

Training pads patches with zeros (train_transforms' ``SpatialPadd(mode="constant")``, the in-memory
``PatchDataset``); mirrored padding at inference put a reflected copy of the anatomy beside small images,
which the network never saw, and cost 0.04 mean Dice on real hippocampus crops.
"""

from __future__ import annotations

import torch

from medunet import networks
from medunet.data import Plan
from medunet.inference import build_inferer


class _Recorder(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)

    def __getattr__(self, name):  # shape rules of the wrapped network
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)


def test_same_network_windows_are_zero_padded_beyond_a_small_image():
    net = networks.create("unet", 3, 1, 2, **networks.get_spec("unet").tiny_options).eval()
    rec = _Recorder(net)
    plan = Plan(labels={"background": 0, "a": 1}, patch_size=[8, 8, 8], network={"name": "unet"})
    inferer = build_inferer(rec, plan, skip_constant=False)
    x = torch.rand(1, 1, 6, 8, 5) + 1.0  # smaller than the window on two axes, no zeros inside
    with torch.no_grad():
        out = inferer(x, rec)
    assert out.shape == (1, 2, 6, 8, 5)
    seen = rec.inputs[0]
    assert tuple(seen.shape[2:]) == (8, 8, 8)
    # centred, as nnU-Net pads: 6 -> 1 + 6 + 1, 5 -> 1 + 5 + 2
    assert torch.equal(seen[:, :, 1:7, :, 1:6], x)
    inside = torch.zeros_like(seen, dtype=torch.bool)
    inside[:, :, 1:7, :, 1:6] = True
    assert float(seen[~inside].abs().sum()) == 0
    # and the blended output is the window's output at the image's place
    with torch.no_grad():
        whole = net(seen)
    torch.testing.assert_close(out, whole[:, :, 1:7, :, 1:6])


def test_centred_padding_when_only_some_axes_are_small():
    """An axis longer than the window is tiled; a shorter one is padded on both sides and cropped back."""
    net = networks.create("unet", 3, 1, 2, **networks.get_spec("unet").tiny_options).eval()
    rec = _Recorder(net)
    plan = Plan(labels={"background": 0, "a": 1}, patch_size=[8, 8, 8], network={"name": "unet"})
    inferer = build_inferer(rec, plan, roi_size=(8, 8, 8), skip_constant=False)
    x = torch.rand(1, 1, 11, 4, 8) + 1.0
    with torch.no_grad():
        out = inferer(x, rec)
    assert out.shape == (1, 2, 11, 4, 8)
    for seen in rec.inputs:
        assert tuple(seen.shape[2:]) == (8, 8, 8)
        assert float(seen[:, :, :, :2].abs().sum()) == 0 and float(seen[:, :, :, 6:].abs().sum()) == 0
        assert float(seen[:, :, :, 2:6].abs().min()) >= 1.0
