"""DICOM CT series + RTSTRUCT / DICOM SEG → MSD dataset (``medunet import-dicom``).

:func:`read_dicom_case` turns one patient folder into an image and a label map in the series' exact
geometry — the image is read by :func:`medunet.io.image.read_dicom_series`, the reader ``medunet
segment`` uses, so a model trained on the imported NIfTI sees the same voxels as one segmenting the
DICOM. :func:`import_dicom` does that for one patient or a folder of patients and writes ``imagesTr/``,
``labelsTr/`` and ``dataset.json``; a bad patient costs one line and the others go on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medunet.io.atomic import atomic_path, atomic_write_text
from medunet.io.dicom.files import DicomFile, find_patients, image_series, scan_dicom
from medunet.io.dicom.geometry import SeriesInfo, quiet_dicom, series_info
from medunet.io.errors import InputError
from medunet.io.image import ImageData, read_dicom_series

__all__ = ["RoiSpec", "parse_rois", "DicomCase", "ImportResult", "read_dicom_case", "import_dicom"]


@dataclass(frozen=True)
class RoiSpec:
    """A ROI to import: ``name`` as in the RTSTRUCT/SEG (matched case-insensitively), ``label`` the class
    name written to dataset.json (default: the ROI's name as found in the file)."""

    name: str
    label: str | None = None


def parse_rois(rois: str | Sequence[str | RoiSpec]) -> list[RoiSpec]:
    """``"GTV,Liver=liver"`` or ``["GTV", "Liver=liver"]`` → RoiSpecs (``NAME=LABEL`` renames)."""
    items = rois.split(",") if isinstance(rois, str) else list(rois)
    out: list[RoiSpec] = []
    for item in items:
        if isinstance(item, RoiSpec):
            out.append(item)
            continue
        for part in str(item).split(","):
            if not part.strip():
                continue
            name, _, label = part.partition("=")
            if not name.strip():
                raise ValueError(f"--roi {part!r}: empty ROI name")
            out.append(RoiSpec(name.strip(), label.strip() or None))
    if not out:
        raise ValueError("give at least one ROI name (--roi NAME[,NAME...])")
    folded = [r.name.casefold() for r in out]
    dup = sorted({n for n in folded if folded.count(n) > 1})
    if dup:
        raise ValueError(f"ROI named twice: {', '.join(dup)}")
    return out


@dataclass
class DicomCase:
    """One imported patient: the image as medunet reads it, its label map and where they came from."""

    case_id: str
    image: ImageData
    label: np.ndarray  # uint8, image.spatial_shape
    labels: dict[int, str]  # value → class name (background excluded)
    rois: dict[int, str]  # value → ROI name as found in the file
    structure_files: list[str]
    series: SeriesInfo
    modality: str = "CT"
    warnings: list[str] = field(default_factory=list)


def _series_folder(files: list[DicomFile], patient: Path) -> Path:
    folders = sorted({f.path.parent for f in files})
    if len(folders) > 1:
        raise InputError(patient, f"the image series is spread over {len(folders)} folders "
                                  f"({', '.join(str(f) for f in folders[:3])}); put its slices in one folder")
    return folders[0]


def _describe_series(groups: dict[str, list[DicomFile]]) -> str:
    parts = []
    for uid, fs in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:3]:
        parts.append(f"{fs[0].modality} series {uid}: {len(fs)} file(s), e.g. {fs[0].path.name}")
    return "; ".join(parts)


def read_dicom_case(folder: str | os.PathLike, rois: str | Sequence[str | RoiSpec], case_id: str | None = None,
                    files: list[DicomFile] | None = None) -> DicomCase:
    """Read one patient; see :func:`_read_dicom_case`."""
    with quiet_dicom():
        return _read_dicom_case(folder, rois, case_id, files)


