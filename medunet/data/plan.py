"""The experiment plan: what dataset fingerprinting decides and everything downstream consumes.

A :class:`Plan` is written by ``medunet plan DIR -o plan.json`` (see :mod:`medunet.data.planning`)
and read by the transform pipelines, the bundles, the trainer and the predictor, so that training
and inference preprocess identically (orientation, spacing, intensity normalisation).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from medunet.io.atomic import atomic_write_text

__all__ = ["Plan", "normalize_intensity", "NORMALIZATION_SCHEMES"]

NORMALIZATION_SCHEMES = ("ct", "zscore", "none")


@dataclass
class Plan:
    """Configuration derived from a dataset fingerprint (nnU-Net style).

    Attributes:
        spatial_dims: 2 or 3 (the network's dimensionality).
        modality: ``"CT"``, ``"MRI"`` or another free-text modality name.
        labels: class name → integer value; ``background`` is 0.
        in_channels: number of image channels (modalities).
        orientation: axcodes images are reoriented to before resampling (``"RAS"``).
        target_spacing: voxel spacing (mm) in the reoriented frame, or ``None`` to keep native spacing.
        normalization: ``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}`` (clip to the
            dataset's foreground 0.5/99.5 percentiles, then standardise with the foreground mean/std),
            ``{"scheme": "zscore", "nonzero": bool}`` (per image, over the foreground mask if
            ``nonzero``) or ``{"scheme": "none"}``.
        patch_size: training patch (voxels, in the reoriented/resampled frame).
        batch_size: training batch size.
        network: ``{"name": <registry name>, **options}`` for :func:`medunet.networks.create`.
        median_shape: median image shape after resampling.
        fingerprint: raw statistics the plan was derived from (spacings, shapes, intensities…).
        mirror_axes: spatial axes the training augmentation mirrored, and so the axes test-time
            augmentation may mirror (as nnU-Net's ``inference_allowed_mirroring_axes``); ``None``: all.
        largest_component: class values whose prediction keeps only its largest connected component
            (the planner lists the classes that are one object in every training label, as nnU-Net's
            postprocessing removes all but the largest component where that does not hurt); ``None``
            or ``[]``: none.
    """

    labels: dict[str, int] = field(default_factory=lambda: {"background": 0, "foreground": 1})
    spatial_dims: int = 3
    modality: str = "CT"
    in_channels: int = 1
    orientation: str = "RAS"
    target_spacing: list[float] | None = None
    normalization: dict = field(default_factory=lambda: {"scheme": "zscore", "nonzero": False})
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    batch_size: int = 2
    network: dict = field(default_factory=lambda: {"name": "dynunet"})
    median_shape: list[int] | None = None
    fingerprint: dict = field(default_factory=dict)
    version: int = 1
    mirror_axes: list[int] | None = None
    largest_component: list[int] | None = None

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"plan: spatial_dims must be 2 or 3, got {self.spatial_dims}")
        scheme = self.normalization.get("scheme")
        if scheme not in NORMALIZATION_SCHEMES:
            raise ValueError(f"plan: normalization scheme must be one of {NORMALIZATION_SCHEMES}, got {scheme!r}")
        if scheme == "ct" and not {"clip", "mean", "std"} <= set(self.normalization):
            raise ValueError("plan: CT normalization needs 'clip', 'mean' and 'std'")
        values = sorted(int(v) for v in self.labels.values())
        if 0 not in values or len(set(values)) != len(values):
            raise ValueError(f"plan: labels need a background 0 and distinct values, got {self.labels}")
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"plan: patch_size {self.patch_size} does not have {self.spatial_dims} axes")
        if self.mirror_axes is not None and any(int(a) not in range(self.spatial_dims) for a in self.mirror_axes):
            raise ValueError(f"plan: mirror_axes {self.mirror_axes} must be spatial axes 0…{self.spatial_dims - 1}")
        if self.largest_component and any(int(c) not in values or int(c) == 0 for c in self.largest_component):
            raise ValueError(f"plan: largest_component {self.largest_component} must be foreground label values "
                             f"{[v for v in values if v]}")

    # -- derived ----------------------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        """Network output channels: one per class value 0…max (background included)."""
        return max(int(v) for v in self.labels.values()) + 1

    @property
    def label_names(self) -> dict[int, str]:
        return {int(v): k for k, v in self.labels.items()}

    def build_network(self, **overrides) -> torch.nn.Module:
        """``medunet.networks.create`` with the plan's network options (``overrides`` win)."""
        from medunet import networks

        options = {k: v for k, v in self.network.items() if k != "name"}
        options.update(overrides)
        return networks.create(self.network["name"], spatial_dims=self.spatial_dims,
                               in_channels=self.in_channels, out_channels=self.out_channels, **options)

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=_jsonable))

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"plan: unknown keys {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: plan file not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def normalize_intensity(image, normalization: dict):
    """Apply a plan's intensity normalisation to an image array or tensor of any shape.

    Args:
        image: ``np.ndarray`` or ``torch.Tensor``, channel-first ``(C, *S)`` or plain spatial.
        normalization: :attr:`Plan.normalization`.

    Returns:
        float32 array/tensor of the same shape and type. ``zscore`` is computed per channel when the
        input has a leading channel axis of size ≤ 4, otherwise over the whole array.
    """
    is_tensor = isinstance(image, torch.Tensor)
    x = image.float() if is_tensor else torch.as_tensor(np.asarray(image, dtype=np.float32))
    scheme = normalization.get("scheme", "none")
    if scheme == "ct":
        lo, hi = (float(v) for v in normalization["clip"])
        std = max(float(normalization["std"]), 1e-8)
        out = (x.clamp(lo, hi) - float(normalization["mean"])) / std
    elif scheme == "zscore":
        nonzero = bool(normalization.get("nonzero", False))
        channels = x if (x.dim() >= 3 and x.shape[0] <= 4) else x.unsqueeze(0)
        outs = []
        for c in channels:
            mask = c != 0 if nonzero else torch.ones_like(c, dtype=torch.bool)
            vals = c[mask] if bool(mask.any()) else c.reshape(-1)
            mean, std = vals.mean(), vals.std(unbiased=False).clamp_min(1e-8)
            z = (c - mean) / std
            outs.append(torch.where(mask, z, torch.zeros_like(z)) if nonzero else z)
        out = torch.stack(outs) if channels is x else outs[0]
    elif scheme == "none":
        out = x
    else:
        raise ValueError(f"unknown normalization scheme {scheme!r}")
    if is_tensor:
        return out
    return out.numpy()
