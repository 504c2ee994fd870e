"""Voxel ↔ patient-coordinate maps of a DICOM series read by medunet, and what the series is.

medunet's :class:`~medunet.io.image.ImageData` holds a voxel → RAS affine for an ``(X, Y, Z)`` array
(``X`` = DICOM column, ``Y`` = DICOM row, ``Z`` = slice in the reader's order). DICOM objects use LPS
patient coordinates, so ``lps_affine = diag(-1, -1, 1, 1) @ affine``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medunet.io.errors import InputError
from medunet.io.image import ImageData

__all__ = ["LPS_TO_RAS", "lps_affine", "voxel_to_lps", "lps_to_voxel", "SeriesInfo", "series_info", "quiet_dicom"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@contextlib.contextmanager
def quiet_dicom():
    """Silence pydicom/highdicom's notes on the source's own values (an over-long SH, a one-part person
    name): they are the scanner's, copied as they are, and not the user's problem here."""
    logger = logging.getLogger("pydicom")  # pydicom also logs what it warns about
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


def lps_affine(image: ImageData) -> np.ndarray:
    """Voxel (column, row, slice) → LPS mm."""
    return LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)


def voxel_to_lps(image: ImageData, ijk: np.ndarray) -> np.ndarray:
    ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
    return ijk @ lps_affine(image)[:3, :3].T + lps_affine(image)[:3, 3]


def lps_to_voxel(image: ImageData, points: np.ndarray) -> np.ndarray:
    """LPS mm points ``(N, 3)`` → continuous voxel indices ``(N, 3)`` (column, row, slice)."""
    inv = np.linalg.inv(lps_affine(image))
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return points @ inv[:3, :3].T + inv[:3, 3]


@dataclass
class SeriesInfo:
    """Identity of the image series a label map belongs to, and its source datasets (no pixel data)."""

    study: str
    series: str
    frame_of_reference: str
    sop_instances: list[str]  # per slice, in the array's Z order
    sop_class: str
    modality: str
    datasets: list  # pydicom Datasets (headers only), per slice
    files: list[str]


def series_info(image: ImageData) -> SeriesInfo:
    """Headers of the DICOM series ``image`` was read from (``image.meta['files']``, in slice order).

    Raises:
        InputError: ``image`` was not read from a DICOM series, or its slices disagree on study, series or
            frame of reference.
    """
    import pydicom

    files = list(image.meta.get("files") or []) if image.source == "dicom" else []
    if not files:
        raise InputError(image.path, "not a DICOM series (DICOM SEG / RTSTRUCT outputs need a DICOM input)")
    if len(files) != image.spatial_shape[2]:
        raise InputError(image.path, f"{len(files)} DICOM files for {image.spatial_shape[2]} slices")
    datasets = []
    with quiet_dicom():
        for f in files:
            try:
                datasets.append(pydicom.dcmread(f, stop_before_pixels=True))
            except Exception as e:
                raise InputError(f, f"cannot read DICOM header ({type(e).__name__}: {e})") from None
        first = datasets[0]
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            values = {str(d.get(key, "")) for d in datasets}
            if len(values) != 1:
                raise InputError(image.path, f"slices disagree on {key} ({len(values)} values)")
    if not first.get("FrameOfReferenceUID"):
        raise InputError(files[0], "no FrameOfReferenceUID: the series has no patient coordinate system")
    return SeriesInfo(
        study=str(first.StudyInstanceUID), series=str(first.SeriesInstanceUID),
        frame_of_reference=str(first.FrameOfReferenceUID), sop_instances=[str(d.SOPInstanceUID) for d in datasets],
        sop_class=str(first.SOPClassUID), modality=str(first.get("Modality", "")), datasets=datasets,
        files=[str(Path(f)) for f in files],
    )
