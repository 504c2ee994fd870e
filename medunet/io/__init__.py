"""I/O: NIfTI, DICOM series and 2D images with exact geometry; atomic writes; one-line input errors."""

from medunet.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from medunet.io.checkpoint import extract_state_dict, load_checkpoint, load_weights, save_checkpoint
from medunet.io.errors import InputError
from medunet.io.image import (
    IMAGE2D_SUFFIXES,
    NIFTI_SUFFIXES,
    ImageData,
    image_id,
    is_2d_image,
    is_dicom_file,
    is_nifti,
    read_2d_image,
    read_dicom_series,
    read_image,
    read_nifti,
    read_nifti_header,
    validate_affine,
    write_like,
    write_maps_like,
    write_nifti,
)

__all__ = [
    "InputError", "ImageData", "read_image", "read_nifti", "read_nifti_header", "read_dicom_series", "read_2d_image",
    "write_nifti", "write_like", "validate_affine", "atomic_path", "atomic_write_bytes",
    "atomic_write_text", "save_checkpoint", "load_checkpoint", "load_weights", "extract_state_dict", "is_nifti", "is_2d_image", "is_dicom_file", "write_maps_like", "image_id", "NIFTI_SUFFIXES", "IMAGE2D_SUFFIXES",
]
