"""Whole small-crop datasets held in memory as tensors, and a fast augmenting patch sampler.

For datasets whose cases are small crops (MSD Task04 Hippocampus: ~35×50×36 voxels), reading and
augmenting through a per-sample MONAI pipeline costs more CPU per iteration than the network itself.
Here every case is preprocessed ONCE with :func:`medunet.data.transforms.val_transforms` (the exact
deterministic preprocessing inference uses: read → channel-first → crop nonzero → RAS → spacing →
plan normalisation) and kept as tensors; :class:`PatchSampler` then draws augmented patches with a
single ``grid_sample`` per sample (crop/pad, rotation, scaling and mirroring in one resampling) plus
cheap intensity changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medunet.data.plan import Plan
from medunet.io import InputError, image_id

__all__ = [
    "CachedCase", "every_nth_split", "cache_cases", "PatchSampler", "AugmentConfig",
]


@dataclass
class CachedCase:
    """One preprocessed case.

    Attributes:
        case_id: file name without extension (``hippocampus_001``).
        image: float32 ``(C, *S)``, normalised as the plan says, in the plan's orientation/spacing.
        label: uint8 ``(1, *S)`` class values.
        image_path, label_path: where it was read from.
        spacing: voxel size (mm) of ``image`` per spatial axis.
    """

    case_id: str
    image: torch.Tensor
    label: torch.Tensor
    image_path: str
    label_path: str
    spacing: tuple[float, ...] | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.image.shape[1:])


def every_nth_split(items: Sequence[dict], n: int = 5) -> tuple[list[dict], list[dict]]:
    """Deterministic hold-out: every ``n``-th item (indices n-1, 2n-1, …) is validation, the rest training."""
    if n < 2:
        raise ValueError(f"every_nth_split needs n >= 2, got {n}")
    val = [it for i, it in enumerate(items) if i % n == n - 1]
    train = [it for i, it in enumerate(items) if i % n != n - 1]
    return train, val


def cache_cases(
    items: Sequence[dict],
    plan: Plan,
    on_error: Callable[[InputError], None] | None = None,
) -> list[CachedCase]:
    """Preprocess cases once with :func:`medunet.data.transforms.val_transforms` and keep them in memory.

    Args:
        items: ``{"image": path, "label": path}`` dicts.
        plan: decides orientation, spacing and normalisation (exactly as at inference).
        on_error: called with the :class:`InputError` of a bad case, which is then skipped; ``None``
            raises it (a one-line ``path: reason``).

    Returns:
        the readable cases, in input order.
    """
    from medunet.data.datasets import find_input_error
    from medunet.data.transforms import val_transforms

    pipeline = val_transforms(plan)
    cases = []
    for item in items:
        try:
            out = pipeline(dict(item))
            image = torch.as_tensor(out["image"]).float().contiguous()
            label = torch.as_tensor(out["label"])
            if image.shape[1:] != label.shape[1:]:
                raise InputError(item["label"], f"label shape {tuple(label.shape[1:])} differs from the "
                                                f"image's {tuple(image.shape[1:])}")
            values = torch.unique(label)
            if bool((values < 0).any()) or bool((values != values.round()).any()) or int(values.max()) >= plan.out_channels:
                raise InputError(item["label"], f"label values {values.tolist()[:8]} are not classes 0…{plan.out_channels - 1}")
            pixdim = getattr(out["image"], "pixdim", None)
            spacing = tuple(float(v) for v in pixdim) if pixdim is not None else None
            cases.append(CachedCase(image_id(item["image"]), image, label.to(torch.uint8).contiguous(),
                                    item["image"], item["label"], spacing))
        except Exception as e:  # MONAI wraps reader errors in RuntimeError
            err = _input_error(e, item, find_input_error)
            if on_error is None:
                raise err from None
            on_error(err)
    return cases


def _input_error(exc: BaseException, item: dict, find_input_error) -> InputError:
    """A one-line :class:`InputError` for a case that failed to preprocess.

    The reader's own ``InputError`` when it is in the exception chain; else the line of MONAI's
    "cannot find a suitable reader" message that names one of the case's files; else the innermost error.
    """
    found = exc if isinstance(exc, InputError) else find_input_error(exc)
    if found is not None:
        return found
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        for line in str(e).splitlines():
            for key in ("image", "label"):
                prefix = f"{item.get(key)}: "
                if prefix in line:
                    return InputError(item[key], line.split(prefix, 1)[1].strip())
    inner = chain[-1]
    reason = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    return InputError(item.get("image", "?"), f"cannot be preprocessed ({type(inner).__name__}: {reason})")


@dataclass
class AugmentConfig:
    """Probabilities and ranges of :class:`PatchSampler`'s augmentations (nnU-Net-like defaults).

    ``mirror_axes``: axes flipped with probability 0.5 each. ``rotation``: max angle (radians) about each
    axis, applied with ``p_rotation``. ``scale``: isotropic zoom range, applied with ``p_scale``.
    Intensity changes act on the normalised image: multiplicative brightness, contrast around the mean,
    gamma on the min-max-rescaled patch, Gaussian noise.
    """

    mirror_axes: tuple[int, ...] = (0, 1, 2)
    p_rotation: float = 0.2
    rotation: float = math.pi / 6
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.1
    noise_std: float = 0.1

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all (plain random crops)."""
        return cls(mirror_axes=(), p_rotation=0.0, p_scale=0.0, p_brightness=0.0, p_contrast=0.0, p_gamma=0.0,
                   p_noise=0.0)


