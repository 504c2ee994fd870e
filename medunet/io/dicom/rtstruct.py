"""RTSTRUCT in and out, on pydicom.

Reading: a ROI's CLOSED_PLANAR contours are mapped from LPS patient coordinates through the inverse of
the image's affine, matched to a slice by their position along the slice normal (never by the
referenced SOP instance, which exports often rewrite) and filled with the even-odd rule over all
contours of a slice: several contours per slice, holes drawn as inner contours, contours in any order.
A voxel belongs to the ROI when its centre is inside.

Writing: each label's slice is traced at the 0.5 level of the binary mask (marching squares,
``contourpy``) into closed polygons between voxel centres; filling them again with the even-odd rule
gives back exactly the same voxels.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from medunet.io.atomic import atomic_path
from medunet.io.dicom.geometry import SeriesInfo, lps_to_voxel, quiet_dicom, series_info, voxel_to_lps
from medunet.io.errors import InputError
from medunet.io.image import ImageData

__all__ = [
    "roi_names", "find_roi", "check_rtstruct_references", "rasterize_roi", "fill_polygons", "mask_to_polygons",
    "build_rtstruct", "write_rtstruct", "read_rtstruct_labels", "SLICE_TOLERANCE",
]

#: How far (in slices) a contour may lie from the nearest slice plane.
SLICE_TOLERANCE = 0.2
_STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # the RTReferencedStudy's (retired) SOP class
_RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_COLORS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (0, 200, 255), (255, 0, 255), (128, 64, 0),
           (0, 128, 128), (128, 0, 128), (128, 128, 0)]


# --------------------------------------------------------------------------------------------------
# reading
def roi_names(ds) -> list[str]:
    """The ROI names of an RTSTRUCT dataset, in file order."""
    return [str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])]


def find_roi(ds, name: str) -> tuple[int, str] | None:
    """``(ROINumber, ROIName)`` of the ROI called ``name`` (case-insensitive, surrounding blanks ignored)."""
    want = name.strip().casefold()
    for r in ds.get("StructureSetROISequence", []):
        if str(r.get("ROIName", "")).strip().casefold() == want:
            return int(r.ROINumber), str(r.ROIName)
    return None


def check_rtstruct_references(ds, path: str | os.PathLike, info: SeriesInfo, roi_number: int | None = None) -> None:
    """The RTSTRUCT (or one of its ROIs) must be drawn in the CT's frame of reference and, where it names
    the series it was drawn on, on the CT's series.

    Raises:
        InputError: naming the RTSTRUCT file and both UIDs.
    """
    roi_frames = []
    for r in ds.get("StructureSetROISequence", []):
        if roi_number is not None and int(r.ROINumber) != roi_number:
            continue
        ref = str(r.get("ReferencedFrameOfReferenceUID", "") or "")
        roi_frames.append(ref)
        if ref and ref != info.frame_of_reference:
            raise InputError(path, f"ROI '{r.get('ROIName', '')}' is in frame of reference {ref}, not the image "
                                   f"series' {info.frame_of_reference} (RTSTRUCT of another scan)")
    frames = [str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence", [])]
    if not any(roi_frames) and frames and info.frame_of_reference not in frames:
        raise InputError(path, f"references frame of reference {', '.join(frames)}, not the image series' "
                               f"{info.frame_of_reference} (RTSTRUCT of another scan)")
    series = []
    for f in ds.get("ReferencedFrameOfReferenceSequence", []):
        for st in f.get("RTReferencedStudySequence", []):
            for se in st.get("RTReferencedSeriesSequence", []):
                if se.get("SeriesInstanceUID"):
                    series.append(str(se.SeriesInstanceUID))
    if series and info.series not in series:
        raise InputError(path, f"drawn on series {', '.join(sorted(set(series)))}, not the image series "
                               f"{info.series} (RTSTRUCT of another series)")


def fill_polygons(polygons, shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of closed polygons given in voxel coordinates ``(i, j)``: a voxel ``(i, j)`` is set
    when a ray from its centre towards +i crosses the polygons' edges an odd number of times.

    Several polygons on one slice combine with the same rule, so an inner contour is a hole and two
    disjoint contours are two islands, whatever their order or winding.

    Returns:
        bool array of ``shape`` ``(nx, ny)``.
    """
    nx, ny = int(shape[0]), int(shape[1])
    toggles = np.zeros((ny, nx + 1), dtype=np.int32)
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64)[:, :2]
        if len(p) > 1 and np.allclose(p[0], p[-1]):
            p = p[:-1]  # explicitly closed polygon
        if len(p) < 3:
            continue
        q = np.roll(p, -1, axis=0)
        x0, y0, x1, y1 = p[:, 0], p[:, 1], q[:, 0], q[:, 1]
        # an edge crosses row j when min(y0, y1) <= j < max(y0, y1) (half open: a vertex counts once)
        lo = np.clip(np.ceil(np.minimum(y0, y1)), 0, ny).astype(np.int64)
        hi = np.clip(np.ceil(np.maximum(y0, y1)), 0, ny).astype(np.int64)
        n = np.maximum(hi - lo, 0)
        if not n.any():
            continue
        edge = np.repeat(np.arange(len(p)), n)
        rows = lo[edge] + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
        t = (rows - y0[edge]) / (y1[edge] - y0[edge])
        xs = x0[edge] + t * (x1[edge] - x0[edge])
        cut = np.clip(np.ceil(xs), 0, nx).astype(np.int64)  # voxels i < xs lie left of the crossing
        np.add.at(toggles, (rows, np.zeros_like(rows)), 1)
        np.add.at(toggles, (rows, cut), 1)
    inside = (np.cumsum(toggles[:, :nx], axis=1) % 2).astype(bool)  # (ny, nx)
    return np.ascontiguousarray(inside.T)


