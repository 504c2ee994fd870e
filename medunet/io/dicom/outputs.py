"""``medunet segment --format nifti|dicom-seg|rtstruct``: which files a prediction becomes.

The DICOM objects are built in memory first (:func:`build_dicom_outputs`, which raises before anything
is written), then each is written atomically (:func:`write_dicom_outputs`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medunet.io.errors import InputError
from medunet.io.image import ImageData

__all__ = ["OUTPUT_FORMATS", "DICOM_FORMATS", "parse_formats", "dicom_output_names", "label_names_of",
           "build_dicom_outputs", "write_dicom_outputs"]

OUTPUT_FORMATS = ("nifti", "dicom-seg", "rtstruct")
DICOM_FORMATS = ("dicom-seg", "rtstruct")
_ALIASES = {"nii": "nifti", "nifti": "nifti", "dicom-seg": "dicom-seg", "dicomseg": "dicom-seg", "seg": "dicom-seg",
            "rtstruct": "rtstruct", "rtss": "rtstruct"}
#: file name suffixes, after the case id
SUFFIXES = {"dicom-seg": "_seg.dcm", "rtstruct": "_rtstruct.dcm"}


def parse_formats(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"nifti,dicom-seg"`` or ``["nifti", "rtstruct"]`` → the formats in canonical order; ``None`` → nifti."""
    if value is None:
        return ("nifti",)
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    chosen = set()
    for item in items:
        key = item.strip().lower()
        if not key:
            continue
        if key not in _ALIASES:
            raise ValueError(f"--format {item.strip()!r}: choose from {', '.join(OUTPUT_FORMATS)} (comma-separated)")
        chosen.add(_ALIASES[key])
    if not chosen:
        raise ValueError(f"--format: give at least one of {', '.join(OUTPUT_FORMATS)}")
    return tuple(f for f in OUTPUT_FORMATS if f in chosen)


def dicom_output_names(case: str, out_dir: str | os.PathLike, formats: Sequence[str]) -> dict[str, Path]:
    """``{"dicom-seg": OUT/<case>_seg.dcm, "rtstruct": OUT/<case>_rtstruct.dcm}`` for the formats asked."""
    return {f: Path(out_dir) / f"{case}{SUFFIXES[f]}" for f in DICOM_FORMATS if f in formats}


def label_names_of(labels: Mapping) -> dict[int, str]:
    """A plan's ``{name: value}`` (or ``{value: name}``) → ``{value: name}`` without the background."""
    if labels and all(isinstance(v, (int, np.integer)) for v in labels.values()):
        pairs = {int(v): str(k) for k, v in labels.items()}
    else:
        pairs = {int(k): str(v) for k, v in labels.items()}
    return {v: n for v, n in sorted(pairs.items()) if v != 0}


def build_dicom_outputs(label: np.ndarray, image: ImageData, formats: Sequence[str], labels: Mapping) -> dict[str, object]:
    """The DICOM SEG and/or RTSTRUCT datasets of ``label`` (on ``image``'s grid) for ``formats``.

    Raises:
        InputError: ``image`` was not read from a DICOM series.
    """
    from medunet.io.dicom.geometry import series_info
    from medunet.io.dicom.rtstruct import build_rtstruct
    from medunet.io.dicom.seg import build_dicom_seg

    wanted = [f for f in DICOM_FORMATS if f in formats]
    if not wanted:
        return {}
    if image.source != "dicom":
        raise InputError(image.path, f"--format {','.join(wanted)} needs a DICOM series input; this is "
                                     f"{image.source.upper() if image.source != '2d' else 'a 2D image'} "
                                     "(use --format nifti)")
    info = series_info(image)
    names = label_names_of(labels)
    out: dict[str, object] = {}
    if "dicom-seg" in wanted:
        out["dicom-seg"] = build_dicom_seg(label, image, names, info)
    if "rtstruct" in wanted:
        out["rtstruct"] = build_rtstruct(label, image, names, info)
    return out


def write_dicom_outputs(built: Mapping[str, object], paths: Mapping[str, Path], overwrite: bool = True) -> list[Path]:
    """Write the datasets of :func:`build_dicom_outputs` to ``paths[format]``, each atomically."""
    from medunet.io.atomic import atomic_path
    from medunet.io.dicom.geometry import quiet_dicom

    written = []
    for fmt, ds in built.items():
        if fmt not in paths:
            continue
        with atomic_path(paths[fmt], overwrite=overwrite) as tmp, quiet_dicom():
            if fmt == "rtstruct":
                ds.save_as(str(tmp), enforce_file_format=True)
            else:
                ds.save_as(str(tmp))
        written.append(Path(paths[fmt]))
    return written
