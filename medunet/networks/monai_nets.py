"""MONAI's segmentation networks behind medunet's factory, with 3D defaults and shape rules.

Each wrapper subclasses the MONAI class (state-dict keys and TorchScript export stay MONAI's) and adds
:class:`~medunet.networks.shapes.ShapeRuleMixin` so planners and predictors know the valid input sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.networks import nets as mnets

from medunet.networks.registry import register
from medunet.networks.shapes import ShapeRuleMixin, divisible_rule

__all__ = [
    "ResidualUNet", "BasicUNet", "DynUNet", "AttentionUNet", "SegResNet", "UNETR", "SwinUNETR",
    "dynunet_layout",
]


def _per_axis(value: int | Sequence[int], spatial_dims: int) -> list[int]:
    if isinstance(value, (int, float)):
        return [int(value)] * spatial_dims
    value = [int(v) for v in value]
    if len(value) != spatial_dims:
        raise ValueError(f"expected {spatial_dims} values per axis, got {value}")
    return value


def _stride_divisors(strides, spatial_dims: int) -> tuple[int, ...]:
    """Total downsampling factor per axis: the product of every level's stride on that axis."""
    return tuple(math.prod(_per_axis(s, spatial_dims)[a] for s in strides) for a in range(spatial_dims))


class _DivisibleMixin(ShapeRuleMixin):
    """'same' networks: output = input, each axis a multiple of the total downsampling factor."""

    divisors = ()  # per-axis total downsampling factor, set by each subclass

    def axis_output_size(self, size: int, axis: int) -> int | None:
        return divisible_rule(size, self.divisors[axis])


class ResidualUNet(_DivisibleMixin, mnets.UNet):
    """MONAI ``UNet`` (residual units, instance norm): ``(B, Cin, *S)`` → ``(B, Cout, *S)``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels, strides, **kw):
        super().__init__(spatial_dims, in_channels, out_channels, channels, strides, **kw)
        self.spatial_dims = spatial_dims
        self.divisors = _stride_divisors(strides, spatial_dims)


@register("unet", description="MONAI UNet with residual units (Kerfoot et al.)",
          tiny_options={"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1})
def residual_unet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    norm: str = "instance",
    dropout: float = 0.0,
    **kw,
) -> ResidualUNet:
    return ResidualUNet(spatial_dims, in_channels, out_channels, tuple(channels), tuple(strides),
                        num_res_units=num_res_units, norm=norm, dropout=dropout, **kw)


class BasicUNet(_DivisibleMixin, mnets.BasicUNet):
    """MONAI ``BasicUNet`` (4 poolings): ``(B, Cin, *S)`` → ``(B, Cout, *S)``, S multiple of 16."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **kw):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kw)
        self.spatial_dims = spatial_dims
        self.divisors = (16,) * spatial_dims


@register("basicunet", description="MONAI BasicUNet (two convs per level, 4 poolings)",
          tiny_options={"features": (4, 4, 8, 8, 16, 4)})
def basic_unet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
               features: Sequence[int] = (32, 32, 64, 128, 256, 32), **kw) -> BasicUNet:
    return BasicUNet(spatial_dims, in_channels, out_channels, features=tuple(features), **kw)


def dynunet_layout(
    spatial_dims: int,
    patch_size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    max_levels: int = 6,
    min_size: int = 4,
) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net's rule for DynUNet kernels and strides from a patch size and spacing.

    An axis is pooled while its size stays >= ``2 * min_size`` and its spacing is at most twice the
    finest spacing; an axis whose spacing is more than twice the finest gets in-plane-only (1) kernels
    until the anisotropy is evened out.

    Returns:
        ``(kernel_size, strides)``, each a list of per-level per-axis lists; ``strides[0]`` is all ones.
    """
    if patch_size is None:
        patch_size = [128] * spatial_dims
    sizes = [int(s) for s in patch_size]
    spacings = [float(s) for s in (spacing or [1.0] * spatial_dims)]
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1] * spatial_dims]
    while len(strides) < max_levels:
        finest = min(spacings)
        stride = [2 if (sz >= 2 * min_size and sp <= 2 * finest) else 1 for sz, sp in zip(sizes, spacings)]
        kernels.append([3 if sp <= 2 * finest else 1 for sp in spacings])
        if all(s == 1 for s in stride):
            break
        strides.append(stride)
        sizes = [sz // st for sz, st in zip(sizes, stride)]
        spacings = [sp * st for sp, st in zip(spacings, stride)]
    kernels.append([3 if sp <= 2 * min(spacings) else 1 for sp in spacings])
    kernels = kernels[: len(strides)]
    return kernels, strides


class DynUNet(_DivisibleMixin, mnets.DynUNet):
    """MONAI ``DynUNet`` (nnU-Net's architecture): ``(B, Cin, *S)`` → ``(B, Cout, *S)``.

    In training mode with ``deep_supervision`` the output is ``(B, 1 + deep_supr_num, Cout, *S)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size, strides, **kw):
        super().__init__(spatial_dims, in_channels, out_channels, kernel_size, strides, **kw)
        self.spatial_dims = spatial_dims
        self.divisors = _stride_divisors(strides, spatial_dims)