def _rotation_matrix(angles: Sequence[float]) -> torch.Tensor:
    """3×3 rotation about axes 0, 1, 2 by ``angles`` (or 2×2 for a single angle)."""
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    m = torch.eye(3, dtype=torch.float64)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        m = r @ m
    return m


class PatchSampler:
    """Draw augmented training batches from :class:`CachedCase` s held in memory.

    Each sample: a uniformly chosen case; a patch of ``patch_size`` placed uniformly so that it stays
    inside the case when the case is larger and the case stays inside it when smaller (the rest is zero
    padding, i.e. the normalised mean); optional rotation/scaling about the patch centre — all done by one
    ``grid_sample`` (bilinear image, nearest label); then mirroring and intensity augmentation.

    Foreground oversampling (as nnU-Net does): with probability ``foreground_fraction`` a sample is
    instead centred on a random voxel of a random foreground class present in the case (then clamped to
    the same allowed range), so small structures in large volumes are seen often enough. Cases without
    foreground fall back to uniform placement.

    Args:
        cases: the training cases.
        patch_size: ``(P0, P1[, P2])``, should be valid for the network.
        batch_size: samples per batch.
        augment: :class:`AugmentConfig` (``AugmentConfig.none()`` for plain crops).
        seed: seeds the sampler's own generator (reproducible batches).
        foreground_fraction: probability that a sample is centred on foreground (0 disables).

    Call it to get ``(image (B, C, *P) float32, label (B, 1, *P) int64)``.
    """

    def __init__(self, cases: Sequence[CachedCase], patch_size: Sequence[int], batch_size: int,
                 augment: AugmentConfig | None = None, seed: int = 0, foreground_fraction: float = 0.33) -> None:
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        self.foreground_fraction = float(foreground_fraction)
        self._foreground: dict[int, list[torch.Tensor]] = {}
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch_size)
        self.dims = len(self.patch)
        if any(c.image.dim() - 1 != self.dims for c in self.cases):
            raise ValueError(f"patch_size {self.patch} does not match the cases' spatial dimensions")
        self.batch_size = int(batch_size)
        self.augment = augment or AugmentConfig()
        self.rng = np.random.default_rng(seed)
        axes = [torch.arange(p, dtype=torch.float64) - (p - 1) / 2 for p in self.patch]
        self._offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*P, dims) from the centre

    def _matrix(self) -> torch.Tensor:
        aug, rng = self.augment, self.rng
        m = torch.eye(self.dims, dtype=torch.float64)
        if rng.random() < aug.p_rotation:
            n_angles = 1 if self.dims == 2 else 3
            m = _rotation_matrix(rng.uniform(-aug.rotation, aug.rotation, n_angles).tolist()) @ m
        if rng.random() < aug.p_scale:
            m = m * float(rng.uniform(*aug.scale))
        return m

    def _foreground_voxels(self, index: int) -> list[torch.Tensor]:
        """Per foreground class present in case ``index``: voxel coordinates ``(N, dims)`` (≤ 10,000 kept)."""
        if index not in self._foreground:
            label = self.cases[index].label[0]
            pick = np.random.default_rng(index)
            found = []
            for c in torch.unique(label).tolist():
                if c == 0:
                    continue
                where = torch.nonzero(label == c)
                if len(where) > 10_000:
                    where = where[torch.from_numpy(np.sort(pick.choice(len(where), 10_000, replace=False)))]
                found.append(where)
            self._foreground[index] = found
        return self._foreground[index]

    def _sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[index]
        shape = case.spatial_shape
        lo = [min(0, s - p) for s, p in zip(shape, self.patch)]
        hi = [max(0, s - p) for s, p in zip(shape, self.patch)]
        classes = (self._foreground_voxels(index)
                   if self.foreground_fraction > 0 and self.rng.random() < self.foreground_fraction else [])
        if classes:
            voxels = classes[int(self.rng.integers(len(classes)))]
            centre = voxels[int(self.rng.integers(len(voxels)))].tolist()
            start = [float(min(max(c - p // 2, a), b)) for c, p, a, b in zip(centre, self.patch, lo, hi)]
        else:
            start = [float(self.rng.integers(a, b + 1)) for a, b in zip(lo, hi)]
        matrix = self._matrix()
        if torch.equal(matrix, torch.eye(self.dims, dtype=torch.float64)):
            image, label = _integer_crop(case.image, start, self.patch), _integer_crop(case.label, start, self.patch)
        else:
            centre = torch.tensor(start, dtype=torch.float64) + (torch.tensor(self.patch, dtype=torch.float64) - 1) / 2
            coords = centre + self._offsets @ matrix.T  # voxel coordinates in the case, (*P, dims)
            size = torch.tensor(shape, dtype=torch.float64)
            grid = (2 * coords / (size - 1).clamp_min(1) - 1).flip(-1).float().unsqueeze(0)  # grid_sample wants (x=last axis, …)
            image = F.grid_sample(case.image.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=True)[0]
            label = F.grid_sample(case.label.unsqueeze(0).float(), grid, mode="nearest", padding_mode="zeros",
                                  align_corners=True)[0]
        flips = [a + 1 for a in self.augment.mirror_axes if a < self.dims and self.rng.random() < 0.5]
        if flips:
            image, label = image.flip(flips), label.flip(flips)
        return self._intensity(image), label

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        aug, rng = self.augment, self.rng
        if rng.random() < aug.p_noise:
            x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31)))) * \
                float(rng.uniform(0, aug.noise_std))
        if rng.random() < aug.p_brightness:
            x = x * float(rng.uniform(*aug.brightness))
        if rng.random() < aug.p_contrast:
            mean = x.mean()
            lo, hi = x.min(), x.max()
            x = ((x - mean) * float(rng.uniform(*aug.contrast)) + mean).clamp(lo, hi)
        if rng.random() < aug.p_gamma:
            lo, hi = x.min(), x.max()
            span = (hi - lo).clamp_min(1e-7)
            mean, std = x.mean(), x.std()
            x = ((x - lo) / span) ** float(rng.uniform(*aug.gamma)) * span + lo
            x = (x - x.mean()) / x.std().clamp_min(1e-7) * std + mean  # keep the patch's statistics
        return x

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = self.rng.integers(0, len(self.cases), self.batch_size)
        images, labels = zip(*(self._sample(int(i)) for i in picks))
        return torch.stack(images).contiguous(), torch.stack(labels).round().long()


def _integer_crop(x: torch.Tensor, start: Sequence[float], patch: Sequence[int]) -> torch.Tensor:
    """``x`` ``(C, *S)`` cropped/zero-padded to ``(C, *patch)`` beginning at integer ``start`` (may be < 0)."""
    out = x.new_zeros((x.shape[0], *patch))
    src, dst = [slice(None)], [slice(None)]
    for s, p, size in zip(start, patch, x.shape[1:]):
        s = int(s)
        a, b = max(s, 0), min(s + p, size)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = x[tuple(src)]
    return out