def _roi_contours(ds, roi_number: int):
    for item in ds.get("ROIContourSequence", []):
        if int(item.get("ReferencedROINumber", -1)) == roi_number:
            return item
    return None


def rasterize_roi(ds, path: str | os.PathLike, roi: tuple[int, str], image: ImageData) -> np.ndarray:
    """The ROI ``(number, name)`` of RTSTRUCT ``ds`` as a bool mask in ``image``'s exact voxel grid.

    Raises:
        InputError: the ROI has no closed contour, a contour is not in a slice plane (orientation differs
            from the image's), lies between slices or outside the series.
    """
    number, name = roi
    item = _roi_contours(ds, number)
    contours = list(item.get("ContourSequence", [])) if item is not None else []
    closed = [c for c in contours if str(c.get("ContourGeometricType", "CLOSED_PLANAR")).upper() == "CLOSED_PLANAR"]
    if not closed:
        kinds = sorted({str(c.get("ContourGeometricType", "")) for c in contours})
        extra = f" (only {', '.join(kinds)} contours)" if kinds else ""
        raise InputError(path, f"ROI '{name}' has no contour{extra}")
    nx, ny, nz = image.spatial_shape
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    normal = lps[:3, 2] / np.linalg.norm(lps[:3, 2])
    per_slice: dict[int, list[np.ndarray]] = {}
    for c in closed:
        data = np.asarray([float(v) for v in c.get("ContourData", [])], dtype=np.float64)
        if data.size < 9 or data.size % 3:
            raise InputError(path, f"ROI '{name}': a contour has {data.size} coordinates (need 3 per point, >= 3 points)")
        pts = data.reshape(-1, 3)
        v = lps_to_voxel(image, pts)
        k = v[:, 2]
        where = float(pts[0] @ normal)
        if np.ptp(k) > 2 * SLICE_TOLERANCE:
            raise InputError(path, f"ROI '{name}': the contour at {where:.2f} mm spans slices {k.min():.2f}…{k.max():.2f}: "
                                   "not in the image's slice planes (orientation differs from the image's)")
        kk = int(np.round(np.median(k)))
        if np.max(np.abs(k - kk)) > SLICE_TOLERANCE:
            raise InputError(path, f"ROI '{name}': contour at {where:.2f} mm along the slice normal lies between "
                                   f"slices {int(np.floor(k.mean()))} and {int(np.floor(k.mean())) + 1}")
        if not 0 <= kk < nz:
            first, last = float(lps[:3, 3] @ normal), float((lps[:3, 3] + (nz - 1) * lps[:3, 2]) @ normal)
            raise InputError(path, f"ROI '{name}': contour at {where:.2f} mm lies outside the series (slices from "
                                   f"{min(first, last):.2f} to {max(first, last):.2f} mm)")
        per_slice.setdefault(kk, []).append(v[:, :2])
    mask = np.zeros((nx, ny, nz), dtype=bool)
    for kk, polys in per_slice.items():
        mask[:, :, kk] = fill_polygons(polys, (nx, ny))
    if not mask.any():
        raise InputError(path, f"ROI '{name}': its {len(closed)} contour(s) enclose no voxel centre")
    return mask


