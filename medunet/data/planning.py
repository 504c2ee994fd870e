"""Dataset fingerprint and nnU-Net-style experiment planning.

:func:`fingerprint_dataset` collects per-case spacing and shape (in the RAS-reoriented frame, from the
image headers) and foreground intensity statistics (voxels sampled inside the labels).
:func:`plan_dataset` turns a fingerprint into a :class:`~medunet.data.plan.Plan`: target spacing, median
resampled shape, normalisation scheme, network topology (kernels/strides per axis via
:func:`medunet.networks.dynunet_layout`), patch size and batch size fitted to a memory budget — and, on
CPU, to a compute budget so that a training step stays feasible without a GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from medunet.data.check import check_case_data
from medunet.data.datalist import dataset_labels, dataset_modalities, find_dataset_items, read_dataset_json
from medunet.data.plan import Plan
from medunet.io import InputError, is_nifti, read_image, read_nifti_header, validate_affine

__all__ = [
    "fingerprint_dataset", "plan_dataset", "estimate_memory_mb", "estimate_gflops",
    "target_spacing", "BUDGETS", "format_plan", "NoUsableCases", "receptive_field", "single_object_classes",
]

log = logging.getLogger(__name__)

#: default budgets: GPU like nnU-Net's ~8 GB reference; CPU small enough that one training step of a
#: 3D network takes seconds, not minutes, on a few cores
BUDGETS = {
    "gpu": {"memory_mb": 8000.0, "gflops": None, "base_filters": 32, "max_filters_3d": 320, "max_filters_2d": 512},
    "cpu": {"memory_mb": 2000.0, "gflops": 40.0, "base_filters": 16, "max_filters_3d": 256, "max_filters_2d": 256},
}
_SAMPLES_PER_CASE = 10_000
_ANISOTROPY = 3.0
_MAX_BATCH_FRACTION = 0.05  # a batch never covers more than 5 % of the dataset's voxels (nnU-Net)
_MIN_COVERAGE = 0.25  # nnU-Net plans 3d_lowres when the full-resolution patch covers less of the median image
_MAX_COARSENING = 4.0
_SINGLE_OBJECT = 0.95  # a class is "one object" when its largest component holds this much of it in every case


class NoUsableCases(ValueError):
    """Every case of a dataset was refused; ``failed`` holds one ``"path: reason"`` line per problem."""

    def __init__(self, message: str, failed: Sequence[str]) -> None:
        super().__init__(message)
        self.failed = list(failed)


# --------------------------------------------------------------------------------------------------
# the dataset
def _dataset(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """Training items (any layout :func:`medunet.data.datalist.find_dataset_items` reads) and what
    ``dataset.json`` declares when present: ``{"modality": {"0": name}, "labels": {name: value} | None,
    "channels": int | None, "spatial_dims": 2 | 3 | None}``."""
    path = Path(path)
    items = find_dataset_items(path, "training")
    meta = _no_declarations()
    json_path = path if path.is_file() else path / "dataset.json"
    if json_path.is_file():
        raw = read_dataset_json(json_path)
        modalities = dataset_modalities(raw)
        if modalities:
            meta["modality"] = {str(k): v for k, v in sorted(modalities.items())}
            meta["channels"] = len(modalities)
        if "labels" in raw:
            meta["labels"] = dataset_labels(raw, json_path)
        size = str(raw.get("tensorImageSize", "")).upper()
        if size in ("2D", "3D", "4D"):  # MSD "4D": 3D volumes with a channel axis
            meta["spatial_dims"] = 2 if size == "2D" else 3
    return items, meta


def _no_declarations() -> dict:
    return {"modality": {"0": "unknown"}, "labels": None, "channels": None, "spatial_dims": None}


# --------------------------------------------------------------------------------------------------
# fingerprint
def _ras_geometry(shape: Sequence[int], affine: np.ndarray, spatial_dims: int) -> tuple[list[int], list[float]]:
    """Shape and spacing permuted to the RAS-reoriented axis order (what ``Orientationd("RAS")`` gives)."""
    shape = [int(s) for s in shape[:spatial_dims]]
    spacing = [float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :spatial_dims], axis=0)]
    if spatial_dims == 2:
        return shape, spacing
    ornt = nib.orientations.io_orientation(np.asarray(affine))
    out_shape, out_spacing = [0] * 3, [0.0] * 3
    for vox_axis, (world_axis, _) in enumerate(ornt[:3]):
        out_shape[int(world_axis)] = shape[vox_axis]
        out_spacing[int(world_axis)] = spacing[vox_axis]
    return out_shape, out_spacing


def _header_geometry(path: str) -> tuple[list[int], np.ndarray, int]:
    """Shape, affine, spatial dims from a NIfTI header (no voxel data), checked as the reader checks it."""
    img = read_nifti_header(path)
    shape = [int(s) for s in img.shape]
    while len(shape) > 3 and shape[-1] == 1:  # X×Y×Z×1 is 3D, as the reader sees it
        shape.pop()
    dims = 2 if len(shape) == 2 else 3  # as medunet.io.ImageData.spatial_dims
    return shape, validate_affine(img.affine, path, spatial_dims=dims), dims


def _channel_count(path: str, shape: Sequence[int], dims: int) -> int:
    """Channels one image file holds: 1 for a 2D/3D array, ``C`` for ``(X, Y, Z, C)``."""
    extra = [int(s) for s in shape[dims:]]
    if len(extra) > 1:
        raise InputError(path, f"{len(shape)}D image {tuple(shape)}; expected {dims}D (or {dims + 1}D with channels)")
    return extra[0] if extra else 1


def _describe_channels(files: Sequence[str], shapes: Sequence[Sequence[int]], dims: int) -> str:
    if len(files) > 1:
        return f"{len(files)} channel files"
    if len(shapes[0]) > dims:
        return f"{len(shapes[0])}D image with {shapes[0][dims]} frames/channels"
    return f"{dims}D image {tuple(int(x) for x in shapes[0])}"


def _case_fingerprint(item: dict, rng_seed: int, samples: int, read_voxels: bool, declared: dict) -> dict:
    """One case: geometry (RAS frame), channel count and, when ``read_voxels``, intensity samples.

    Raises:
        InputError: a file is unreadable; the image's channels or dimensions disagree with what
            ``declared`` (from dataset.json) says; or, for cases whose voxels are read,
            :func:`medunet.data.check.check_case_data` finds an error (label off its image, undeclared
            or fractional label values…). One error per problem, joined by newlines.
    """
    files = [str(f) for f in (item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]])]
    label_path = str(item.get("label") or "")
    case: dict = {"image": files[0]}
    if not read_voxels and all(is_nifti(f) for f in files):
        geos = [_header_geometry(f) for f in files]
        shape, affine, dims = geos[0]
        case["shape"], case["spacing"] = _ras_geometry(shape, affine, dims)
        case.update(_case_channels(files, [g[0] for g in geos], dims, declared))
        return case
    images = [read_image(f) for f in files]
    dims = images[0].spatial_dims
    spatial = images[0].array.shape[:dims]
    case["shape"], case["spacing"] = _ras_geometry(spatial, images[0].affine, dims)
    case.update(_case_channels(files, [im.array.shape for im in images], dims, declared))
    label = read_image(label_path) if label_path else None
    errors = [f"{p.path}: {p.message}" for p in check_case_data(
        images, label, labels=declared["labels"], channels=case["channels"], spatial_dims=declared["spatial_dims"])
        if p.severity == "error"]
    if errors:
        raise _Refused(errors)
    channels = []
    for im in images:
        channels += [im.array] if im.array.ndim == dims else [im.array[..., c] for c in range(im.array.shape[-1])]
    mask = None
    if label is not None:
        label = label.array.reshape(spatial)
        mask = label > 0
        case["label_voxels"] = _value_counts(label)
        case["largest_fraction"] = _largest_fractions(label, case["label_voxels"])
    rng = np.random.default_rng(rng_seed)
    case["foreground_samples"] = []
    nonzero = np.zeros(spatial, dtype=bool)
    for ch in channels:
        nonzero |= ch != 0
        fg = ch[mask] if mask is not None and mask.any() else ch.reshape(-1)
        # sampled with replacement (as nnU-Net does): cheap on large foregrounds, unbiased percentiles
        case["foreground_samples"].append(fg[rng.integers(0, fg.size, samples)] if fg.size else fg[:0])
    case["nonzero_fraction"] = _bbox_fraction(nonzero)
    return case


class _Refused(Exception):
    """A case refused for one or more problems (``lines``: ``"path: reason"`` each)."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


