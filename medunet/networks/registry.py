"""A decorator registry and the one factory through which every medunet network is built.

Each network family lives in one module and registers its names with :func:`register`; users call
:func:`create` and never import classes by path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn

__all__ = ["NetworkSpec", "register", "create", "available", "get_spec"]


@dataclass(frozen=True)
class NetworkSpec:
    """What the registry knows about one network name."""

    name: str
    builder: Callable[..., nn.Module]
    spatial_dims: tuple[int, ...] = (2, 3)
    description: str = ""
    #: options used by ``medunet networks`` and the tests to build a small instance quickly
    tiny_options: dict = field(default_factory=dict)


_REGISTRY: dict[str, NetworkSpec] = {}


def register(
    name: str,
    *,
    spatial_dims: tuple[int, ...] = (2, 3),
    description: str = "",
    tiny_options: dict | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``builder(spatial_dims, in_channels, out_channels, **options)`` under ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name.lower()
        if key in _REGISTRY:
            raise KeyError(f"network name {name!r} is already registered")
        _REGISTRY[key] = NetworkSpec(key, builder, tuple(spatial_dims), description, dict(tiny_options or {}))
        return builder

    return decorator


def get_spec(name: str) -> NetworkSpec:
    """The :class:`NetworkSpec` of a registered name (case-insensitive)."""
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def available() -> dict[str, NetworkSpec]:
    """All registered networks, by name."""
    return dict(sorted(_REGISTRY.items()))


def create(name: str, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **options) -> nn.Module:
    """Build a registered network.

    Args:
        name: a name from :func:`available`, e.g. ``"unet2015"``, ``"dynunet"``.
        spatial_dims: 2 or 3.
        in_channels: input channels (modalities).
        out_channels: output channels (classes, background included).
        options: family-specific options (see each builder's docstring).

    Returns:
        an ``nn.Module`` mapping ``(B, in_channels, *spatial)`` to ``(B, out_channels, *output_spatial)``
        that also offers ``output_shape``, ``valid_input_shape`` and ``check_input_shape``
        (:class:`medunet.networks.shapes.ShapeRuleMixin`).

    Example:
        >>> net = create("unet2015", spatial_dims=2, in_channels=1, out_channels=2)
        >>> net.output_shape((572, 572))
        (388, 388)
    """
    spec = get_spec(name)
    if spatial_dims not in spec.spatial_dims:
        raise ValueError(
            f"network {spec.name!r} supports spatial_dims {spec.spatial_dims}, got {spatial_dims}"
        )
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
    return spec.builder(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **options)
