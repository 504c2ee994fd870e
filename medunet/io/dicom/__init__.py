"""DICOM-RT in and DICOM out: CT series + RTSTRUCT / DICOM SEG → MSD dataset (``medunet import-dicom``),
and label maps → DICOM SEG (highdicom) / RTSTRUCT (pydicom) referencing their source series
(``medunet segment --format dicom-seg,rtstruct``).

Geometry is medunet's: images are read by :func:`medunet.io.image.read_dicom_series` (SimpleITK, LPS →
RAS), label maps are ``(X, Y, Z)`` = (DICOM column, row, slice) on that grid.
"""

from medunet.io.dicom.files import DicomFile, find_patients, scan_dicom
from medunet.io.dicom.geometry import SeriesInfo, series_info
from medunet.io.dicom.importer import (
    DicomCase,
    ImportResult,
    RoiSpec,
    import_dicom,
    parse_rois,
    read_dicom_case,
)
from medunet.io.dicom.outputs import OUTPUT_FORMATS, build_dicom_outputs, parse_formats
from medunet.io.dicom.rtstruct import (
    build_rtstruct,
    fill_polygons,
    mask_to_polygons,
    read_rtstruct_labels,
    write_rtstruct,
)
from medunet.io.dicom.seg import (
    build_dicom_seg,
    dicom_seg_for_series,
    nifti_to_dicom_seg,
    read_dicom_seg,
    write_dicom_seg,
)

__all__ = [
    "DicomFile", "scan_dicom", "find_patients", "SeriesInfo", "series_info", "RoiSpec", "parse_rois", "DicomCase",
    "ImportResult", "read_dicom_case", "import_dicom", "build_rtstruct", "write_rtstruct", "read_rtstruct_labels",
    "fill_polygons", "mask_to_polygons", "build_dicom_seg", "write_dicom_seg", "read_dicom_seg",
    "nifti_to_dicom_seg", "dicom_seg_for_series", "OUTPUT_FORMATS", "parse_formats", "build_dicom_outputs",
]
