"""Built-in phantom datasets (CT, MRI, 2D cells) written in the Medical Segmentation Decathlon layout.

They are the default data of ``make demo``, the bundles and the tests: realistic intensities and
geometry, deterministic for a seed, generated in about a second per case at default sizes.

Example::

    >>> from medunet.data.phantoms import generate_dataset
    >>> root = generate_dataset("ct", "/tmp/ct", cases=4, size="small")   # doctest: +SKIP
    >>> sorted(p.name for p in root.iterdir())                              # doctest: +SKIP
    ['dataset.json', 'imagesTr', 'imagesTs', 'labelsTr', 'labelsTs']

Layout written (``<id>`` is ``<kind>_<NNN>``)::

    imagesTr/<id>.nii.gz   labelsTr/<id>.nii.gz   [instancesTr/<id>.nii.gz for cells]
    imagesTs/<id>.nii.gz   labelsTs/<id>.nii.gz   (test labels, for evaluating predictions)
    dataset.json           (MSD keys: name, description, modality, labels, numTraining, training, test…)

Case ``i`` depends only on ``(kind, seed, i)``: asking for more cases never changes earlier ones.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from medunet.data.phantoms import cells, ct, mri
from medunet.data.phantoms._common import PhantomCase
from medunet.io import atomic_path, atomic_write_text, write_nifti

__all__ = ["generate_dataset", "generate_case", "KINDS", "FORMATS", "PhantomCase", "GENERATOR_TAG"]

KINDS: dict[str, ModuleType] = {"ct": ct, "mri": mri, "cells": cells}
FORMATS = ("nifti", "png")
GENERATOR_TAG = "medunet.data.phantoms"
_DESCRIPTIONS = {
    "ct": "Synthetic abdominal CT (HU): liver, kidneys and spleen; anisotropic spacing, varied voxel orders "
          "and oblique grids",
    "mri": "Synthetic T1 MRI crops around the hippocampus (anterior / posterior), arbitrary intensity scale, "
           "bias field, Rician noise",
    "cells": "Synthetic 2D microscopy of touching cells with thin gaps; instance maps in instancesTr/",
}
_IMAGE_DTYPES = {"ct": np.int16, "mri": np.float32, "cells": np.uint8}


def generate_case(kind: str, index: int, seed: int = 0, size="default") -> PhantomCase:
    """Generate case ``index`` of ``kind`` in memory (same as the one :func:`generate_dataset` writes)."""
    module = _kind_module(kind)
    rng = np.random.default_rng([int(seed), int(index), zlib.crc32(kind.encode())])
    return module.make_case(rng, _check_size(size, module.SPATIAL_DIMS))


def generate_dataset(
    kind: str,
    out_dir: str | os.PathLike,
    cases: int,
    seed: int = 0,
    size: str | tuple = "default",
    test_cases: int | None = None,
    fmt: str = "nifti",
    on_case: Callable[[str, float], None] | None = None,
) -> Path:
    """Write a phantom dataset in MSD layout and return its folder.

    Args:
        kind: ``"ct"``, ``"mri"`` or ``"cells"``.
        out_dir: target folder; created if needed. It must be empty or hold an earlier phantom set
            (which is replaced); any other non-empty folder is refused so user data is never mixed in.
        cases: number of training cases (``imagesTr``/``labelsTr``), ≥ 1.
        seed: random seed; the same ``(kind, seed, size)`` always gives the same files.
        size: ``"small"`` (tiny volumes for tests: CT 48×48×24, MRI 32×40×32, cells 96×96),
            ``"default"`` (realistic: CT 256–512 in-plane, MRI hippocampus-sized crops, cells 512×512)
            or an explicit voxel shape ``(X, Y, Z)`` / ``(X, Y)``.
        test_cases: number of test cases (``imagesTs``, with ground truth in ``labelsTs``); default
            20 % of ``cases`` (at least 1).
        fmt: ``"nifti"`` (``.nii.gz``) or, for cells only, ``"png"``.
        on_case: called as ``on_case(case_id, seconds)`` after each case is written.
    """
    module = _kind_module(kind)
    if fmt not in FORMATS:
        raise ValueError(f"phantoms: format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "png" and module.SPATIAL_DIMS != 2:
        raise ValueError(f"phantoms: format 'png' is for 2D kinds (cells), not {kind!r}")
    if int(cases) < 1:
        raise ValueError(f"phantoms: cases must be at least 1, got {cases}")
    size = _check_size(size, module.SPATIAL_DIMS)
    n_test = max(1, round(0.2 * int(cases))) if test_cases is None else int(test_cases)
    if n_test < 0:
        raise ValueError(f"phantoms: test_cases must be ≥ 0, got {test_cases}")
    out = Path(out_dir)
    _check_target(out)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        training, test = _write_cases(kind, work, int(cases), n_test, seed, size, fmt, on_case)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    labels = module.LABELS
    meta = {
        "name": f"medunet-phantom-{kind}",
        "description": _DESCRIPTIONS[kind],
        "reference": "generated by medunet (medunet phantoms)",
        "licence": "CC0",
        "release": f"seed {int(seed)}, size {size if isinstance(size, str) else list(size)}",
        "tensorImageSize": f"{module.SPATIAL_DIMS}D",
        "modality": {"0": module.MODALITY},
        "labels": {str(v): k for k, v in sorted(labels.items(), key=lambda kv: kv[1])},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        # MSD lists test images as plain paths; labelsTs holds their ground truth for evaluation.
        "test": [e["image"] for e in test],
        "generator": GENERATOR_TAG,
    }
    atomic_write_text(work / "dataset.json", json.dumps(meta, indent=2) + "\n")
    _swap_in(work, out)
    return out


def _write_cases(kind: str, work: Path, cases: int, n_test: int, seed: int, size, fmt: str,
                 on_case: Callable[[str, float], None] | None) -> tuple[list[dict], list[dict]]:
    """Generate and write every case into ``work``; returns the training and test datalist entries."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):  # MSD folders exist even when empty
        (work / sub).mkdir(parents=True, exist_ok=True)
    ext = ".png" if fmt == "png" else ".nii.gz"
    training, test = [], []
    for index in range(cases + n_test):
        start = time.perf_counter()
        is_train = index < cases
        case_id = f"{kind}_{index:03d}"
        case = generate_case(kind, index, seed, size)
        suffix = "Tr" if is_train else "Ts"
        entry = {"image": f"./images{suffix}/{case_id}{ext}", "label": f"./labels{suffix}/{case_id}{ext}"}
        _write(case.image, case.affine, work / entry["image"], _IMAGE_DTYPES[kind])
        _write(case.label, case.affine, work / entry["label"], np.uint8)
        if case.instances is not None:
            entry["instance"] = f"./instances{suffix}/{case_id}{ext}"
            _write(case.instances, case.affine, work / entry["instance"], np.uint16)
        (training if is_train else test).append(entry)
        if on_case is not None:
            on_case(case_id, time.perf_counter() - start)

    return training, test