def _read_dicom_case(folder: str | os.PathLike, rois: str | Sequence[str | RoiSpec], case_id: str | None,
                     files: list[DicomFile] | None) -> DicomCase:
    """Read one patient: its image series and the requested ROIs from its RTSTRUCT(s) / DICOM SEG(s).

    ``folder`` holds (anywhere below it) exactly one image series and at least one RTSTRUCT or SEG. ROI
    ``i`` of ``rois`` becomes label value ``i`` (1-based); where ROIs overlap the later one wins.

    Raises:
        InputError: one line naming the file and the problem — no or several image series, bad slices
            (missing, duplicated, differently oriented), no structure file, a ROI that is missing (the
            line lists the names present), has no contour or belongs to another scan.
    """
    import pydicom

    folder = Path(folder)
    specs = parse_rois(rois)
    files = scan_dicom(folder) if files is None else files
    if not files:
        raise InputError(folder, "no DICOM files found")
    groups = image_series(files)
    if not groups:
        raise InputError(folder, "no image series (CT/MR slices) found")
    if len(groups) > 1:
        raise InputError(folder, f"{len(groups)} image series mixed ({_describe_series(groups)}); keep one per patient")
    ct_files = next(iter(groups.values()))
    image = read_dicom_series(_series_folder(ct_files, folder), dtype=None)
    info = series_info(image)
    structures = [f for f in files if f.kind in ("rtstruct", "seg")]
    if not structures:
        raise InputError(folder, "no RTSTRUCT or DICOM SEG found (looked at the SOP class / Modality of "
                                 f"{len(files)} DICOM file(s))")

    loaded = []  # (DicomFile, dataset)
    for f in structures:
        if f.kind == "rtstruct":
            try:
                ds = pydicom.dcmread(str(f.path))
            except Exception as e:
                raise InputError(f.path, f"unreadable RTSTRUCT ({type(e).__name__}: {e})") from None
        else:
            from medunet.io.dicom.seg import open_dicom_seg

            ds = open_dicom_seg(f.path)
        loaded.append((f, ds))

    from medunet.io.dicom import rtstruct as rt
    from medunet.io.dicom import seg as dseg

    label = np.zeros(image.spatial_shape, dtype=np.uint8)
    labels, roi_found, used, notes = {}, {}, [], []
    for value, spec in enumerate(specs, start=1):
        hits = []
        for f, ds in loaded:
            hit = rt.find_roi(ds, spec.name) if f.kind == "rtstruct" else dseg.find_segment(ds, spec.name)
            if hit is not None:
                hits.append((f, ds, hit))
        if not hits:
            present = []
            for f, ds in loaded:
                present += rt.roi_names(ds) if f.kind == "rtstruct" else list(dseg.segment_labels(ds).values())
            where = loaded[0][0].path if len(loaded) == 1 else folder
            raise InputError(where, f"no ROI named '{spec.name}'; ROIs present: "
                                    f"{', '.join(repr(n) for n in present) or 'none'}")
        if len(hits) > 1:
            raise InputError(folder, f"ROI '{spec.name}' is in {len(hits)} files "
                                     f"({', '.join(h[0].path.name for h in hits)}); keep one")
        f, ds, hit = hits[0]
        if f.kind == "rtstruct":
            rt.check_rtstruct_references(ds, f.path, info, roi_number=hit[0])
            mask = rt.rasterize_roi(ds, f.path, hit, image)
        else:
            dseg.check_seg_references(ds, f.path, info)
            mask = dseg.segment_mask(ds, f.path, hit, image)
        overlap = int(np.count_nonzero(mask & (label > 0)))
        if overlap:
            notes.append(f"ROI '{hit[1]}' overlaps earlier ROIs in {overlap} voxel(s); it wins there")
        label[mask] = value
        labels[value] = spec.label or hit[1]
        roi_found[value] = hit[1]
        if str(f.path) not in used:
            used.append(str(f.path))
    return DicomCase(case_id=case_id or folder.name, image=image, label=label, labels=labels, rois=roi_found,
                     structure_files=used, series=info, modality=info.modality or "CT", warnings=notes)


@dataclass
class ImportResult:
    """What :func:`import_dicom` did: per case ``"ok"`` or the one-line error."""

    dst: Path
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    dataset_json: Path | None = None


_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def _image_array(image: ImageData) -> np.ndarray:
    """int16 when the (rescaled) values are integers that fit, float32 otherwise."""
    a = np.asarray(image.array)
    if np.issubdtype(a.dtype, np.integer) or np.array_equal(a, np.round(a)):
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if -32768 <= lo and hi <= 32767:
            return a.astype(np.int16)
    return a.astype(np.float32)