def _case_channels(files: Sequence[str], shapes: Sequence[Sequence[int]], dims: int, declared: dict) -> dict:
    """``{"channels", "dims", "channel_text"}`` of a case; refuses a count that differs from the
    modalities dataset.json declares or dimensions that differ from its ``tensorImageSize``."""
    n = sum(_channel_count(f, s, dims) for f, s in zip(files, shapes))
    text = _describe_channels(files, shapes, dims)
    want_dims = declared["spatial_dims"]
    if want_dims is not None and dims != want_dims:
        raise InputError(files[0], f"{text} where dataset.json declares {want_dims}D images (tensorImageSize)")
    want = declared["channels"]
    if want is not None and n != want:
        raise InputError(files[0], f"{text} where dataset.json declares {want} modalit{'y' if want == 1 else 'ies'}")
    return {"channels": n, "dims": dims, "channel_text": text}


def _majority_refusals(cases: list[dict], key: str, what: str) -> tuple[list[dict], list[str]]:
    """Without a declaration in dataset.json, the most common ``key`` (dims or channels) decides; the
    cases that differ are refused with a line each."""
    common = Counter(c[key] for c in cases).most_common(1)[0][0] if cases else None
    keep = [c for c in cases if c[key] == common]
    refused = [f"{c['image']}: {c['channel_text']} where the dataset's other cases are {common}{what}"
               for c in cases if c[key] != common]
    return keep, refused