def read_rtstruct_labels(path: str | os.PathLike, image: ImageData, names: list[str] | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Read an RTSTRUCT back into a label map on ``image``'s grid: ROI ``names`` (default: all, in file
    order) get values 1, 2, …; where they overlap the later one wins.

    Returns:
        ``(uint8 label (X, Y, Z), {value: ROI name})``.
    """
    import pydicom

    with quiet_dicom():
        ds = pydicom.dcmread(str(path))
        check_rtstruct_references(ds, path, series_info(image))
        names = roi_names(ds) if names is None else list(names)
        label = np.zeros(image.spatial_shape, dtype=np.uint8)
        out: dict[int, str] = {}
        for value, n in enumerate(names, start=1):
            roi = find_roi(ds, n)
            if roi is None:
                raise InputError(path, f"no ROI named '{n}'; ROIs present: {', '.join(roi_names(ds)) or 'none'}")
            label[rasterize_roi(ds, path, roi, image)] = value
            out[value] = roi[1]
    return label, out


# --------------------------------------------------------------------------------------------------
# writing
def _simplify(points: np.ndarray) -> np.ndarray:
    """Drop vertices on a straight line between their neighbours (closed polygon)."""
    if len(points) < 4:
        return points
    prev, nxt = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    a, b = points - prev, nxt - points
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    keep = np.abs(cross) > 1e-9
    return points[keep] if keep.sum() >= 3 else points


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons ``(N, 2)`` in voxel coordinates ``(i, j)`` whose even-odd fill is exactly ``mask``
    (a 2D bool array ``(nx, ny)``): the 0.5 iso-line of the mask, through the midpoints between voxel
    centres, outer boundaries and holes alike."""
    import contourpy

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    z = np.pad(mask.astype(np.float64), 1)  # zero border: every line closes
    gen = contourpy.contour_generator(z=z, line_type=contourpy.LineType.Separate, corner_mask=False)
    polygons = []
    for line in gen.lines(0.5):
        pts = np.column_stack([line[:, 1] - 1.0, line[:, 0] - 1.0])  # contourpy (x=col, y=row) → (i, j)
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]
        pts = _simplify(pts)
        if len(pts) >= 3:
            polygons.append(pts)
    return polygons


def _interpreted_type(name: str) -> str:
    n = name.casefold()
    if "gtv" in n or "tumo" in n or "lesion" in n:
        return "GTV"
    if "external" in n or n == "body":
        return "EXTERNAL"
    return "ORGAN"


def _contour_data(points: np.ndarray):
    """ContourData (3006,0050) as a ready-encoded DS element: pydicom's per-value validation of a
    multi-valued DS costs ~20 µs a number, minutes for the contours of a large noisy label."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    value = "\\".join(f"{v:.4f}" for v in np.asarray(points, dtype=np.float64).ravel()).encode("ascii")
    if len(value) % 2:
        value += b" "
    return RawDataElement(Tag(0x30060050), "DS", len(value), value, 0, True, True)


def build_rtstruct(label: np.ndarray, image: ImageData, label_names: dict[int, str], info: SeriesInfo | None = None,
                   series_description: str = "medunet segmentation", series_number: int = 9002):
    """An RTSTRUCT dataset (pydicom) for ``label`` on ``image``'s grid; see :func:`_build_rtstruct`."""
    with quiet_dicom():
        return _build_rtstruct(label, image, label_names, info, series_description, series_number)