def _kind_module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise ValueError(f"phantoms: unknown kind {kind!r}; choose one of {sorted(KINDS)}")
    return KINDS[kind]


def _check_size(size, spatial_dims: int):
    if isinstance(size, str):
        if size not in ("small", "default"):
            raise ValueError(f"phantoms: size must be 'small', 'default' or a shape, got {size!r}")
        return size
    shape = tuple(int(s) for s in size)
    if len(shape) != spatial_dims or min(shape) < 8:
        raise ValueError(f"phantoms: size {tuple(size)} must have {spatial_dims} axes of at least 8 voxels")
    return shape


def _check_target(out: Path) -> None:
    """Refuse a target holding anything but an earlier phantom set, so user data is never replaced."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            previous = json.loads((out / "dataset.json").read_text(encoding="utf-8")).get("generator")
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous != GENERATOR_TAG:
            raise FileExistsError(f"{out}: folder is not empty and is not a medunet phantom set; "
                                  "choose an empty or new folder")


def _swap_in(work: Path, out: Path) -> None:
    """Move the finished set into place: the dataset appears whole or not at all."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(work, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write(array: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    if path.suffix == ".png":
        from PIL import Image

        data = np.ascontiguousarray(np.asarray(array, dtype=dtype).T)  # (X, Y) → PIL rows = Y
        with atomic_path(path) as tmp:  # uint8 → 8-bit gray, uint16 → 16-bit gray PNG
            Image.fromarray(data).save(tmp, format="PNG")
    else:
        write_nifti(array, affine, path, dtype=dtype)
