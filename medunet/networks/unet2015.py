"""The original U-Net (Ronneberger et al., 2015) and the 3D U-Net (Çiçek et al., 2016).

Both are one dimension-agnostic class, :class:`ClassicUNet`: two 3×3(×3) convolutions + ReLU per
level, 2×2(×2) max-pooling, 2×2(×2) transposed-convolution upsampling, centre-crop-and-concatenate
skips and a 1×1(×1) output convolution, with ``padding="valid"`` (faithful: the output is smaller than
the input) or ``padding="same"`` (output = input).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from medunet.networks.registry import register
from medunet.networks.shapes import ShapeRuleMixin

__all__ = ["ClassicUNet", "unet2015", "unet3d"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_UPCONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}
_NORMS = {
    "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
}


def _norm_layer(norm: str | None, spatial_dims: int, channels: int) -> nn.Module:
    if norm is None or str(norm).lower() in ("none", ""):
        return nn.Identity()
    key = str(norm).lower()
    if key not in _NORMS:
        raise ValueError(f"norm must be None, 'batch' or 'instance', got {norm!r}")
    if key == "instance":
        return _NORMS[key][spatial_dims](channels, affine=True)
    return _NORMS[key][spatial_dims](channels)


class DoubleConv(nn.Sequential):
    """(conv 3 → [norm] → ReLU) × 2: ``(B, in, *S)`` → ``(B, out, *(S - 4))`` (valid) or ``*S`` (same)."""

    def __init__(self, spatial_dims: int, in_ch: int, mid_ch: int, out_ch: int, padding: int, norm: str | None):
        conv = _CONV[spatial_dims]
        super().__init__(
            conv(in_ch, mid_ch, 3, padding=padding),
            _norm_layer(norm, spatial_dims, mid_ch),
            nn.ReLU(inplace=True),
            conv(mid_ch, out_ch, 3, padding=padding),
            _norm_layer(norm, spatial_dims, out_ch),
            nn.ReLU(inplace=True),
        )


def _center_crop(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Crop the spatial axes of ``x`` (B, C, *S) centrally to the spatial size of ``target``."""
    for d in range(2, x.dim()):
        start = (x.shape[d] - target.shape[d]) // 2
        x = x.narrow(d, start, target.shape[d])
    return x