def _value_counts(label: np.ndarray) -> dict[str, int]:
    """Voxels per label value (bincount for the usual small non-negative integers)."""
    values = np.rint(label).astype(np.int64, copy=False)
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high < 65536:
        counts = np.bincount(values.ravel(), minlength=high + 1)
        return {str(v): int(c) for v, c in enumerate(counts) if c}
    uniq, counts = np.unique(values, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(uniq, counts)}


def _largest_fractions(label: np.ndarray, counts: dict[str, int]) -> dict[str, float]:
    """Per foreground value: the fraction of its voxels in its largest connected component (full
    connectivity, as the Predictor's cleaning). 1.0: the class is one object in this label."""
    from scipy import ndimage

    out = {}
    structure = np.ones((3,) * label.ndim, dtype=bool)
    for value, count in counts.items():
        if int(value) == 0 or not count:
            continue
        components, n = ndimage.label(np.rint(label) == int(value), structure=structure)
        sizes = np.bincount(components.ravel())[1:] if n else np.zeros(1)
        out[value] = float(sizes.max() / count) if n else 0.0
    return out


def _bbox_fraction(mask: np.ndarray) -> float:
    """Fraction of the image covered by the bounding box of ``mask`` (1 when empty) — nnU-Net's cue
    for z-scoring within the nonzero region."""
    extent = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return 1.0
        extent.append(int(hit[-1] - hit[0] + 1))
    return float(np.prod(extent) / mask.size)


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"mean": 0.0, "std": 1.0, "median": 0.0, "min": 0.0, "max": 0.0,
                "percentile_00_5": 0.0, "percentile_99_5": 0.0, "samples": 0}
    v = values.astype(np.float64)
    p005, p50, p995 = np.percentile(v, [0.5, 50.0, 99.5])
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(p50), "min": float(v.min()),
            "max": float(v.max()), "percentile_00_5": float(p005), "percentile_99_5": float(p995),
            "samples": int(v.size)}