def _write_case(case: DicomCase, dst: Path, case_id: str) -> tuple[str, str]:
    """Write the image and label NIfTI of one case, both or neither (two temp files renamed together)."""
    import nibabel as nib

    img_rel, lbl_rel = f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz"
    affine = np.asarray(case.image.affine, dtype=np.float64)

    def nifti(array: np.ndarray):
        img = nib.Nifti1Image(array, affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        img.header.set_xyzt_units("mm")
        return img

    image_nii, label_nii = nifti(_image_array(case.image)), nifti(case.label.astype(np.uint8))
    with contextlib.ExitStack() as stack:
        t_img = stack.enter_context(atomic_path(dst / img_rel))
        t_lbl = stack.enter_context(atomic_path(dst / lbl_rel))
        nib.save(image_nii, str(t_img))
        nib.save(label_nii, str(t_lbl))
    return "./" + img_rel, "./" + lbl_rel


def import_dicom(src: str | os.PathLike, dst: str | os.PathLike, rois: str | Sequence[str | RoiSpec],
                 on_case: Callable[[str, str | None, DicomCase | None], None] | None = None,
                 name: str | None = None) -> ImportResult:
    """Import DICOM-RT patients from ``src`` (one patient folder, or a folder of patient folders; see
    :func:`medunet.io.dicom.files.find_patients`) into the MSD dataset ``dst``.

    Writes ``dst/imagesTr/<case>.nii.gz`` (int16 HU when integral, else float32), ``dst/labelsTr/<case>.nii.gz``
    (uint8; 0 background, ROI ``i`` of ``rois`` = ``i``) with the series' geometry (RAS affine of the
    DICOM LPS geometry), and ``dst/dataset.json`` (ROI names as labels, the series' modality). Cases of an
    earlier import into ``dst`` with the same labels are kept in dataset.json. Each file is written
    atomically; a failing patient is reported through ``on_case(case_id, error_line, None)`` and
    skipped; a good one through ``on_case(case_id, None, case)``.

    Raises:
        InputError: ``src`` holds no DICOM at all, or ``dst`` holds a dataset with other labels.
    """
    specs = parse_rois(rois)
    dst = Path(dst)
    patients = find_patients(src)
    result = ImportResult(dst=dst)
    previous = _previous_dataset(dst)
    entries: dict[str, dict] = {}
    labels: dict[int, str] | None = None
    modality = None
    if previous is not None:
        labels = {int(k): str(v) for k, v in previous.get("labels", {}).items() if int(k) != 0}
        modality = (previous.get("modality") or {}).get("0")
        for item in previous.get("training", []):
            cid = Path(str(item.get("label", ""))).name.removesuffix(".nii.gz")
            if (dst / str(item.get("image", ""))).is_file() and (dst / str(item.get("label", ""))).is_file():
                entries[cid] = {"image": item["image"], "label": item["label"]}
    seen: set[str] = set()
    for case_id, folder, files in patients:
        cid = _SAFE_ID.sub("_", case_id).strip("._") or "case"
        if cid in seen:
            msg = f"{folder}: case id '{cid}' given twice (patient folders need distinct names)"
            result.failed[cid] = msg
            if on_case:
                on_case(cid, msg, None)
            continue
        seen.add(cid)
        try:
            case = read_dicom_case(folder, specs, case_id=cid, files=files)
            if labels is not None and labels != case.labels:
                raise InputError(folder, f"labels {case.labels} differ from those of the dataset in {dst} "
                                         f"({labels}); import into a new folder")
            labels = labels or case.labels
            modality = modality or case.modality
            image_rel, label_rel = _write_case(case, dst, cid)
        except InputError as e:
            result.failed[cid] = str(e)
            if on_case:
                on_case(cid, str(e), None)
            continue
        except (ValueError, OSError, RuntimeError, MemoryError) as e:
            msg = f"{folder}: {' '.join(str(e).split()) or type(e).__name__}"
            result.failed[cid] = msg
            if on_case:
                on_case(cid, msg, None)
            continue
        entries[cid] = {"image": image_rel, "label": label_rel}
        result.ok.append(cid)
        if on_case:
            on_case(cid, None, case)
    if result.ok:
        result.dataset_json = _write_dataset_json(dst, entries, labels or {}, modality or "CT", name, specs)
    return result


def _previous_dataset(dst: Path) -> dict | None:
    path = dst / "dataset.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(path, f"existing dataset.json is unreadable ({e}); import into a new folder") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise InputError(path, "existing dataset.json has no labels; import into a new folder")
    return meta


def _write_dataset_json(dst: Path, entries: dict[str, dict], labels: dict[int, str], modality: str,
                        name: str | None, specs: list[RoiSpec]) -> Path:
    training = [entries[k] for k in sorted(entries)]
    meta = {
        "name": name or dst.name,
        "description": f"imported from DICOM by medunet import-dicom (ROIs: {', '.join(s.name for s in specs)})",
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(k): v for k, v in sorted(labels.items())}},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    return atomic_write_text(dst / "dataset.json", json.dumps(meta, indent=4) + "\n")
