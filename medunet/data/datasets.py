"""Datasets and loaders as MONAI users know them, with the cache chosen by the data's size.

``make_dataset(items, transform, cache="auto")`` picks ``CacheDataset`` (everything preprocessed once and
kept in RAM) when the preprocessed data fits the memory budget, ``PersistentDataset`` (preprocessed once
to ``cache_dir`` on disk) when it does not and a cache folder is given, otherwise a partial
``CacheDataset``. Only the deterministic prefix of the pipeline is cached (MONAI stops at the first
random transform), so augmentation stays random per epoch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, ThreadDataLoader
from monai.transforms import Compose

from medunet.data.plan import Plan
from medunet.io import InputError, is_2d_image, is_nifti, read_nifti_header

__all__ = ["make_dataset", "make_loader", "estimate_cache_bytes", "find_input_error", "CACHE_MODES"]

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "memory", "persistent", "none")
_FLOAT_BYTES = 4


def find_input_error(exc: BaseException) -> InputError | None:
    """The :class:`~medunet.io.InputError` behind an exception (MONAI wraps transform errors in
    ``RuntimeError("applying transform …")``); ``None`` when there is none."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _voxels_and_spacing(path: str | os.PathLike) -> tuple[int, list[float] | None]:
    """Voxel count (all channels) and spacing of an image file from its header alone."""
    p = Path(path)
    if is_nifti(p):
        hdr = read_nifti_header(p).header  # the io layer's checks and one-line errors
        shape = hdr.get_data_shape()
        return int(np.prod(shape)), [float(z) for z in hdr.get_zooms()[:3]]
    if is_2d_image(p):
        from PIL import Image

        with Image.open(p) as im:
            return int(im.size[0] * im.size[1]), [1.0, 1.0]
    if p.is_dir():  # DICOM series: ~2 bytes per voxel on disk
        return sum(f.stat().st_size for f in p.iterdir() if f.is_file()) // 2, None
    return p.stat().st_size // _FLOAT_BYTES, None


def estimate_cache_bytes(items: Sequence[dict], keys: Sequence[str] = ("image", "label"),
                         plan: Plan | None = None) -> int:
    """Bytes the deterministic preprocessing of ``items`` occupies in memory (float32), from headers.

    With a ``plan`` the resampling to ``plan.target_spacing`` is accounted for. Files that cannot be
    read count as 0 (the pipeline reports them when it reaches them).
    """
    total = 0
    target = None
    if plan is not None and plan.target_spacing:
        target = [float(s) for s in plan.target_spacing]
    for item in items:
        for key in keys:
            if key not in item:
                continue
            for path in (item[key] if isinstance(item[key], (list, tuple)) else [item[key]]):
                try:
                    voxels, spacing = _voxels_and_spacing(path)
                except (InputError, OSError):
                    continue
                if target and spacing:
                    n = min(len(target), len(spacing))
                    voxels = int(voxels * math.prod(max(spacing[i], 1e-6) / target[i] for i in range(n)))
                total += voxels * _FLOAT_BYTES
    return total


def make_dataset(
    items: Sequence[dict],
    transform: Compose,
    cache: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    memory_budget_gb: float = 4.0,
    plan: Plan | None = None,
    keys: Sequence[str] = ("image", "label"),
    num_workers: int = 0,
    progress: bool = False,
) -> Dataset:
    """A MONAI dataset over ``items`` (``[{"image": path, "label": path}, …]``).

    Args:
        items: the datalist.
        transform: e.g. :func:`medunet.data.transforms.train_transforms`.
        cache: ``"memory"`` → ``CacheDataset`` (all cached); ``"persistent"`` → ``PersistentDataset`` in
            ``cache_dir`` (required); ``"none"`` → plain ``Dataset``; ``"auto"`` → memory when the
            estimate (:func:`estimate_cache_bytes`) fits ``memory_budget_gb``, else persistent when
            ``cache_dir`` is given, else a ``CacheDataset`` caching the fraction that fits.
        cache_dir: folder for ``PersistentDataset`` (created; files are keyed by a hash of each item,
            so a changed datalist never reuses stale entries — delete the folder after changing the plan).
        memory_budget_gb: RAM the cache may use.
        plan: lets the size estimate account for resampling.
        keys: item keys holding file paths.
        num_workers: threads that fill a ``CacheDataset``.
        progress: show MONAI's cache progress bar.

    Returns:
        the dataset; ``dataset.medunet_cache`` says which cache was chosen.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    items = list(items)
    mode, rate = cache, 1.0
    if cache == "auto":
        need = estimate_cache_bytes(items, keys, plan)
        budget = float(memory_budget_gb) * 1024**3
        if need <= budget:
            mode = "memory"
        elif cache_dir is not None:
            mode = "persistent"
        else:
            mode, rate = "memory", max(0.0, min(1.0, budget / max(need, 1)))
        log.info("cache=auto: estimated %.2f GB for %d cases, budget %.2f GB -> %s%s", need / 1024**3,
                 len(items), memory_budget_gb, mode, f" (cache_rate {rate:.2f})" if rate < 1 else "")
    if mode == "memory":
        ds: Dataset = CacheDataset(items, transform, cache_rate=rate, num_workers=num_workers or None,
                                   progress=progress)
    elif mode == "persistent":
        if cache_dir is None:
            raise ValueError("cache='persistent' needs cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        ds = PersistentDataset(items, transform, cache_dir=cache_dir)
    else:
        ds = Dataset(items, transform)
    ds.medunet_cache = mode if rate >= 1 else f"memory({rate:.2f})"
    return ds


def make_loader(dataset: Dataset, batch_size: int = 2, shuffle: bool = True, num_workers: int = 0,
                thread: bool = True, **kwargs) -> DataLoader:
    """A MONAI loader (``list_data_collate``: multi-patch samples are flattened into the batch).

    ``thread=True`` gives ``ThreadDataLoader`` (a background thread overlaps loading with compute; the
    best choice with an in-memory cache), ``False`` a process-based ``DataLoader``.
    """
    if thread:
        return ThreadDataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, **kwargs)
