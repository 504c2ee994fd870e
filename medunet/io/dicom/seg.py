"""DICOM SEG in and out, with highdicom.

Reading maps a segment's frames onto the image series by geometry (the SEG volume's affine against the
image's), so a SEG whose frames cover only part of the series, in any order, lands on the right slices;
a SEG that is not on the series' voxel grid is refused. Writing makes a BINARY SEG with one segment
per label, every frame referencing its source slice.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np

from medunet.io.atomic import atomic_path
from medunet.io.dicom.geometry import LPS_TO_RAS, SeriesInfo, lps_affine, quiet_dicom, series_info
from medunet.io.errors import InputError
from medunet.io.image import ImageData

__all__ = [
    "open_dicom_seg", "segment_labels", "find_segment", "check_seg_references", "segment_mask", "build_dicom_seg", "write_dicom_seg",
    "read_dicom_seg", "nifti_to_dicom_seg", "dicom_seg_for_series",
]


_quiet = quiet_dicom


def open_dicom_seg(path: str | os.PathLike):
    """``highdicom.seg.Segmentation`` of a file, or :class:`InputError` naming it."""
    import highdicom as hd

    try:
        with _quiet():
            return hd.seg.segread(str(path))
    except Exception as e:
        raise InputError(path, f"not a readable DICOM SEG ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def segment_labels(seg) -> dict[int, str]:
    """``{segment number: segment label}`` of a SEG."""
    return {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in seg.SegmentSequence}


def find_segment(seg, name: str) -> tuple[int, str] | None:
    want = name.strip().casefold()
    for number, label in segment_labels(seg).items():
        if label.strip().casefold() == want:
            return number, label
    return None


def check_seg_references(seg, path: str | os.PathLike, info: SeriesInfo) -> None:
    """The SEG must share the series' frame of reference and, where it lists source series, include it."""
    ref = str(seg.get("FrameOfReferenceUID", "") or "")
    if ref and ref != info.frame_of_reference:
        raise InputError(path, f"DICOM SEG is in frame of reference {ref}, not the image series' "
                               f"{info.frame_of_reference} (segmentation of another scan)")
    series = [str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", []) if s.get("SeriesInstanceUID")]
    if series and info.series not in series:
        raise InputError(path, f"DICOM SEG references series {', '.join(series)}, not the image series "
                               f"{info.series} (segmentation of another series)")


def _volume_to_image(array: np.ndarray, vol_affine: np.ndarray, image: ImageData, path, what: str) -> np.ndarray:
    """Place a (slice, row, column) array with LPS ``vol_affine`` onto ``image``'s grid; it must lie on
    the image's voxel grid (same spacing and axes, integer offset)."""
    t = np.linalg.inv(lps_affine(image)) @ np.asarray(vol_affine, dtype=np.float64)
    rot, shift = t[:3, :3], t[:3, 3]
    perm = np.round(rot)
    if (not np.allclose(rot, perm, atol=2e-3) or not np.allclose(np.abs(perm).sum(axis=0), 1)
            or not np.allclose(np.abs(perm).sum(axis=1), 1)):
        raise InputError(path, f"{what}: its frames are not on the image series' voxel grid (different spacing "
                               "or orientation)")
    if not np.allclose(shift, np.round(shift), atol=2e-2):
        raise InputError(path, f"{what}: its frames are offset from the image series' voxels by "
                               f"{np.round(shift - np.round(shift), 3).tolist()} voxel(s)")
    out = np.zeros(image.spatial_shape, dtype=bool)
    idx = np.argwhere(array)
    if idx.size == 0:
        return out
    ijk = idx @ perm.astype(np.int64).T + np.round(shift).astype(np.int64)
    shape = np.asarray(image.spatial_shape)
    inside = np.all((ijk >= 0) & (ijk < shape), axis=1)
    if not inside.all():
        raise InputError(path, f"{what}: {int((~inside).sum())} voxel(s) lie outside the image series")
    out[tuple(ijk.T)] = True
    return out


def segment_mask(seg, path: str | os.PathLike, segment: tuple[int, str], image: ImageData) -> np.ndarray:
    """Segment ``(number, label)`` of ``seg`` as a bool mask on ``image``'s exact grid (fractional SEGs
    thresholded at one half).

    Raises:
        InputError: the segment has no frames or no voxels, or is not on the series' grid.
    """
    number, name = segment
    try:
        with _quiet():
            vol = seg.get_volume(segment_numbers=[number], combine_segments=False, rescale_fractional=True)
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        if "no frames" in msg.lower() or "not found" in msg.lower():
            raise InputError(path, f"segment '{name}' has no frames (empty)") from None
        raise InputError(path, f"segment '{name}': cannot build a volume from its frames ({msg})") from None
    array = np.asarray(vol.array)
    if array.ndim == 4:
        array = array[..., 0]
    array = array > 0.5 if np.issubdtype(array.dtype, np.floating) else array > 0
    if not array.any():
        raise InputError(path, f"segment '{name}' is empty (no voxel set)")
    return _volume_to_image(array, vol.affine, image, path, f"segment '{name}'")


# --------------------------------------------------------------------------------------------------
# writing
def _property_codes(name: str):
    from pydicom.sr.codedict import codes

    n = name.casefold()
    known = {"liver": codes.SCT.Liver, "kidney": codes.SCT.Kidney, "spleen": codes.SCT.Spleen}
    for key, code in known.items():
        if key in n:
            return codes.SCT.Organ, code
    if any(k in n for k in ("tumo", "gtv", "lesion", "mass", "neoplas")):
        return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm
    return codes.SCT.Tissue, codes.SCT.Tissue


def _highdicom_numpy2_compat() -> None:
    """Let highdicom 0.22 build a SEG under NumPy 2.

    highdicom 0.22 is the last release for pydicom 2.x (which the MONAI Label environment needs: monailabel
    0.8.5 imports pydicom-seg, which needs pydicom 2), and its ``highdicom.seg.sop`` still names
    ``np.float_``, removed in NumPy 2 (0.23 says ``np.float64``). That one module gets a view of numpy with
    the old alias; numpy itself and every other module are left as they are. No-op on other versions.
    """
    import highdicom
    import highdicom.seg.sop as sop

    release = tuple(int(p) if p.isdigit() else 0 for p in highdicom.__version__.split(".")[:2])
    if release >= (0, 23) or hasattr(sop.np, "float_"):
        return
    view = types.ModuleType("numpy")
    view.__getattr__ = lambda name: getattr(np, name)  # everything else is numpy's own
    view.float_ = np.float64
    sop.np = view


def build_dicom_seg(label: np.ndarray, image: ImageData, label_names: dict[int, str], info: SeriesInfo | None = None,
                    series_description: str = "medunet segmentation", series_number: int = 9001):
    """A BINARY DICOM SEG (``highdicom.seg.Segmentation``) of ``label`` on ``image``'s grid: one segment per
    entry of ``label_names`` (value → name; background excluded), segment number = label value. Every
    slice is a frame (empty ones too), referencing the source slice's SOP instance."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medunet import __version__

    label = np.asarray(label)
    if tuple(label.shape) != image.spatial_shape:
        raise ValueError(f"label shape {label.shape} does not match the image {image.spatial_shape}")
    info = info or series_info(image)
    names = {int(v): str(n) for v, n in label_names.items() if int(v) != 0}
    if sorted(names) != list(range(1, len(names) + 1)):
        raise ValueError(f"DICOM SEG needs label values 1…N, got {sorted(names)}")
    extra = sorted(set(np.unique(label).tolist()) - set(names) - {0})
    if extra:
        raise ValueError(f"label values {extra} have no name")
    algorithm = hd.AlgorithmIdentificationSequence(name="medunet", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, name in sorted(names.items()):
        category, kind = _property_codes(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    frames = np.ascontiguousarray(np.transpose(label, (2, 1, 0))).astype(np.uint8)  # (slice, row, column)
    _highdicom_numpy2_compat()
    with _quiet():
        return hd.seg.Segmentation(
            source_images=info.datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medunet", manufacturer_model_name="medunet",
            software_versions=__version__, device_serial_number="0", series_description=series_description,
            omit_empty_frames=False,
        )


def write_dicom_seg(label: np.ndarray, image: ImageData, path: str | os.PathLike, label_names: dict[int, str],
                    overwrite: bool = True, dataset=None) -> Path:
    """Write :func:`build_dicom_seg`'s SEG (or ``dataset``, built earlier) atomically."""
    seg = dataset if dataset is not None else build_dicom_seg(label, image, label_names)
    with atomic_path(path, overwrite=overwrite) as tmp, _quiet():
        seg.save_as(str(tmp))
    return Path(path)


def read_dicom_seg(path: str | os.PathLike, image: ImageData | None = None) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Read a DICOM SEG back as a label map.

    With ``image`` (the source series as medunet reads it), the label is on that grid (what
    ``medunet segment`` wrote as NIfTI) and the affine is the image's. Without it, the grid is the SEG's
    own volume, in medunet's axis order (column, row, slice) with a RAS affine. Where segments overlap
    the higher number wins.

    Returns:
        ``(uint8 label, 4×4 RAS affine, {segment number: label})``.
    """
    seg = open_dicom_seg(path)
    names = segment_labels(seg)
    if image is not None:
        check_seg_references(seg, path, series_info(image))
        label = np.zeros(image.spatial_shape, dtype=np.uint8)
        for number, name in sorted(names.items()):
            try:
                label[segment_mask(seg, path, (number, name), image)] = number
            except InputError as e:
                if "empty" not in e.reason and "no frames" not in e.reason:
                    raise
        return label, np.asarray(image.affine, dtype=np.float64), names
    with _quiet():
        vol = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
    array = np.transpose(np.asarray(vol.array), (2, 1, 0)).astype(np.uint8)  # (slice,row,col) → (col,row,slice)
    affine = np.asarray(vol.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    # slices ascending along the normal (column × row direction), as medunet's series reader orders them
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    if array.shape[2] > 1 and float(affine[:3, 2] @ normal) < 0:
        affine[:3, 3] += (array.shape[2] - 1) * affine[:3, 2]
        affine[:3, 2] = -affine[:3, 2]
        array = np.ascontiguousarray(array[:, :, ::-1])
    return array, LPS_TO_RAS @ affine, names


def dicom_seg_for_series(label: np.ndarray, series_dir: str | os.PathLike, label_names: dict[int, str],
                         out_path: str | os.PathLike, label_affine: np.ndarray | None = None,
                         overwrite: bool = True) -> Path:
    """Write a DICOM SEG of ``label`` (an ``(X, Y, Z)`` array in the grid medunet reads ``series_dir`` in)
    for the DICOM series in ``series_dir``. With ``label_affine`` (RAS) the grid is checked first."""
    from medunet.io.image import read_dicom_series

    image = read_dicom_series(series_dir, dtype=None)
    if tuple(np.asarray(label).shape) != image.spatial_shape:
        raise InputError(series_dir, f"label shape {tuple(np.asarray(label).shape)} is not the series' "
                                     f"{image.spatial_shape}")
    if label_affine is not None and not np.allclose(label_affine, image.affine, atol=1e-3):
        raise InputError(series_dir, "label geometry (affine) differs from the series'")
    return write_dicom_seg(np.asarray(label), image, out_path, label_names, overwrite=overwrite)


def nifti_to_dicom_seg(label_path: str | os.PathLike, series_dir: str | os.PathLike, out_path: str | os.PathLike,
                       label_names: dict[int, str] | dict[str, int], overwrite: bool = True) -> Path:
    """The DICOM SEG that ``medunet segment --format dicom-seg`` writes, from a NIfTI label already made for
    the series (e.g. a MONAI Label infer result): ``label_names`` as ``{value: name}`` or a plan's
    ``{name: value}``. The label must be on the series' grid (shape and affine), as medunet writes it."""
    from medunet.io.image import read_nifti

    lab = read_nifti(label_path, dtype=None)
    names = {int(v): str(k) for k, v in label_names.items()} if all(isinstance(v, int) for v in label_names.values()) \
        else {int(k): str(v) for k, v in label_names.items()}
    values = np.asarray(lab.array)
    if not np.allclose(values, np.round(values)):
        raise InputError(label_path, "label has non-integer values")
    return dicom_seg_for_series(values.astype(np.uint8), series_dir, names, out_path, label_affine=lab.affine,
                                overwrite=overwrite)
