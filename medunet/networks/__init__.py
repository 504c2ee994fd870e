"""Networks: one factory (:func:`create`) and a registry (:func:`register`, :func:`available`).

Registered names: ``unet2015`` (the seed), ``unet3d`` (Çiçek), and MONAI's ``unet``, ``basicunet``,
``dynunet``, ``attentionunet``, ``segresnet``, ``unetr``, ``swinunetr``.
"""

from medunet.networks import monai_nets, unet2015  # noqa: F401  (registers the families)
from medunet.networks.monai_nets import dynunet_layout
from medunet.networks.registry import NetworkSpec, available, create, get_spec, register
from medunet.networks.shapes import ShapeRuleMixin
from medunet.networks.unet2015 import ClassicUNet

__all__ = [
    "create", "available", "register", "get_spec", "NetworkSpec", "ShapeRuleMixin", "ClassicUNet",
    "dynunet_layout", "count_parameters",
]


def count_parameters(net) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
