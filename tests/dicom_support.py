"""Small DICOM objects built in the tests with pydicom / highdicom: a CT series (any orientation), an
RTSTRUCT with given polygons, a DICOM SEG — so the DICOM code is covered without the shared data."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

RTSTRUCT_SOP = "1.2.840.10008.5.1.4.1.1.481.3"


def rotation(z_deg: float = 0.0, x_deg: float = 0.0) -> np.ndarray:
    """Columns: directions (LPS) of the voxel axes i (DICOM column), j (row), k (slice)."""
    a, b = np.deg2rad(z_deg), np.deg2rad(x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ rz


@dataclass
class Series:
    folder: Path
    files: list[Path]  # in slice order k = 0, 1, ...
    study: str
    series: str
    frame_of_reference: str
    sop_instances: list[str]
    lps: np.ndarray  # voxel (i, j, k) → LPS
    shape: tuple[int, int, int]
    datasets: list = field(default_factory=list)

    def to_lps(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        return ijk @ self.lps[:3, :3].T + self.lps[:3, 3]


def ct_volume(shape=(32, 32, 8), seed: int = 0) -> np.ndarray:
    """A body-like int16 CT volume (X, Y, Z) in HU."""
    rng = np.random.default_rng(seed)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    c = (np.asarray(shape) - 1) / 2
    body = np.linalg.norm((idx[..., :2] - c[:2]) / (c[:2] * 0.9), axis=-1) < 1
    vol = np.full(shape, -1000.0)
    vol[body] = 40 + rng.normal(0, 10, int(body.sum()))
    organ = np.linalg.norm((idx - c - [3, 2, 0]) / [6, 5, 3], axis=-1) < 1
    vol[organ] = 150
    return np.round(vol).astype(np.int16)


def write_ct_series(folder: Path, shape=(32, 32, 8), spacing=(0.8, 0.9, 2.5), origin=(-12.0, -15.0, 40.0),
                    direction: np.ndarray | None = None, volume: np.ndarray | None = None, study: str | None = None,
                    series: str | None = None, frame_of_reference: str | None = None, prefix: str = "ct",
                    skip=(), duplicate: int | None = None, tilt: int | None = None, patient: str = "PHANTOM01",
                    name_order: str = "shuffled") -> Series:
    """One CT file per slice, named in shuffled order (readers must sort by position).

    ``skip``: slice indices left out (missing slices); ``duplicate``: a slice written twice (same position,
    new SOP instance); ``tilt``: a slice whose orientation is rotated by 20°.
    """
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    volume = ct_volume(shape) if volume is None else volume
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(spacing, dtype=np.float64)[None, :]
    lps[:3, 3] = origin
    study = study or generate_uid()
    series = series or generate_uid()
    frame_of_reference = frame_of_reference or generate_uid()
    ks = [k for k in range(shape[2]) if k not in skip]
    if duplicate is not None:
        ks.append(duplicate)
    order = np.random.default_rng(7).permutation(len(ks)) if name_order == "shuffled" else np.arange(len(ks))
    files, uids, datasets = [], [], []
    seen = set()
    for n, k in enumerate(ks):
        ds = _ct_slice(volume[:, :, k], lps, k, direction, spacing, study, series, frame_of_reference, patient,
                       tilt=(tilt == k))
        path = folder / f"{prefix}{order[n]:04d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        if k not in seen:
            files.append(path)
            uids.append(str(ds.SOPInstanceUID))
            datasets.append(ds)
            seen.add(k)
    return Series(folder=folder, files=files, study=study, series=series, frame_of_reference=frame_of_reference,
                  sop_instances=uids, lps=lps, shape=tuple(shape), datasets=datasets)


def series_from_nifti(image: Path, folder: Path, **kwargs) -> Series:
    """A NIfTI CT volume (e.g. a phantom) as a CT series in ``folder``: same voxels (rounded to int16 HU)
    and the same geometry, RAS affine turned into DICOM's LPS; ``kwargs`` go to :func:`write_ct_series`."""
    import nibabel as nib

    img = nib.load(str(image))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    volume = np.round(np.asarray(img.dataobj)).astype(np.int16)
    return write_ct_series(folder, shape=volume.shape, spacing=tuple(spacing), origin=tuple(lps[:3, 3]),
                           direction=lps[:3, :3] / spacing, volume=volume, **kwargs)