def _build_rtstruct(label: np.ndarray, image: ImageData, label_names: dict[int, str], info: SeriesInfo | None,
                    series_description: str, series_number: int):
    """An RTSTRUCT dataset (pydicom) for ``label`` (``image``'s grid): one ROI per entry of ``label_names``
    (value → name, background excluded), with the label's value as ROINumber. It references the
    source study, series, frame of reference and, per contour, the slice's SOP instance."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    from medunet import __version__

    label = np.asarray(label)
    if tuple(label.shape) != image.spatial_shape:
        raise ValueError(f"label shape {label.shape} does not match the image {image.spatial_shape}")
    info = info or series_info(image)
    src = info.datasets[0]
    now = datetime.datetime.now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _RTSTRUCT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    # implicit VR: a long contour's ContourData may exceed explicit VR's 64 KiB limit for DS values
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if "SpecificCharacterSet" in src:
        ds.SpecificCharacterSet = src.SpecificCharacterSet
    ds.SOPClassUID = _RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription"):
        setattr(ds, key, src.get(key, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.Manufacturer = "medunet"
    ds.ManufacturerModelName = "medunet"
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = info.frame_of_reference
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel = "medunet"
    ds.StructureSetName = "medunet"
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime

    def image_ref(k: int) -> Dataset:
        r = Dataset()
        r.ReferencedSOPClassUID = info.sop_class
        r.ReferencedSOPInstanceUID = info.sop_instances[k]
        return r

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = info.series
    series_ref.ContourImageSequence = Sequence([image_ref(k) for k in range(len(info.sop_instances))])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_COMPONENT_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = info.study
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = info.frame_of_reference
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])
    top_study = Dataset()
    top_study.ReferencedSOPClassUID = _STUDY_COMPONENT_SOP_CLASS
    top_study.ReferencedSOPInstanceUID = info.study
    ds.ReferencedStudySequence = Sequence([top_study])

    rois, contours, observations = [], [], []
    for n, (value, name) in enumerate(sorted(label_names.items())):
        value = int(value)
        if value == 0:
            continue
        roi = Dataset()
        roi.ROINumber = value
        roi.ReferencedFrameOfReferenceUID = info.frame_of_reference
        roi.ROIName = str(name)
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = value
        rc.ROIDisplayColor = list(_COLORS[n % len(_COLORS)])
        seq = []
        mask = label == value
        for k in np.flatnonzero(mask.any(axis=(0, 1))):
            for poly in mask_to_polygons(mask[:, :, k]):
                ijk = np.column_stack([poly, np.full(len(poly), float(k))])
                pts = voxel_to_lps(image, ijk)
                c = Dataset()
                c.ContourImageSequence = Sequence([image_ref(int(k))])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(pts)
                c[0x30060050] = _contour_data(pts)
                seq.append(c)
        if seq:
            rc.ContourSequence = Sequence(seq)
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber = value
        obs.ReferencedROINumber = value
        obs.RTROIInterpretedType = _interpreted_type(str(name))
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def write_rtstruct(label: np.ndarray, image: ImageData, path: str | os.PathLike, label_names: dict[int, str],
                   overwrite: bool = True, dataset=None) -> Path:
    """Write :func:`build_rtstruct`'s dataset (or ``dataset``, built earlier) atomically."""
    ds = dataset if dataset is not None else build_rtstruct(label, image, label_names)
    with atomic_path(path, overwrite=overwrite) as tmp, quiet_dicom():
        ds.save_as(str(tmp), enforce_file_format=True)
    return Path(path)