class ClassicUNet(ShapeRuleMixin, nn.Module):
    """Encoder–decoder U-Net with centre-cropped skip connections.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: classes (background included).
        features: channels of each level, top to bottom; the last is the bottleneck
            (2015: ``(64, 128, 256, 512, 1024)``; Çiçek: ``(64, 128, 256, 512)``).
        padding: ``"valid"`` (no padding, output smaller than input) or ``"same"``.
        norm: ``None``, ``"batch"`` or ``"instance"`` after every convolution.
        dropout: dropout probability at the end of the contracting path (after the bottleneck).
        double_before_pool: Çiçek-style levels whose first conv has half the level's channels.
        upconv_halves: 2015-style up-convolutions that halve the channels (else they keep them).

    Shapes:
        ``(B, in_channels, *S)`` → ``(B, out_channels, *self.output_shape(S))``.

    Example:
        >>> net = ClassicUNet(2, 1, 2)  # the 2015 U-Net, 31,030,658 parameters
        >>> net(torch.zeros(1, 1, 572, 572)).shape
        torch.Size([1, 2, 388, 388])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (64, 128, 256, 512, 1024),
        padding: str = "valid",
        norm: str | None = None,
        dropout: float = 0.5,
        double_before_pool: bool = False,
        upconv_halves: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        features = [int(f) for f in features]
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 levels (one pooling), got {features}")
        self.spatial_dims = spatial_dims
        self.padding = padding
        self.depth = len(features) - 1
        self.features = tuple(features)
        pad = 0 if padding == "valid" else 1

        def mid(f: int) -> int:
            return max(f // 2, 1) if double_before_pool else f

        self.encoders = nn.ModuleList()
        ch = in_channels
        for f in features[:-1]:
            self.encoders.append(DoubleConv(spatial_dims, ch, mid(f), f, pad, norm))
            ch = f
        self.pool = _POOL[spatial_dims](2)
        self.bottleneck = DoubleConv(spatial_dims, ch, mid(features[-1]), features[-1], pad, norm)
        self.dropout = _DROPOUT[spatial_dims](dropout) if dropout > 0 else nn.Identity()

        self.upconvs = nn.ModuleList()
        self.decoders = nn.ModuleList()
        ch = features[-1]
        for f in reversed(features[:-1]):
            up_ch = ch // 2 if upconv_halves else ch
            self.upconvs.append(_UPCONV[spatial_dims](ch, up_ch, 2, stride=2))
            self.decoders.append(DoubleConv(spatial_dims, up_ch + f, f, f, pad, norm))
            ch = f
        self.head = _CONV[spatial_dims](ch, out_channels, 1)
        self._he_init()

    def _he_init(self) -> None:
        # Gaussian with std sqrt(2 / N), N = k^d * C_in incoming connections (the paper's He init).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                fan_in = m.in_channels * math.prod(m.kernel_size)
            elif isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                fan_in = m.in_channels * math.prod(m.kernel_size) // math.prod(m.stride)
            else:
                continue
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / max(fan_in, 1)))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def axis_output_size(self, size: int, axis: int) -> int | None:
        loss = 4 if self.padding == "valid" else 0
        s = size
        for _ in range(self.depth):
            s -= loss
            if s <= 0 or s % 2:
                return None
            s //= 2
        s -= loss
        if s <= 0:
            return None
        for _ in range(self.depth):
            s = 2 * s - loss
            if s <= 0:
                return None
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottleneck(x))
        for i, (upconv, decoder) in enumerate(zip(self.upconvs, self.decoders)):
            x = upconv(x)
            skip = skips[len(skips) - 1 - i]
            x = decoder(torch.cat([_center_crop(skip, x), x], dim=1))
        return self.head(x)

    def feature_shapes(self, input_shape: Sequence[int]) -> dict[str, list[tuple[int, ...]]]:
        """Spatial size and channels after each pool, the bottleneck and each up-conv (the seed's table)."""
        self.check_input_shape(input_shape)
        loss = 4 if self.padding == "valid" else 0
        sizes = list(input_shape)
        pools, ups = [], []
        for f in self.features[:-1]:
            sizes = [(s - loss) // 2 for s in sizes]
            pools.append((*sizes, f))
        sizes = [s - loss for s in sizes]
        bottleneck = (*sizes, self.features[-1])
        for up in self.upconvs:
            sizes = [2 * s for s in sizes]
            ups.append((*sizes, up.out_channels))
            sizes = [s - loss for s in sizes]
        return {"pools": pools, "bottleneck": [bottleneck], "upconvs": ups}


def _features_for(features: Sequence[int] | None, depth: int | None, base: int, default_depth: int) -> list[int]:
    if features is not None:
        features = [int(f) for f in features]
        if depth is not None and depth != len(features) - 1:
            raise ValueError(f"depth={depth} contradicts features={features} ({len(features) - 1} poolings)")
        return features
    d = default_depth if depth is None else int(depth)
    if d < 1:
        raise ValueError(f"depth must be >= 1, got {d}")
    return [base * 2**i for i in range(d + 1)]


@register(
    "unet2015",
    description="Ronneberger et al. 2015 U-Net: valid/same 3x3 convs, max-pool, up-conv, crop-and-concat",
    tiny_options={"features": (4, 8, 16), "padding": "same"},
)
def unet2015(
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 2,
    features: Sequence[int] | None = None,
    depth: int | None = None,
    padding: str = "valid",
    norm: str | None = None,
    dropout: float = 0.5,
) -> ClassicUNet:
    """The seed U-Net. Defaults: features 64…1024 (depth 4), valid convs, no norm, dropout 0.5."""
    feats = _features_for(features, depth, 64, 4)
    return ClassicUNet(spatial_dims, in_channels, out_channels, feats, padding, norm, dropout)


@register(
    "unet3d",
    spatial_dims=(3, 2),
    description="Cicek et al. 2016 3D U-Net: batch norm, channels doubled before pooling, valid convs",
    tiny_options={"features": (4, 8, 16), "padding": "same"},
)
def unet3d(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    features: Sequence[int] | None = None,
    depth: int | None = None,
    padding: str = "valid",
    norm: str | None = "batch",
    dropout: float = 0.0,
) -> ClassicUNet:
    """The 3D U-Net. Defaults: features (64, 128, 256, 512), valid convs, batch norm.

    Input 132×132×116 gives output 44×44×28.
    """
    feats = _features_for(features, depth, 64, 3)
    return ClassicUNet(
        spatial_dims, in_channels, out_channels, feats, padding, norm, dropout,
        double_before_pool=True, upconv_halves=False,
    )