def fingerprint_dataset(
    dataset_dir_or_items: str | os.PathLike | Sequence[dict],
    samples_per_case: int = _SAMPLES_PER_CASE,
    intensity_cases: int | None = None,
    num_threads: int = 2,
    seed: int = 0,
) -> dict:
    """Per-case geometry and foreground intensity statistics of a dataset.

    Args:
        dataset_dir_or_items: an MSD folder (``dataset.json``) or a list of ``{"image", "label"}``.
        samples_per_case: foreground voxels sampled per case and channel for the intensity statistics.
        intensity_cases: read voxels of at most this many cases (evenly spread); the others contribute
            geometry from their headers only. ``None`` reads all.
        num_threads: cases read in parallel (gzip decompression releases the GIL).
        seed: sampling seed (the fingerprint is deterministic for a seed).

    Returns:
        ``{"n_cases", "cases": [{"image", "shape", "spacing"}…] (RAS frame), "spacing_median",
        "shape_median", "intensity": [per channel: mean, std, median, min, max, percentile_00_5,
        percentile_99_5, samples], "nonzero_fraction_median", "label_voxels", "largest_component_fraction"
        (per class: the smallest fraction, over the cases, of its voxels in its largest connected
        component), "modality", "labels",
        "failed": ["path: reason", …], "n_refused", "in_channels", "seconds"}``.

        A case is refused (one ``failed`` line per problem, naming the file; planning goes on with the
        rest) when a file is unreadable (the reader's own wording: permission denied, not NIfTI…), when
        its channels or dimensions differ from the modalities/``tensorImageSize`` of ``dataset.json``
        (without those: from the majority of the cases), or — for cases whose voxels are read — when
        :func:`medunet.data.check.check_case_data` reports an error (label shape/geometry off its image,
        undeclared or fractional label values, 4D label…). Header-only cases (``intensity_cases``) are
        checked from their image headers; ``medunet check-dataset`` checks everything.

    Raises:
        NoUsableCases: every case was refused (``.failed`` lists why, one line per problem).
    """
    start = time.perf_counter()
    meta = _no_declarations()
    if isinstance(dataset_dir_or_items, (str, os.PathLike)):
        items, meta = _dataset(dataset_dir_or_items)
    else:
        items = [dict(i) for i in dataset_dir_or_items]
    if not items:
        raise ValueError(f"{dataset_dir_or_items}: no training cases to fingerprint")
    n = len(items)
    chosen = set(range(n)) if intensity_cases is None or intensity_cases >= n else set(
        np.linspace(0, n - 1, max(int(intensity_cases), 1)).round().astype(int).tolist())

    def work(i: int) -> dict | list[str]:
        try:
            return _case_fingerprint(items[i], seed + i, samples_per_case, i in chosen, meta)
        except _Refused as e:
            return e.lines
        except InputError as e:
            return [" ".join(str(e).split())]
        except (OSError, ValueError) as e:
            image = items[i]["image"]
            return [str(InputError(image[0] if isinstance(image, (list, tuple)) else image, " ".join(str(e).split())))]

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = list(pool.map(work, range(n)))
    cases = [r for r in results if isinstance(r, dict)]
    failed = [line for r in results if not isinstance(r, dict) for line in r]
    for key, what, declared in (("dims", "D", meta["spatial_dims"]), ("channels", " channel(s)", meta["channels"])):
        if declared is None:
            cases, refused = _majority_refusals(cases, key, what)
            failed += refused
    if not cases:
        raise NoUsableCases(f"{dataset_dir_or_items}: no usable cases ({n} refused)", failed)
    spacings = np.array([c["spacing"] for c in cases])
    shapes = np.array([c["shape"] for c in cases])
    sampled = [c for c in cases if "foreground_samples" in c]
    n_channels = int(cases[0]["channels"])  # every kept case has it (declared, or the majority)
    intensity = [_stats(np.concatenate([c["foreground_samples"][ch] for c in sampled
                                        if len(c["foreground_samples"]) > ch] or [np.zeros(0)]))
                 for ch in range(n_channels)]
    largest: dict[str, float] = {}
    for c in sampled:
        for k, v in c.get("largest_fraction", {}).items():
            largest[k] = min(largest.get(k, 1.0), v)
    label_voxels: dict[str, int] = {}
    for c in sampled:
        for k, v in c.get("label_voxels", {}).items():
            label_voxels[k] = label_voxels.get(k, 0) + v
    return {
        "n_cases": len(cases),
        "n_refused": n - len(cases),
        "cases": [{"image": c["image"], "shape": c["shape"], "spacing": c["spacing"]} for c in cases],
        "spacing_median": np.median(spacings, axis=0).tolist(),
        "shape_median": np.median(shapes, axis=0).tolist(),
        "intensity": intensity,
        "in_channels": n_channels,
        "nonzero_fraction_median": float(np.median([c["nonzero_fraction"] for c in sampled])) if sampled else 1.0,
        "label_voxels": dict(sorted(label_voxels.items(), key=lambda kv: int(kv[0]))),
        "largest_component_fraction": dict(sorted(largest.items(), key=lambda kv: int(kv[0]))),
        "intensity_cases": len(sampled),
        "modality": meta["modality"],
        "labels": meta["labels"],
        "failed": failed,
        "seconds": round(time.perf_counter() - start, 3),
    }


# --------------------------------------------------------------------------------------------------
# planning
def target_spacing(spacings: np.ndarray, anisotropy: float = _ANISOTROPY) -> list[float]:
    """Median spacing per axis; for strongly anisotropic data (max/min > ``anisotropy``) the
    low-resolution axis takes its 10th percentile (never finer than the coarsest other axis), so
    thick-slice cases are not interpolated into many invented slices (nnU-Net's rule)."""
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    if others and target[worst] / max(target.min(), 1e-8) > anisotropy:
        p10 = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(p10, float(max(target[a] for a in others)))
    return [round(float(s), 6) for s in target]