def _ct_slice(plane: np.ndarray, lps: np.ndarray, k: int, direction, spacing, study, series, frame, patient,
              tilt: bool = False) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName = "Phantom^Test"
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = datetime.date.today().strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    ds.Manufacturer = "medunet-tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    row_dir, col_dir = direction[:, 0], direction[:, 1]
    if tilt:
        row_dir = rotation(20.0) @ row_dir
        col_dir = rotation(20.0) @ col_dir
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, :3] @ [0, 0, k] + lps[:3, 3]]
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (along j), column spacing (along i)
    ds.SliceThickness = f"{spacing[2]:.6f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(plane.shape[1]), int(plane.shape[0])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    ds.PixelData = np.ascontiguousarray(plane.T.astype(np.int16)).tobytes()  # rows = j, columns = i
    return ds


def write_rtstruct(path: Path, series: Series, rois: dict[str, list[tuple[int, np.ndarray]]],
                   frame_of_reference: str | None = None, referenced_series: str | None = None,
                   geometric_type: str = "CLOSED_PLANAR") -> Path:
    """An RTSTRUCT (pydicom) whose ROI ``name`` has contours ``[(slice k, polygon (N, 2) in voxel (i, j))]``,
    written in the given order, as LPS points on slice k of ``series``. An empty list makes a ROI
    without contours."""
    frame = frame_of_reference or series.frame_of_reference
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = RTSTRUCT_SOP
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.PatientName, ds.PatientID = "Phantom^Test", "PHANTOM01"
    ds.StudyInstanceUID = series.study
    ds.SeriesInstanceUID = generate_uid()
    ds.StructureSetLabel = "test"
    ds.StructureSetDate, ds.StructureSetTime = "20240101", "120000"
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = referenced_series or series.series
    series_ref.ContourImageSequence = Sequence([_ref(uid) for uid in series.sop_instances])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_ref.ReferencedSOPInstanceUID = series.study
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])
    ssr, rcs, obs = [], [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        r = Dataset()
        r.ROINumber = number
        r.ReferencedFrameOfReferenceUID = frame
        r.ROIName = name
        r.ROIGenerationAlgorithm = "MANUAL"
        ssr.append(r)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = [255, 0, 0]
        seq = []
        for k, poly in contours:
            poly = np.asarray(poly, dtype=np.float64)
            pts = series.to_lps(np.column_stack([poly, np.full(len(poly), float(k))]))
            c = Dataset()
            c.ContourImageSequence = Sequence([_ref(series.sop_instances[k])])
            c.ContourGeometricType = geometric_type
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [f"{v:.5f}" for v in pts.ravel()]
            seq.append(c)
        if seq:
            rc.ContourSequence = Sequence(seq)
        rcs.append(rc)
        o = Dataset()
        o.ObservationNumber = number
        o.ReferencedROINumber = number
        o.RTROIInterpretedType = "ORGAN"
        o.ROIInterpreter = ""
        obs.append(o)
    ds.StructureSetROISequence = Sequence(ssr)
    ds.ROIContourSequence = Sequence(rcs)
    ds.RTROIObservationsSequence = Sequence(obs)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _ref(uid: str) -> Dataset:
    r = Dataset()
    r.ReferencedSOPClassUID = CTImageStorage
    r.ReferencedSOPInstanceUID = uid
    return r


def square(lo: float, hi: float, lo_j: float | None = None, hi_j: float | None = None, clockwise: bool = False) -> np.ndarray:
    """Axis-aligned square polygon in voxel coordinates (i, j)."""
    lo_j = lo if lo_j is None else lo_j
    hi_j = hi if hi_j is None else hi_j
    pts = np.array([[lo, lo_j], [hi, lo_j], [hi, hi_j], [lo, hi_j]])
    return pts[::-1] if clockwise else pts


def write_seg(path: Path, series: Series, masks: dict[str, np.ndarray], omit_empty_frames: bool = True,
              frame_of_reference: str | None = None) -> Path:
    """A BINARY DICOM SEG (highdicom) with one segment per mask ((X, Y, Z) bool on ``series``' grid)."""
    import warnings

    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(str(f)) for f in series.files]
    if frame_of_reference:
        for s in sources:
            s.FrameOfReferenceUID = frame_of_reference
    stack = np.zeros((len(sources), series.shape[1], series.shape[0], len(masks)), dtype=bool)
    descriptions = []
    for n, (name, mask) in enumerate(masks.items()):
        stack[..., n] = np.transpose(mask, (2, 1, 0))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n + 1, segment_label=name, segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=stack, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="tests", manufacturer_model_name="tests", software_versions="0",
            device_serial_number="0", omit_empty_frames=omit_empty_frames)
        path.parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(str(path))
    return path
