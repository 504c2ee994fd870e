"""Finding DICOM objects in folders: image series, RTSTRUCTs and DICOM SEGs, told apart by their SOP class
and Modality (never by file name), and grouped into patients.

Only headers are read here (pydicom, ``stop_before_pixels``); the CT voxels are read by
:func:`medunet.io.image.read_dicom_series`, the reader ``medunet segment`` uses.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from medunet.io.errors import InputError

__all__ = [
    "DicomFile", "scan_dicom", "find_patients", "image_series", "is_image_series_folder", "RTSTRUCT_SOP_CLASS",
    "SEG_SOP_CLASS",
]

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Modalities that never hold the image series to segment (radiotherapy objects, reports, presentation
# states, registrations, ...), even when some of them carry pixel data (RTDOSE grids, RT images).
_NON_IMAGE_MODALITIES = {"RTSTRUCT", "SEG", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SR", "PR", "KO", "REG",
                         "DOC", "RWV", "PLAN", "FID", "OT_NONIMAGE"}
_HEADERLESS_SUFFIXES = {"", ".dcm", ".dicom", ".ima"}
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID", "StudyInstanceUID",
                "FrameOfReferenceUID", "Rows", "Columns", "PatientID"]


@dataclass(frozen=True)
class DicomFile:
    """One DICOM file's identity: ``kind`` is ``"image"``, ``"rtstruct"``, ``"seg"`` or ``"other"``."""

    path: Path
    kind: str
    modality: str
    sop_class: str
    sop_instance: str
    series: str
    study: str
    frame_of_reference: str


def _read_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        # no preamble / "DICM" prefix (old exports): tried only for DICOM-like names, and accepted only if
        # it parses into a real DICOM header
        if path.suffix.lower() not in _HEADERLESS_SUFFIXES and not path.suffix[1:].isdigit():  # UID-named files
            return None
    except Exception:
        return None
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
    except Exception:
        return None
    return ds if ds.get("SOPClassUID") and ds.get("Modality") else None


def _classify(path: Path) -> DicomFile | None:
    ds = _read_header(path)
    if ds is None:
        return None
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not sop_class or sop_class == _DICOMDIR_SOP_CLASS:
        return None
    modality = str(ds.get("Modality", "") or "").upper()
    if sop_class == RTSTRUCT_SOP_CLASS or modality == "RTSTRUCT":
        kind = "rtstruct"
    elif sop_class == SEG_SOP_CLASS or modality == "SEG":
        kind = "seg"
    elif modality not in _NON_IMAGE_MODALITIES and ds.get("Rows") and ds.get("Columns"):
        kind = "image"
    else:
        kind = "other"
    return DicomFile(path=path, kind=kind, modality=modality, sop_class=sop_class,
                     sop_instance=str(ds.get("SOPInstanceUID", "") or ""), series=str(ds.get("SeriesInstanceUID", "") or ""),
                     study=str(ds.get("StudyInstanceUID", "") or ""),
                     frame_of_reference=str(ds.get("FrameOfReferenceUID", "") or ""))


def scan_dicom(folder: str | os.PathLike, recursive: bool = True) -> list[DicomFile]:
    """Every DICOM file under ``folder`` (hidden files and non-DICOM files skipped), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder" if folder.exists() else "no such folder")
    found: list[DicomFile] = []
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, dirs, names in walker:
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            p = Path(root) / name
            if name.startswith(".") or not p.is_file():
                continue
            item = _classify(p)
            if item is not None:
                found.append(item)
    return found


def is_image_series_folder(folder: str | os.PathLike, probe: int = 4) -> bool:
    """Whether ``folder`` looks like a DICOM image series folder: one of its first ``probe`` files (by name,
    hidden ones skipped) is a DICOM image. A cheap test for listing studies; reading the series
    (:func:`medunet.io.image.read_dicom_series`) says what is wrong with one that is not readable."""
    folder = Path(folder)
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError:
        return False
    tried = 0
    for name in names:
        p = folder / name
        if not p.is_file():
            continue
        item = _classify(p)
        if item is not None and item.kind == "image":
            return True
        tried += 1
        if tried >= probe:
            break
    return False


def image_series(files: list[DicomFile]) -> dict[str, list[DicomFile]]:
    """Image files grouped by SeriesInstanceUID."""
    groups: dict[str, list[DicomFile]] = defaultdict(list)
    for f in files:
        if f.kind == "image":
            groups[f.series].append(f)
    return dict(groups)


def find_patients(src: str | os.PathLike) -> list[tuple[str, Path, list[DicomFile]]]:
    """Split ``src`` into patients: ``[(case id, folder, its DICOM files)]``.

    ``src`` is one patient when it holds DICOM files itself or when at most one of its sub-folders holds
    an image series (e.g. ``image/`` + ``mask/RS.dcm``); otherwise each sub-folder holding DICOM files is
    one patient (a folder of patient folders). A folder whose only content is one sub-folder is entered.
    The case id is the patient folder's name.

    Raises:
        InputError: ``src`` is not a folder or holds no DICOM file.
    """
    src = Path(src)
    files = scan_dicom(src)
    if not files:
        raise InputError(src, "no DICOM files found")
    folder = src
    while True:
        mine = [f for f in files if _is_within(f.path, folder)]
        direct = [f for f in mine if f.path.parent == folder]
        children: dict[Path, list[DicomFile]] = defaultdict(list)
        for f in mine:
            if f.path.parent != folder:
                children[folder / f.path.relative_to(folder).parts[0]].append(f)
        if direct or not children:
            return [(folder.name or str(folder), folder, mine)]
        if len(children) == 1:  # a wrapper folder: go down
            folder = next(iter(children))
            continue
        with_images = [c for c, fs in children.items() if any(f.kind == "image" for f in fs)]
        if len(with_images) <= 1:
            return [(folder.name or str(folder), folder, mine)]
        return [(c.name, c, children[c]) for c in sorted(children)]


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True