def _levels(patch: Sequence[int], strides: Sequence[Sequence[int]]) -> list[list[int]]:
    sizes, out = [int(p) for p in patch], []
    for s in strides:
        sizes = [max(1, sz // st) for sz, st in zip(sizes, s)]
        out.append(sizes)
    return out


def estimate_memory_mb(patch: Sequence[int], strides: Sequence[Sequence[int]], filters: Sequence[int],
                       in_channels: int = 1, out_channels: int = 2, batch_size: int = 1) -> float:
    """Training-step memory of a U-Net (DynUNet-like) on ``patch``: activations kept for backward.

    Per level with ``F`` filters over ``v`` voxels: encoder 2 convs × (conv, norm, activation) and the
    decoder the same plus the transposed conv and the concatenation → about 16·F·v floats, plus input
    and output. Parameters/optimizer state are small next to activations and ignored.
    """
    floats = sum(16.0 * f * math.prod(v) for f, v in zip(filters, _levels(patch, strides)))
    floats += (in_channels + 3 * out_channels) * math.prod(int(p) for p in patch)
    return batch_size * floats * 4 / 1024**2


def estimate_gflops(patch: Sequence[int], strides: Sequence[Sequence[int]], filters: Sequence[int],
                    kernel_size: Sequence[Sequence[int]], in_channels: int = 1, batch_size: int = 1) -> float:
    """Forward + backward GFLOP of one training step (≈ 3 × the forward multiply-adds × 2)."""
    macs, prev = 0.0, in_channels
    for f, v, k in zip(filters, _levels(patch, strides), kernel_size):
        kvol = math.prod(int(x) for x in k)
        enc = math.prod(v) * kvol * (prev * f + f * f)
        dec = math.prod(v) * kvol * (2 * f * f + f * f)  # conv on the concatenation, then one more
        macs += enc + dec
        prev = f
    return batch_size * 3 * 2 * macs / 1e9


def receptive_field(kernel_size: Sequence[Sequence[int]], strides: Sequence[Sequence[int]]) -> list[int]:
    """Theoretical receptive field (voxels per axis) of one output voxel of MONAI's DynUNet.

    Encoder level ``i``: two convolutions of ``kernel_size[i]``, the first with stride ``strides[i]``.
    Decoder step from level ``j`` up to ``j - 1``: a transposed convolution (kernel = stride, so it
    widens nothing) and two convolutions of ``kernel_size[j]`` at level ``j - 1``'s resolution. A
    convolution of size ``k`` whose input voxels each span ``J`` image voxels widens the field by
    ``(k - 1)·J``.
    """
    dims = len(kernel_size[0])
    field, jump = [1] * dims, [1] * dims
    for k, s in zip(kernel_size, strides):
        for a in range(dims):
            field[a] += (int(k[a]) - 1) * jump[a]
            jump[a] *= int(s[a])
            field[a] += (int(k[a]) - 1) * jump[a]
    for k, s in zip(kernel_size[:0:-1], strides[:0:-1]):
        for a in range(dims):
            jump[a] //= int(s[a])
            field[a] += 2 * (int(k[a]) - 1) * jump[a]
    return field


def _filters(n_levels: int, base: int, maximum: int) -> list[int]:
    return [min(base * 2**i, maximum) for i in range(n_levels)]


def _fit_layout(patch: list[int], spacing: list[float], cap: list[int], dims: int, base: int, maximum: int):
    """Kernels/strides for ``patch``; patch rounded up to the network's divisibility (≤ ``cap``)."""
    from medunet.networks import dynunet_layout

    for _ in range(8):
        kernels, strides = dynunet_layout(dims, patch, spacing, max_levels=7 if dims == 2 else 6)
        div = [math.prod(s[a] for s in strides) for a in range(dims)]
        rounded = []
        for p, d, c in zip(patch, div, cap):
            up = int(math.ceil(p / d)) * d
            rounded.append(up if up <= c else max((c // d) * d, d))
        if rounded == patch:
            break
        patch = rounded
    return patch, kernels, strides, div, _filters(len(strides), base, maximum)


def _coarser(spacing: Sequence[float], step: float = 1.03) -> list[float]:
    """One coarsening step of the grid: axes more than twice finer than the coarsest grow first (an
    anisotropic grid becomes isotropic), then all axes together."""
    coarsest = max(spacing)
    fine = [coarsest / s > 2.0 for s in spacing]
    if not any(fine):
        fine = [True] * len(spacing)
    return [s * step if f else s for s, f in zip(spacing, fine)]


class _Fitter:
    """Patch and DynUNet layout for a median shape and spacing, within the memory/compute budgets."""

    def __init__(self, in_channels: int, out_channels: int, dims: int, base: int, maximum: int,
                 mem_budget: float, flop_budget: float | None, min_batch: int) -> None:
        self.cin, self.cout, self.dims, self.base, self.maximum = in_channels, out_channels, dims, base, maximum
        self.mem_budget, self.flop_budget, self.min_batch = mem_budget, flop_budget, min_batch

    def cost(self, patch, strides, kernels, filters, batch: int) -> tuple[float, float]:
        """(memory MB, GFLOP) of one training step."""
        return (estimate_memory_mb(patch, strides, filters, self.cin, self.cout, batch),
                estimate_gflops(patch, strides, filters, kernels, self.cin, batch))

    def patch(self, median_shape: Sequence[int], spacing: Sequence[float]):
        """Start at the median shape (rounded to the network's divisibility, down where possible so the
        patch is not larger than the median image) and shrink the axis largest relative to the median
        shape until a batch of ``min_batch`` fits the budgets. Returns (patch, kernels, strides, filters)."""
        dims, base, maximum = self.dims, self.base, self.maximum
        median_shape = [max(int(s), 1) for s in median_shape]
        _, _, _, div0, _ = _fit_layout(list(median_shape), spacing, [10**6] * dims, dims, base, maximum)
        cap = [max((c // d) * d, d) for c, d in zip(median_shape, div0)]
        patch = list(cap)
        while True:
            patch, kernels, strides, div, filters = _fit_layout(patch, spacing, cap, dims, base, maximum)
            mem, flops = self.cost(patch, strides, kernels, filters, self.min_batch)
            if mem <= self.mem_budget and (self.flop_budget is None or flops <= self.flop_budget):
                return patch, kernels, strides, filters
            ratios = [p / max(m, 1) if p - d >= 4 else -1.0 for p, m, d in zip(patch, median_shape, div)]
            if max(ratios) < 0:
                log.warning("patch %s still exceeds the budget; keeping the smallest valid patch", patch)
                return patch, kernels, strides, filters
            # shrink every axis tied for the largest patch/median ratio (keeps e.g. in-plane axes equal)
            for axis in [a for a in range(dims) if ratios[a] >= max(ratios) - 1e-9]:
                patch[axis] -= div[axis]


def plan_dataset(
    dataset_dir: str | os.PathLike | None = None,
    network: str = "dynunet",
    spatial_dims: int | None = 3,
    memory_budget_mb: float | None = None,
    gpu: bool = False,
    gflops_budget: float | None = None,
    fingerprint: dict | None = None,
    min_batch_size: int = 2,
    max_batch_size: int = 16,
    spacing: Sequence[float] | None = None,
    coarsen: bool | None = None,
    min_coverage: float = _MIN_COVERAGE,
    network_options: dict | None = None,
) -> Plan:
    """nnU-Net-like configuration from a dataset fingerprint.

    Args:
        dataset_dir: MSD folder (``dataset.json``; its ``modality`` decides CT vs z-score normalisation).
        network: a registry name; ``"dynunet"`` gets kernels/strides/filters from the plan, other names
            keep their defaults and the patch is rounded up to a size they accept.
        spatial_dims: 3, or 2 (slices across the last RAS axis; 2D images as they are); ``None``: the
            data's own (dataset.json's ``tensorImageSize``, else the images').
        memory_budget_mb: training-step memory for the batch; default 8000 (``gpu``) or 2000 (CPU).
        gpu: plan for a GPU; on CPU (default) filters start at 16 and a compute budget
            (``gflops_budget``, default 40 GFLOP per step) keeps a training step to seconds.
        fingerprint: reuse a :func:`fingerprint_dataset` result (else it is computed).
        min_batch_size, max_batch_size: batch-size bounds.
        spacing: the target spacing (mm, RAS frame) instead of nnU-Net's rule (median, or the 10th
            percentile along a strongly anisotropic axis) — as nnU-Net's ``overwrite_target_spacing``: a
            coarser grid lets a CPU-sized patch see a whole abdomen. The median shape, patch and layout
            follow from it.
        coarsen: when the budget's patch covers less than ``min_coverage`` of the median image (in
            voxels), coarsen the target spacing step by step — the finer axes first, as nnU-Net builds
            its ``3d_lowres`` grid — until it does (at most 4× the planned spacing). Default: on for a
            3D CPU plan (a CPU's patch is small; more context beats more detail), off with ``gpu``.
            Never with an explicit ``spacing``. The plan's ``fingerprint["lowres"]`` records it.
        min_coverage: fraction of the median image's voxels the patch should cover (nnU-Net: 0.25).
        network_options: options of a network other than ``"dynunet"`` (e.g. ``unet2015``'s ``features``),
            stored in the plan and used when rounding the patch to a size that network accepts.

    The plan's ``fingerprint["estimate"]`` holds the step's memory/GFLOP estimate, the network's
    receptive field (voxels and mm per axis), the patch in mm and its coverage of the median image.

    Returns:
        a :class:`Plan` (all spacings/shapes in the RAS-reoriented frame).
    """
    from medunet import networks

    if spatial_dims not in (2, 3, None):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    networks.get_spec(network)  # fail early on an unknown name
    fp = fingerprint if fingerprint is not None else fingerprint_dataset(dataset_dir)
    budget = BUDGETS["gpu" if gpu else "cpu"]
    mem_budget = float(memory_budget_mb if memory_budget_mb is not None else budget["memory_mb"])
    flop_budget = None if gpu else float(gflops_budget if gflops_budget is not None else budget["gflops"])
    coarsen = (not gpu) if coarsen is None else bool(coarsen)
    spacings = np.array([c["spacing"] for c in fp["cases"]], dtype=np.float64)
    shapes = np.array([c["shape"] for c in fp["cases"]], dtype=np.float64)
    data_dims = spacings.shape[1]
    spatial_dims = data_dims if spatial_dims is None else spatial_dims
    if spatial_dims == 3 and data_dims == 2:
        raise ValueError("a 3D plan needs 3D images; these are 2D (use --dims 2)")
    full_target = target_spacing(spacings)
    if spacing is not None:
        if len(spacing) != data_dims or any(not (float(v) > 0) for v in spacing):
            raise ValueError(f"spacing {list(spacing)} must be {data_dims} positive numbers (mm)")
        full_target = [float(v) for v in spacing]
    resampled = shapes * spacings / np.asarray(full_target)
    median_full = [int(round(s)) for s in np.median(resampled, axis=0)]
    if spatial_dims == 2:
        target, median_shape, plan_spacing = full_target[:2], median_full[:2], full_target[:2]
    else:
        target, median_shape, plan_spacing = full_target, median_full, full_target
    in_channels = int(fp.get("in_channels", 1))
    labels = fp.get("labels") or {"background": 0, "foreground": 1}
    out_channels = max(labels.values()) + 1
    base = int(budget["base_filters"])
    maximum = int(budget["max_filters_2d" if spatial_dims == 2 else "max_filters_3d"])

    fit = _Fitter(in_channels, out_channels, spatial_dims, base, maximum, mem_budget, flop_budget, min_batch_size)
    patch, kernels, strides, filters = fit.patch(median_shape, plan_spacing)
    lowres = None
    if coarsen and spacing is None and spatial_dims == 3:
        # a patch that covers little of the median image sees too little context to learn from: coarsen
        # the grid (nnU-Net's 3d_lowres rule) until the budget's patch covers min_coverage of it
        factor = 1.0
        while math.prod(patch) < min_coverage * math.prod(median_shape) and factor < _MAX_COARSENING:
            plan_spacing = _coarser(plan_spacing)
            factor = max(n / o for n, o in zip(plan_spacing, target))
            median_shape = [int(round(s)) for s in np.median(shapes * spacings / np.asarray(plan_spacing), axis=0)]
            patch, kernels, strides, filters = fit.patch(median_shape, plan_spacing)
        if factor > 1.0:
            lowres = {"from_spacing": [float(s) for s in target], "min_coverage": float(min_coverage)}
            target = [round(float(s), 6) for s in plan_spacing]
            plan_spacing = target
            resampled = shapes * spacings / np.asarray(target)
    # batch: as many patches as the budgets allow, but at most 5 % of the dataset's voxels
    mem1, flops1 = fit.cost(patch, strides, kernels, filters, 1)
    batch = int(mem_budget // max(mem1, 1e-9))
    if flop_budget is not None:
        batch = min(batch, int(flop_budget // max(flops1, 1e-9)))
    dataset_voxels = float(np.sum(np.prod(resampled, axis=1)))
    batch = min(batch, int(_MAX_BATCH_FRACTION * dataset_voxels // math.prod(patch)), max_batch_size)
    batch = max(batch, min_batch_size)

    net_options: dict = {"name": network}
    if network != "dynunet":
        net_options.update({k: v for k, v in (network_options or {}).items() if k != "name"})
    if network == "dynunet":
        net_options.update({"kernel_size": kernels, "strides": strides, "filters": filters})
    else:
        net_patch = list(patch)
        patch = _round_for_network(network, spatial_dims, in_channels, out_channels, patch, net_options)

    normalization = _normalization(fp)
    single = single_object_classes(fp, labels)
    modality = _modality_name(fp)
    summary = {k: v for k, v in fp.items() if k != "cases"}
    summary["cases"] = fp["cases"]
    # for other networks the budget was applied to the DynUNet-equivalent of the patch (their own cost
    # differs: e.g. unet2015 has 64…1024 filters); the estimate says which
    est_patch = patch if network == "dynunet" else net_patch
    mem, flops = fit.cost(est_patch, strides, kernels, filters, batch)
    rf = receptive_field(kernels, strides)
    summary["estimate"] = {"memory_mb": round(mem, 1), "gflops_per_step": round(flops, 2),
                           "receptive_field_voxels": rf,
                           "receptive_field_mm": [round(r * sp, 1) for r, sp in zip(rf, target)],
                           "patch_mm": [round(p * sp, 1) for p, sp in zip(est_patch, target)],
                           "patch_coverage": round(math.prod(est_patch) / max(math.prod(median_shape), 1), 3),
                           "memory_budget_mb": mem_budget, "gflops_budget": flop_budget,
                           "device": "gpu" if gpu else "cpu",
                           "basis": "dynunet" if network == "dynunet" else f"dynunet-equivalent of {network}"}
    if lowres:
        summary["lowres"] = lowres
    if spatial_dims == 2 and data_dims == 3:
        summary["slice_axis"] = 2
    return Plan(
        labels=dict(labels), spatial_dims=spatial_dims, modality=modality, in_channels=in_channels,
        orientation="RAS", target_spacing=[float(s) for s in target], normalization=normalization,
        patch_size=[int(p) for p in patch], batch_size=int(batch), network=net_options,
        median_shape=[int(s) for s in median_shape], fingerprint=summary, largest_component=single,
    )


def single_object_classes(fp: dict, labels: dict[str, int]) -> list[int] | None:
    """Classes that are one object in every training label (the largest connected component holds at
    least ``_SINGLE_OBJECT`` of the class's voxels in every case with that class): their predictions
    keep only the largest component. Decided from the shapes of the dataset's labels (the fingerprint),
    never from predictions or validation scores; ``None`` when the fingerprint read no labels."""
    fractions = fp.get("largest_component_fraction")
    if not fractions:
        return None
    present = {int(k): v for k, v in fractions.items()}
    return [v for v in sorted(set(labels.values())) if v and v in present and present[v] >= _SINGLE_OBJECT]


def _round_for_network(name: str, dims: int, cin: int, cout: int, patch: list[int], options: dict) -> list[int]:
    """Round ``patch`` up to an input size network ``name`` (default options) accepts; for networks with
    valid convolutions (``unet2015``) the input grows by the margin so the output covers ``patch``."""
    from medunet import networks

    if name == "unetr":  # accepts exactly its img_size: make that the patch (no need to build the ViT)
        options["img_size"] = list(patch)
        return list(patch)
    net = networks.create(name, spatial_dims=dims, in_channels=cin, out_channels=cout,
                          **{k: v for k, v in options.items() if k != "name"})
    shape = net.valid_input_shape(patch, mode="up")
    margin = net.input_margin(shape)
    if any(margin):  # valid convolutions: the patch is the input, so its output must still cover `patch`
        shape = net.valid_input_shape([p + 2 * m for p, m in zip(patch, margin)], mode="up")
    return [int(s) for s in shape]


def _modality_name(fp: dict) -> str:
    names = [str(v) for v in (fp.get("modality") or {}).values()]
    if any(n.upper() == "CT" for n in names):
        return "CT"
    if any(n.upper() in ("MRI", "MR") or n.upper().startswith(("T1", "T2", "FLAIR", "ADC", "DWI")) for n in names):
        return "MRI"
    return names[0] if names else "unknown"


def _normalization(fp: dict) -> dict:
    """CT: clip to the foreground 0.5/99.5 percentiles and standardise with the foreground mean/std;
    anything else: per-image z-score, within the nonzero region when that region is clearly smaller
    than the image (nnU-Net's rule: the nonzero box covers < 3/4 of it)."""
    if _modality_name(fp) == "CT":
        s = fp["intensity"][0]
        return {"scheme": "ct", "clip": [round(s["percentile_00_5"], 4), round(s["percentile_99_5"], 4)],
                "mean": round(s["mean"], 4), "std": round(max(s["std"], 1e-6), 4)}
    return {"scheme": "zscore", "nonzero": bool(fp.get("nonzero_fraction_median", 1.0) < 0.75)}


def format_plan(plan: Plan) -> str:
    """A human-readable summary table of a plan."""
    fp = plan.fingerprint or {}
    est = fp.get("estimate", {})
    rows = [
        ("cases", f"{fp.get('n_cases', '?')} ({fp.get('n_refused', len(fp.get('failed', [])))} refused)"),
        ("modality", plan.modality),
        ("labels", ", ".join(f"{v}={k}" for k, v in sorted(plan.labels.items(), key=lambda kv: kv[1]))),
        ("spatial dims", str(plan.spatial_dims)),
        ("median spacing (RAS)", _fmt(fp.get("spacing_median"))),
        ("target spacing", _fmt(plan.target_spacing)),
        ("median shape (resampled)", _fmt(plan.median_shape)),
        ("normalization", json.dumps(plan.normalization)),
        ("network", plan.network.get("name", "?")),
        ("patch size", _fmt(plan.patch_size)),
        ("batch size", str(plan.batch_size)),
    ]
    if "strides" in plan.network:
        rows.append(("pooling per axis", _fmt([sum(1 for s in plan.network["strides"] if s[a] > 1)
                                                for a in range(plan.spatial_dims)])))
        rows.append(("filters", _fmt(plan.network.get("filters"))))
    if est:
        budget = f"{est.get('memory_budget_mb')} MB" + (f", {est['gflops_budget']} GFLOP" if est.get("gflops_budget")
                                                       else "")
        rows.append(("estimate per step", f"{est.get('memory_mb')} MB, {est.get('gflops_per_step')} GFLOP "
                                          f"({est.get('device')}; budget {budget}; {est.get('basis', 'dynunet')})"))
    if est.get("receptive_field_mm"):
        rows.append(("patch (mm)", _fmt(est.get("patch_mm"))
                     + f"  ({100 * est.get('patch_coverage', 0):.0f} % of the median image)"))
        rows.append(("receptive field", _fmt(est["receptive_field_voxels"]) + " voxels = "
                     + _fmt(est["receptive_field_mm"]) + " mm"))
    if plan.largest_component:
        names = plan.label_names
        rows.append(("largest component only", ", ".join(names.get(int(c), str(c)) for c in plan.largest_component)
                     + " (one object in every training label)"))
    if fp.get("lowres"):
        rows.append(("coarsened grid", f"from {_fmt(fp['lowres']['from_spacing'])} mm: a patch within the budget "
                                       f"covers >= {100 * fp['lowres']['min_coverage']:.0f} % of the median image"))
    rows.append(("fingerprint time", f"{fp.get('seconds', '?')} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _fmt(values) -> str:
    if values is None:
        return "-"
    return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
