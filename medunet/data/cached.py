"""Whole small-crop datasets held in memory as tensors, and a fast augmenting patch sampler.

For datasets whose cases are small crops (MSD Task04 Hippocampus: ~35×50×36 voxels), reading and
augmenting through a per-sample MONAI pipeline costs more CPU per iteration than the network itself.
Here every case is preprocessed ONCE with :func:`medunet.data.transforms.val_transforms` (the exact
deterministic preprocessing inference uses: read → channel-first → crop nonzero → RAS → spacing →
plan normalisation) and kept as tensors; :class:`PatchDataset` then draws augmented patches with a
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
    "CachedCase", "cache_cases", "PatchDataset", "SampleStream", "AugmentConfig",
    "patch_dataset",
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
    """Probabilities and ranges of :class:`PatchDataset`'s augmentations (nnU-Net-like defaults).

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


class PatchDataset(torch.utils.data.Dataset):
    """Augmented training patches drawn from :class:`CachedCase` s held in memory (a map-style dataset).

    Sample ``k`` is a pure function of ``(seed, k)``: its case, placement, augmentation and noise come
    from a generator seeded with both, so the same ``k`` gives the same patch in any process, in any
    DataLoader worker and after a resume. :class:`SampleStream` hands out consecutive ``k`` per training
    step (and per rank under ``torch.distributed``).

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
        augment: :class:`AugmentConfig` (``AugmentConfig.none()`` for plain crops).
        seed: mixed into every sample's generator.
        foreground_fraction: probability that a sample is centred on foreground (0 disables).
        length: what ``len()`` reports (any ``k >= 0`` is valid; a :class:`SampleStream` never stops).

    ``dataset[k]`` → ``{"image": (C, *P) float32, "label": (1, *P) int64}``.
    """

    def __init__(self, cases: Sequence[CachedCase], patch_size: Sequence[int], augment: AugmentConfig | None = None,
                 seed: int = 0, foreground_fraction: float = 0.33, length: int = 2**31 - 1) -> None:
        if not cases:
            raise ValueError("PatchDataset needs at least one case")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        self.foreground_fraction = float(foreground_fraction)
        self._foreground: dict[int, list[torch.Tensor]] = {}
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch_size)
        self.dims = len(self.patch)
        if any(c.image.dim() - 1 != self.dims for c in self.cases):
            raise ValueError(f"patch_size {self.patch} does not match the cases' spatial dimensions")
        self.augment = augment or AugmentConfig()
        self.seed = int(seed)
        self.length = int(length)
        axes = [torch.arange(p, dtype=torch.float64) - (p - 1) / 2 for p in self.patch]
        self._offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*P, dims) from the centre

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if k < 0:
            raise IndexError(f"sample index {k} < 0")
        rng = np.random.default_rng([self.seed, int(k)])
        image, label = self._sample(int(rng.integers(len(self.cases))), rng)
        return {"image": image.contiguous(), "label": label.round().long()}

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image (B, C, *P), label (B, 1, *P))`` of the samples ``indices`` (tests, notebooks)."""
        items = [self[int(k)] for k in indices]
        return torch.stack([i["image"] for i in items]), torch.stack([i["label"] for i in items])

    def _matrix(self, rng: np.random.Generator) -> torch.Tensor:
        aug = self.augment
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

    def _sample(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[index]
        shape = case.spatial_shape
        lo = [min(0, s - p) for s, p in zip(shape, self.patch)]
        hi = [max(0, s - p) for s, p in zip(shape, self.patch)]
        classes = (self._foreground_voxels(index)
                   if self.foreground_fraction > 0 and rng.random() < self.foreground_fraction else [])
        if classes:
            voxels = classes[int(rng.integers(len(classes)))]
            centre = voxels[int(rng.integers(len(voxels)))].tolist()
            start = [float(min(max(c - p // 2, a), b)) for c, p, a, b in zip(centre, self.patch, lo, hi)]
        else:
            start = [float(rng.integers(a, b + 1)) for a, b in zip(lo, hi)]
        matrix = self._matrix(rng)
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
        flips = [a + 1 for a in self.augment.mirror_axes if a < self.dims and rng.random() < 0.5]
        if flips:
            image, label = image.flip(flips), label.flip(flips)
        return self._intensity(image, rng), label.float()

    def _intensity(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        aug = self.augment
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


class SampleStream(torch.utils.data.Sampler):
    """Endless sample indices for a :class:`PatchDataset`, ``batch_size`` per training step.

    Step ``i`` of rank ``r`` (of ``W``) gets the samples ``(i·W + r)·B … (i·W + r)·B + B − 1``, so every
    rank draws different patches and the patches of a step do not depend on how the run got there. Set
    :attr:`start_step` (the trainer's iteration count, e.g. after a resume) before iterating; a
    :class:`~medunet.engines.training.TrainingBudget` does that at every epoch start.

    Args:
        batch_size: samples per step on this rank (the DataLoader's ``batch_size``).
        rank, world_size: ``None``: from ``torch.distributed`` when a process group is up, else 0 and 1.
    """

    def __init__(self, batch_size: int, rank: int | None = None, world_size: int | None = None) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.rank, self.world_size = rank, world_size
        self.start_step = 0

    def __len__(self) -> int:
        return 2**31 - 1

    def _world(self) -> tuple[int, int]:
        dist = torch.distributed
        up = dist.is_available() and dist.is_initialized()
        rank = self.rank if self.rank is not None else (dist.get_rank() if up else 0)
        size = self.world_size if self.world_size is not None else (dist.get_world_size() if up else 1)
        return int(rank), int(size)

    def __iter__(self):
        step = int(self.start_step)
        rank, size = self._world()  # read when iterating: the process group is up by then
        while True:
            first = (step * size + rank) * self.batch_size
            yield from range(first, first + self.batch_size)
            step += 1


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


def patch_dataset(data: Sequence[dict], plan: Plan, seed: int = 0, augment: str | AugmentConfig = "full",
                  foreground_fraction: float = 0.33) -> PatchDataset:
    """What a bundle trains on: the cases ``data`` (``{"image", "label"}`` dicts; the name MONAI Label
    sets as ``train#dataset#data``) preprocessed once (:func:`cache_cases`), then augmented patches of
    ``plan.patch_size``.

    ``augment``: ``"full"`` (nnU-Net-like spatial + intensity augmentation), ``"none"`` (plain crops) or an
    :class:`AugmentConfig`. Mirroring uses ``plan.mirror_axes`` (all axes when ``None``), the axes
    test-time augmentation mirrors. A case that cannot be preprocessed is skipped with one warning line
    naming the file; ``ValueError`` when none is left.
    """
    import logging
    from dataclasses import replace

    if isinstance(augment, str):
        if augment not in ("full", "none"):
            raise ValueError(f"augment must be 'full', 'none' or an AugmentConfig, got {augment!r}")
        augment = AugmentConfig() if augment == "full" else AugmentConfig.none()
    if augment.mirror_axes:
        axes = plan.mirror_axes if plan.mirror_axes is not None else range(plan.spatial_dims)
        augment = replace(augment, mirror_axes=tuple(int(a) for a in axes))
    log = logging.getLogger("medunet.data")
    cases = cache_cases(data, plan, on_error=lambda e: log.warning("skipping training case: %s", e))
    if not cases:
        raise ValueError(f"none of the {len(data)} training case(s) could be preprocessed (see the lines above)")
    patch = [int(p) for p in plan.patch_size]
    return PatchDataset(cases, patch, augment=augment, seed=seed, foreground_fraction=foreground_fraction)

