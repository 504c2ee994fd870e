"""Networks: the seed's exact shapes and parameter count, size rules, every network forward/backward."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from medunet import networks


def test_seed_unet_parameter_count_is_exact():
    net = networks.create("unet2015", spatial_dims=2, in_channels=1, out_channels=2)
    assert networks.count_parameters(net) == 31_030_658


def test_seed_unet_shape_table_572():
    """The seed paper's table, checked by running the real 2D network on a 1x1x572x572 input."""
    net = networks.create("unet2015", spatial_dims=2, in_channels=1, out_channels=2).eval()
    seen: dict[str, list[tuple[int, ...]]] = {"pool": [], "bottleneck": [], "upconv": []}
    hooks = [net.pool.register_forward_hook(lambda m, i, o: seen["pool"].append((*o.shape[2:], o.shape[1])))]
    hooks.append(net.bottleneck.register_forward_hook(
        lambda m, i, o: seen["bottleneck"].append((*o.shape[2:], o.shape[1]))))
    for up in net.upconvs:
        hooks.append(up.register_forward_hook(lambda m, i, o: seen["upconv"].append((*o.shape[2:], o.shape[1]))))
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 572, 572))
    for h in hooks:
        h.remove()
    assert seen["pool"] == [(284, 284, 64), (140, 140, 128), (68, 68, 256), (32, 32, 512)]
    assert seen["bottleneck"] == [(28, 28, 1024)]
    assert seen["upconv"] == [(56, 56, 512), (104, 104, 256), (200, 200, 128), (392, 392, 64)]
    assert tuple(out.shape) == (1, 2, 388, 388)
    # the arithmetic API agrees with the real forward pass
    table = net.feature_shapes((572, 572))
    assert table["pools"] == seen["pool"] and table["upconvs"] == seen["upconv"]
    assert net.output_shape((572, 572)) == (388, 388)
    assert net.input_margin((572, 572)) == (92, 92)


def test_seed_valid_sizes_follow_16n_plus_60():
    net = networks.create("unet2015", spatial_dims=2, features=(2, 4, 8, 16, 32))
    valid = [s for s in range(1, 300) if net.is_valid_input_shape((s, s))]
    # s = 16n + 60 with n the bottleneck input size; n >= 8 so that every decoder stage stays positive
    # (the seed text's "n >= 5" only keeps the bottleneck positive; n = 5..7 fail in the decoder).
    assert valid == [16 * n + 60 for n in range(8, 15)]
    for s in valid:
        assert net.output_shape((s, s)) == (s - 184, s - 184)


def test_unet3d_cicek_shapes():
    net = networks.create("unet3d", spatial_dims=3, in_channels=3, out_channels=3, features=(8, 16, 32, 64)).eval()
    assert net.output_shape((132, 132, 116)) == (44, 44, 28)
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 132, 132, 116))
    assert tuple(out.shape) == (1, 3, 44, 44, 28)
    # batch norm, channels doubled before pooling (first conv has half the level's channels)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    assert net.encoders[0][0].out_channels == 4 and net.encoders[0][3].out_channels == 8


def test_unet3d_full_width_layout():
    net = networks.create("unet3d", spatial_dims=3, in_channels=3, out_channels=3)
    widths = [(m.in_channels, m.out_channels) for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    # Cicek et al.: 3-32-64 | 64-64-128 | 128-128-256 | 256-256-512 | 768-256-256 | 384-128-128 | 192-64-64
    assert widths[:8] == [(3, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512)]
    assert widths[8:14] == [(768, 256), (256, 256), (384, 128), (128, 128), (192, 64), (64, 64)]


@pytest.mark.parametrize("dims", [2, 3])
def test_same_padding_keeps_size(dims):
    net = networks.create("unet2015", spatial_dims=dims, padding="same", features=(4, 8, 16, 32)).eval()
    shape = (48,) * dims
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *shape))
    assert tuple(out.shape[2:]) == shape
    assert net.output_shape(shape) == shape


def test_invalid_size_names_nearest_valid_before_compute():
    net = networks.create("unet2015", spatial_dims=2)
    calls = []
    net.encoders[0].register_forward_pre_hook(lambda m, i: calls.append(1))
    with pytest.raises(ValueError, match=r"nearest valid: 492 or 508"):
        net(torch.zeros(1, 1, 500, 572))
    assert calls == []  # nothing was computed
    same = networks.create("unet", spatial_dims=3)
    with pytest.raises(ValueError, match=r"nearest valid: 32 or 48"):
        same.output_shape((40, 48, 48))


def test_he_init_std():
    net = networks.create("unet2015", spatial_dims=2)
    conv = net.encoders[1][0]  # 3x3, 64 inputs
    expected = (2.0 / (9 * 64)) ** 0.5
    assert abs(float(conv.weight.std()) - expected) / expected < 0.02
    assert float(conv.bias.abs().max()) == 0.0


def test_dropout_at_end_of_contracting_path():
    net = networks.create("unet2015", spatial_dims=2)
    assert isinstance(net.dropout, torch.nn.Dropout2d) and net.dropout.p == 0.5


@pytest.mark.parametrize("name", sorted(networks.available()))
def test_every_network_forward_backward_each_dim(name):
    spec = networks.get_spec(name)
    for dims in spec.spatial_dims:
        net = networks.create(name, spatial_dims=dims, in_channels=2, out_channels=3, **spec.tiny_options)
        request = getattr(net, "img_size", None) or (32,) * dims
        shape = net.valid_input_shape(request)
        x = torch.randn(2, 2, *shape, requires_grad=True)
        out = net(x)
        assert out.shape[:2] == (2, 3)
        assert tuple(out.shape[2:]) == net.output_shape(shape)
        out.float().pow(2).mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_dynunet_layout_from_plan():
    kernels, strides = networks.dynunet_layout(3, (40, 56, 40), (1.0, 1.0, 1.0))
    assert strides[0] == [1, 1, 1] and len(kernels) == len(strides)
    net = networks.create("dynunet", spatial_dims=3, kernel_size=kernels, strides=strides, filters=[4] * len(strides))
    assert net.is_valid_input_shape((40, 56, 40))
    # anisotropic: the 3 mm axis is not pooled at first, and gets in-plane kernels
    kernels, strides = networks.dynunet_layout(3, (160, 160, 48), (0.8, 0.8, 3.0))
    assert strides[1] == [2, 2, 1] and kernels[0] == [3, 3, 1]


def test_unknown_network_and_bad_dims():
    with pytest.raises(ValueError, match="unknown network"):
        networks.create("nope")
    with pytest.raises(ValueError, match="spatial_dims"):
        networks.create("unet2015", spatial_dims=4)


def test_torchscript_export_of_seed_and_wrapper():
    for name in ("unet2015", "unet"):
        spec = networks.get_spec(name)
        net = networks.create(name, spatial_dims=2, **spec.tiny_options).eval()
        scripted = torch.jit.script(net)
        x = torch.randn(1, 1, *net.valid_input_shape((32, 32)))
        with torch.no_grad():
            assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_cli_networks_and_version():
    out = subprocess.run([sys.executable, "-m", "medunet.cli", "networks"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "31,030,658" in out.stdout and "dynunet" in out.stdout
    ver = subprocess.run([sys.executable, "-m", "medunet.cli", "--version"], capture_output=True, text=True)
    assert ver.returncode == 0 and "medunet" in ver.stdout