@register("dynunet", description="MONAI DynUNet, nnU-Net-like; kernels/strides from a plan",
          tiny_options={"strides": [1, 2, 2], "kernel_size": [3, 3, 3], "filters": (4, 8, 16)})
def dyn_unet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    kernel_size: Sequence | None = None,
    strides: Sequence | None = None,
    filters: Sequence[int] | None = None,
    patch_size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    deep_supervision: bool = False,
    deep_supr_num: int = 1,
    res_block: bool = False,
    max_filters: int = 320,
    base_filters: int = 32,
    **kw,
) -> DynUNet:
    """DynUNet; without explicit ``kernel_size``/``strides`` they come from ``patch_size`` and ``spacing``
    by :func:`dynunet_layout` (default: 5 poolings of a 128-voxel patch). Filters double per level from
    ``base_filters`` up to ``max_filters`` (nnU-Net's 32…320)."""
    if kernel_size is None or strides is None:
        kernel_size, strides = dynunet_layout(spatial_dims, patch_size, spacing)
    if len(kernel_size) != len(strides):
        raise ValueError(f"kernel_size and strides need one entry per level: {kernel_size} vs {strides}")
    if filters is None:
        filters = [min(base_filters * 2**i, max_filters) for i in range(len(strides))]
    return DynUNet(
        spatial_dims, in_channels, out_channels, list(kernel_size), list(strides),
        upsample_kernel_size=list(strides)[1:], filters=list(filters), deep_supervision=deep_supervision,
        deep_supr_num=deep_supr_num, res_block=res_block, **kw,
    )


class AttentionUNet(_DivisibleMixin, mnets.AttentionUnet):
    """MONAI ``AttentionUnet`` (Oktay et al.): ``(B, Cin, *S)`` → ``(B, Cout, *S)``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels, strides, **kw):
        super().__init__(spatial_dims, in_channels, out_channels, channels, strides, **kw)
        self.spatial_dims = spatial_dims
        self.divisors = _stride_divisors(strides, spatial_dims)


@register("attentionunet", description="MONAI AttentionUnet (attention-gated skips)",
          tiny_options={"channels": (4, 8, 16), "strides": (2, 2)})
def attention_unet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                   channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Sequence[int] = (2, 2, 2, 2),
                   **kw) -> AttentionUNet:
    return AttentionUNet(spatial_dims, in_channels, out_channels, tuple(channels), tuple(strides), **kw)


class SegResNet(_DivisibleMixin, mnets.SegResNet):
    """MONAI ``SegResNet`` (Myronenko): ``(B, Cin, *S)`` → ``(B, Cout, *S)``."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **kw):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kw)
        self.spatial_dims = spatial_dims
        self.divisors = (2 ** (len(self.blocks_down) - 1),) * spatial_dims


@register("segresnet", description="MONAI SegResNet (residual encoder, light decoder)",
          tiny_options={"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)})
def seg_res_net(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, init_filters: int = 16,
                blocks_down: Sequence[int] = (1, 2, 2, 4), blocks_up: Sequence[int] = (1, 1, 1),
                **kw) -> SegResNet:
    return SegResNet(spatial_dims, in_channels, out_channels, init_filters=init_filters,
                     blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up), **kw)


class UNETR(ShapeRuleMixin, mnets.UNETR):
    """MONAI ``UNETR`` (ViT encoder): accepts exactly ``img_size``; ``(B, Cin, *img_size)`` → same."""

    def __init__(self, in_channels: int, out_channels: int, img_size, spatial_dims: int = 3, **kw):
        super().__init__(in_channels, out_channels, img_size, spatial_dims=spatial_dims, **kw)
        self.spatial_dims = spatial_dims
        self.img_size = tuple(_per_axis(img_size, spatial_dims))

    def axis_output_size(self, size: int, axis: int) -> int | None:
        return size if size == self.img_size[axis] else None


@register("unetr", description="MONAI UNETR (transformer encoder; fixed input size img_size)",
          tiny_options={"img_size": 32, "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4})
def unetr(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
          img_size: int | Sequence[int] = 96, feature_size: int = 16, hidden_size: int = 768,
          mlp_dim: int = 3072, num_heads: int = 12, **kw) -> UNETR:
    return UNETR(in_channels, out_channels, img_size, spatial_dims=spatial_dims, feature_size=feature_size,
                 hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads, **kw)


class SwinUNETR(_DivisibleMixin, mnets.SwinUNETR):
    """MONAI ``SwinUNETR``: ``(B, Cin, *S)`` → ``(B, Cout, *S)``, S a multiple of 32."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 3, **kw):
        super().__init__(in_channels, out_channels, spatial_dims=spatial_dims, **kw)
        self.spatial_dims = spatial_dims
        self.divisors = (32,) * spatial_dims

    def axis_output_size(self, size: int, axis: int) -> int | None:
        # 32 would leave a 1-voxel bottleneck, which instance norm rejects in training.
        return divisible_rule(size, 32, minimum=64)


@register("swinunetr", description="MONAI SwinUNETR (shifted-window transformer encoder)",
          tiny_options={"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)})
def swin_unetr(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, feature_size: int = 24,
               **kw) -> SwinUNETR:
    return SwinUNETR(in_channels, out_channels, spatial_dims=spatial_dims, feature_size=feature_size, **kw)
