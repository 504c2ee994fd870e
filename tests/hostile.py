"""Generators of hostile inputs: the files a PACS export, a careless copy or a full disk hand us.

Every generator writes ONE bad input into a folder and returns a :class:`Case` that says where it is,
which file the error must name, what the error must talk about (a regular expression), and which
commands it applies to. The reliability tests feed each case to ``read_image``, ``medunet segment``,
``medunet check-dataset``, ``medunet plan`` and bundle training.

Generators take ``(image_path, label_path)``: the final names the bad image and its label get (so a
case can be dropped into an MSD-layout dataset as ``imagesTr/<id>.nii.gz`` + ``labelsTr/<id>.nii.gz``).
A case whose problem is in the label writes a good image, and vice versa. Nothing here writes more
than a few hundred kilobytes; "huge" volumes only *claim* a huge shape in their header.

Usage::

    from tests.hostile import IMAGE_CASES, make_case
    case = make_case("corrupt_gzip", tmp_path / "imagesTr" / "bad_001.nii.gz",
                     tmp_path / "labelsTr" / "bad_001.nii.gz")
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "Case", "CASES", "IMAGE_CASES", "LABEL_CASES", "CHECKPOINT_CASES", "FOLDER_CASES", "make_case",
    "write_good_image", "write_good_label", "good_affine", "write_dicom_series", "is_root",
    "GOOD_SHAPE", "case_names", "VOXEL_CASES", "CONVERTER_CASES",
]

GOOD_SHAPE = (24, 20, 16)
GOOD_SPACING = (1.5, 1.25, 2.0)

#: commands a case can be fed to
READ, SEGMENT, CHECK, PLAN, TRAIN, LOAD = "read", "segment", "check", "plan", "train", "load"


@dataclass
class Case:
    """One hostile input.

    Attributes:
        name: generator name (``corrupt_gzip``...).
        path: what is handed to the command (file or folder).
        culprit: the path the error line must name (usually ``path``; the label for label cases).
        reason: regular expression (case-insensitive) the error must match — the *problem*.
        applies: commands this case is meaningful for (see ``READ``, ``SEGMENT``...).
        outcome: ``"error"`` (must be refused), ``"either"`` (a clear refusal, or a correct result
            with the input's exact geometry — e.g. an all-constant image may legitimately be segmented)
            or ``"ok"`` (what converters really write: must be segmented in its exact geometry).
        label: the label written beside it (good or bad), if any.
        unprivileged: the case only bites for a non-root user (permission bits); tests running as
            root must run the command as ``nobody`` or skip.
        marker: for the malicious pickle, the file that appears if anything unpickles it.
        extra: free-form details a test may need (e.g. the claimed shape).
    """

    name: str
    path: Path
    culprit: Path
    reason: str
    applies: frozenset[str]
    outcome: str = "error"
    label: Path | None = None
    unprivileged: bool = False
    marker: Path | None = None
    extra: dict = field(default_factory=dict)

    def matches(self, message: str, pair: bool = False) -> bool:
        """True when ``message`` names the culprit and the problem.

        The culprit counts as named by its full path or by ``<folder>/<file>`` (images and labels share
        file names in MSD datasets, so the bare file name is not enough).
        """
        paths = [self.culprit] + ([self.path, self.label] if pair and self.label is not None else [])
        names = {n for p in paths for n in (str(p), f"{p.parent.name}/{p.name}")}
        named = any(n in message for n in names)
        return named and re.search(self.reason, message, flags=re.IGNORECASE) is not None


# --------------------------------------------------------------------------------------------------
# good data (the background every bad case is made from)
def good_affine(spacing=GOOD_SPACING, origin=(-20.0, 12.0, 5.0)) -> np.ndarray:
    """A RAS affine with the given spacing (diagonal, positive)."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = origin
    return aff


def _phantom(shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32, CT-like HU) and label (uint8, 0/1/2) of a sphere with a core, plus noise."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    label = np.zeros(shape, np.uint8)
    label[r < 0.6] = 1
    label[r < 0.3] = 2
    image = np.where(label == 2, 180.0, np.where(label == 1, 60.0, -100.0)).astype(np.float32)
    image += rng.normal(0, 10, size=shape).astype(np.float32)
    return image, label


def write_good_image(path: Path, shape=GOOD_SHAPE, affine=None, seed: int = 0, dtype=np.int16) -> Path:
    """A valid CT-like NIfTI (sform and qform code 1)."""
    image, _ = _phantom(shape, seed)
    return _save(np.round(image).astype(dtype), good_affine() if affine is None else affine, path)


def write_good_label(path: Path, shape=GOOD_SHAPE, affine=None, seed: int = 0) -> Path:
    """The valid label matching :func:`write_good_image` (values 0, 1, 2)."""
    _, label = _phantom(shape, seed)
    return _save(label, good_affine() if affine is None else affine, path)


def _save(array: np.ndarray, affine: np.ndarray, path: Path, sform_code: int = 1, qform_code: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    nib.save(img, str(path))
    return path


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Uncompressed single-file NIfTI-1 bytes (header + data) for hand-made corruptions."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img.to_bytes()


def _label_beside(label_path: Path | None, seed: int = 0) -> Path | None:
    return None if label_path is None else write_good_label(label_path, seed=seed)


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------------------------------
# registry
CASES: dict[str, Callable[..., Case]] = {}
IMAGE_CASES: list[str] = []       # bad image file/folder, given to segment / read / datasets
LABEL_CASES: list[str] = []       # good image, bad label (datasets only)
CHECKPOINT_CASES: list[str] = []  # bad --checkpoint
FOLDER_CASES: list[str] = []      # the input/dataset folder itself is bad
VOXEL_CASES: list[str] = []       # voxel data that is no image (complex, colour, unsupported type, no voxels)
CONVERTER_CASES: list[str] = []   # unusual but valid files hospital converters write: must be segmented

_IMG = frozenset({READ, SEGMENT, CHECK, PLAN, TRAIN})
#: valid files for the reader (it returns them as they are); the commands that expect one 3D channel judge them
READER_ACCEPTS = frozenset({"volume_4d", "volume_2d", "wrong_channel_count", "tiny_volume"})
_LBL = frozenset({CHECK, PLAN, TRAIN})


def _register(group: list[str]):
    def deco(fn):
        CASES[fn.__name__] = fn
        group.append(fn.__name__)
        return fn
    return deco


def make_case(name: str, image_path: Path, label_path: Path | None = None, **kwargs) -> Case:
    """Write case ``name`` at ``image_path`` (and ``label_path``) and describe it."""
    return CASES[name](Path(image_path), None if label_path is None else Path(label_path), **kwargs)


def image_id_of(path: Path) -> str:
    """``case.nii.gz`` → ``case`` (what output names are built from)."""
    from medunet.io import image_id

    return image_id(path)


def case_names() -> list[str]:
    return list(CASES)


# --------------------------------------------------------------------------------------------------
# bad image files
@_register(IMAGE_CASES)
def corrupt_gzip(img: Path, lbl: Path | None) -> Case:
    """A .nii.gz whose deflate stream is damaged in the middle (valid gzip magic)."""
    write_good_image(img)
    data = bytearray(img.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes((b ^ 0x5A) for b in data[mid:mid + 64])
    img.write_bytes(bytes(data))
    return Case("corrupt_gzip", img, img, r"gzip|corrupt|truncat|crc|invalid|decompress", _IMG,
                label=_label_beside(lbl))


@_register(IMAGE_CASES)
def truncated_nifti_gz(img: Path, lbl: Path | None) -> Case:
    """A .nii.gz cut to 60 % of its length (an interrupted copy)."""
    write_good_image(img)
    data = img.read_bytes()
    img.write_bytes(data[: int(len(data) * 0.6)])
    return Case("truncated_nifti_gz", img, img, r"truncat|corrupt|end of|eof|incomplete|gzip", _IMG,
                label=_label_beside(lbl))


@_register(IMAGE_CASES)
def truncated_nifti(img: Path, lbl: Path | None) -> Case:
    """An uncompressed .nii whose voxel data stops half-way."""
    img = img.with_name(img.name.replace(".nii.gz", ".nii"))
    img.parent.mkdir(parents=True, exist_ok=True)
    image, _ = _phantom(GOOD_SHAPE)
    data = _nifti_bytes(image.astype(np.int16), good_affine())
    img.write_bytes(data[: 352 + (len(data) - 352) // 2])
    return Case("truncated_nifti", img, img, r"truncat|corrupt|too short|size|mmap|incomplete|end of|eof", _IMG,
                label=_label_beside(lbl))


@_register(IMAGE_CASES)
def zero_byte(img: Path, lbl: Path | None) -> Case:
    img.parent.mkdir(parents=True, exist_ok=True)
    img.write_bytes(b"")
    return Case("zero_byte", img, img, r"empty|0 bytes|zero", _IMG, label=_label_beside(lbl))


@_register(IMAGE_CASES)
def header_only(img: Path, lbl: Path | None) -> Case:
    """A .nii.gz holding a valid header and not a single voxel."""
    img.parent.mkdir(parents=True, exist_ok=True)
    image, _ = _phantom(GOOD_SHAPE)
    img.write_bytes(gzip.compress(_nifti_bytes(image.astype(np.int16), good_affine())[:352]))
    return Case("header_only", img, img, r"truncat|corrupt|end of|eof|incomplete|voxel data|size", _IMG,
                label=_label_beside(lbl))


@_register(IMAGE_CASES)
def gzip_named_nii(img: Path, lbl: Path | None) -> Case:
    """Wrong extension: gzip-compressed NIfTI content saved as ``.nii``."""
    good = write_good_image(img)
    bad = img.with_name(img.name.replace(".nii.gz", ".nii"))
    good.rename(bad)
    return Case("gzip_named_nii", bad, bad, r"gzip|extension|not a (readable )?nifti|header|compress|sizeof", _IMG,
                label=_label_beside(lbl))


@_register(IMAGE_CASES)
def text_named_nii_gz(img: Path, lbl: Path | None) -> Case:
    """Wrong extension: a CSV export named ``.nii.gz``."""
    img.parent.mkdir(parents=True, exist_ok=True)
    img.write_text("PatientID,StudyDate\n123,20240101\n" * 20)
    return Case("text_named_nii_gz", img, img, r"gzip|not a (readable )?nifti|extension|compress|header", _IMG,
                label=_label_beside(lbl))


@_register(IMAGE_CASES)
def png_named_nii_gz(img: Path, lbl: Path | None) -> Case:
    from PIL import Image

    img.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    Image.fromarray(arr).save(img, format="PNG")
    return Case("png_named_nii_gz", img, img, r"png|not (a )?nifti|extension|gzip", _IMG, label=_label_beside(lbl))


@_register(IMAGE_CASES)
def volume_4d(img: Path, lbl: Path | None) -> Case:
    """A 4D time series (X, Y, Z, T=5) where one 3D volume is expected."""
    image, _ = _phantom(GOOD_SHAPE)
    data = np.stack([image + t for t in range(5)], axis=-1).astype(np.int16)
    _save(data, good_affine(), img)
    return Case("volume_4d", img, img, r"4d|4-d|dimension|channel|shape|ndim|\b5\b", _IMG - {READ}, label=_label_beside(lbl))


@_register(IMAGE_CASES)
def volume_2d(img: Path, lbl: Path | None) -> Case:
    """A single 2D slice stored as NIfTI where a 3D volume is expected."""
    image, _ = _phantom(GOOD_SHAPE)
    _save(image[:, :, 8].astype(np.int16), good_affine(), img)
    return Case("volume_2d", img, img, r"2d|2-d|dimension|3d|shape|ndim|slice", _IMG - {READ}, label=_label_beside(lbl))


@_register(IMAGE_CASES)
def nan_voxels(img: Path, lbl: Path | None) -> Case:
    image, _ = _phantom(GOOD_SHAPE)
    image[3:6, 4:7, 5] = np.nan
    _save(image.astype(np.float32), good_affine(), img)
    return Case("nan_voxels", img, img, r"nan|not finite|non-finite", _IMG, label=_label_beside(lbl))


@_register(IMAGE_CASES)
def inf_voxels(img: Path, lbl: Path | None) -> Case:
    image, _ = _phantom(GOOD_SHAPE)
    image[0, 0, 0] = np.inf
    image[1, 0, 0] = -np.inf
    _save(image.astype(np.float32), good_affine(), img)
    return Case("inf_voxels", img, img, r"inf|not finite|non-finite", _IMG, label=_label_beside(lbl))


@_register(IMAGE_CASES)
def constant_image(img: Path, lbl: Path | None) -> Case:
    """Every voxel -1000 (an empty air scan): no contrast, zero standard deviation.

    A clear refusal or a correct all-background label are both acceptable; NaN-poisoned output or a
    crash in normalisation is not.
    """
    _save(np.full(GOOD_SHAPE, -1000, np.int16), good_affine(), img)
    return Case("constant_image", img, img, r"constant|no contrast|uniform|zero (standard deviation|variance)|std",
                _IMG, outcome="either", label=_label_beside(lbl))


def _with_pixdim(img: Path, lbl: Path | None, name: str, zoom_z: float, reason: str) -> Case:
    """Header spacing (pixdim and the sform/qform scale) broken along z."""
    image, _ = _phantom(GOOD_SHAPE)
    aff = good_affine()
    aff[2, 2] = zoom_z if np.isfinite(zoom_z) else 2.0
    if np.isnan(zoom_z):
        aff[2, 2] = np.nan
    img.parent.mkdir(parents=True, exist_ok=True)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(GOOD_SHAPE)
    hdr.set_data_dtype(np.int16)
    hdr["pixdim"][1:4] = [GOOD_SPACING[0], GOOD_SPACING[1], zoom_z]
    hdr["sform_code"] = 1
    hdr["qform_code"] = 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = aff[0], aff[1], aff[2]
    hdr["vox_offset"] = 352
    hdr["magic"] = b"n+1"
    raw = hdr.binaryblock + b"\x00" * 4 + np.round(image).astype("<i2").tobytes(order="F")
    img.write_bytes(gzip.compress(raw))
    label = None
    if lbl is not None:  # the label shares the image's (finite) sform, so only the spacing is wrong
        label = _save(_phantom(GOOD_SHAPE)[1], aff if zoom_z < 0 else good_affine(), lbl, 1, 0)
    return Case(name, img, img, reason, _IMG, label=label)


@_register(IMAGE_CASES)
def zero_spacing(img: Path, lbl: Path | None) -> Case:
    return _with_pixdim(img, lbl, "zero_spacing", 0.0, r"spacing|pixdim|singular|zero")


@_register(IMAGE_CASES)
def negative_spacing(img: Path, lbl: Path | None) -> Case:
    """pixdim[3] = -2 (the sform itself is a valid flip). Refuse, or honour the sform exactly."""
    case = _with_pixdim(img, lbl, "negative_spacing", -2.0, r"spacing|pixdim|negative")
    case.outcome = "either"
    return case


@_register(IMAGE_CASES)
def nan_spacing(img: Path, lbl: Path | None) -> Case:
    return _with_pixdim(img, lbl, "nan_spacing", float("nan"), r"spacing|pixdim|nan|not a number|finite")


@_register(IMAGE_CASES)
def singular_affine(img: Path, lbl: Path | None) -> Case:
    """sform whose third column repeats the first (voxel axes linearly dependent), qform unset."""
    image, _ = _phantom(GOOD_SHAPE)
    aff = good_affine()
    aff[:3, 2] = aff[:3, 0]
    img.parent.mkdir(parents=True, exist_ok=True)
    _save(np.round(image).astype(np.int16), aff, img, sform_code=1, qform_code=0)
    return Case("singular_affine", img, img, r"singular|degenerate|linearly dependent|affine|determinant", _IMG,
                label=_label_beside(lbl))


@_register(IMAGE_CASES)
def oblique_sheared_affine(img: Path, lbl: Path | None) -> Case:
    """A non-orthogonal (30° sheared) sform. Refuse with a clear reason, or keep it exactly in the output."""
    image, _ = _phantom(GOOD_SHAPE)
    aff = good_affine()
    aff[0, 1] = np.tan(np.deg2rad(30)) * GOOD_SPACING[1]
    _save(np.round(image).astype(np.int16), aff, img, sform_code=1, qform_code=0)
    label = None if lbl is None else _save(_phantom(GOOD_SHAPE)[1], aff, lbl, sform_code=1, qform_code=0)
    return Case("oblique_sheared_affine", img, img, r"orthogonal|shear|oblique|affine", _IMG, outcome="either",
                label=label)


@_register(IMAGE_CASES)
def sform_qform_disagree(img: Path, lbl: Path | None) -> Case:
    """sform says RAS, qform (both code 1) says the x axis is flipped and shifted by 30 mm."""
    image, _ = _phantom(GOOD_SHAPE)
    img.parent.mkdir(parents=True, exist_ok=True)
    aff = good_affine()
    other = aff.copy()
    other[0, 0] *= -1
    other[0, 3] += 30.0
    im = nib.Nifti1Image(np.round(image).astype(np.int16), aff)
    im.set_sform(aff, code=1)
    im.set_qform(other, code=1)
    nib.save(im, str(img))
    label = None
    if lbl is not None:
        lab = nib.Nifti1Image(_phantom(GOOD_SHAPE)[1], aff)
        lab.set_sform(aff, code=1)
        lab.set_qform(other, code=1)
        lbl.parent.mkdir(parents=True, exist_ok=True)
        nib.save(lab, str(lbl))
        label = lbl
    return Case("sform_qform_disagree", img, img, r"sform|qform|disagree|inconsistent", _IMG, outcome="either",
                label=label, extra={"qform": other, "sform": aff})


@_register(IMAGE_CASES)
def huge_volume(img: Path, lbl: Path | None) -> Case:
    """A header claiming 4096×4096×2048 float32 (128 GiB) with a few bytes of data: must be refused
    from the header, before anything tries to allocate it."""
    img.parent.mkdir(parents=True, exist_ok=True)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4096, 4096, 2048))
    hdr.set_data_dtype(np.float32)
    hdr.set_zooms((0.5, 0.5, 0.5))
    hdr.set_sform(good_affine((0.5, 0.5, 0.5)), code=1)
    hdr.set_qform(good_affine((0.5, 0.5, 0.5)), code=1)
    hdr["vox_offset"] = 352
    img.write_bytes(gzip.compress(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 4096))
    return Case("huge_volume", img, img, r"too large|memory|budget|GiB|GB|exceed", _IMG,
                label=_label_beside(lbl), extra={"claimed_shape": (4096, 4096, 2048)})


@_register(IMAGE_CASES)
def wrong_channel_count(img: Path, lbl: Path | None) -> Case:
    """Three modalities stacked on a 4th axis (X, Y, Z, 3) for a one-channel model."""
    image, _ = _phantom(GOOD_SHAPE)
    data = np.stack([image, image * 0.5, image * 2.0], axis=-1).astype(np.int16)
    _save(data, good_affine(), img)
    return Case("wrong_channel_count", img, img, r"channel|modalit|4d|dimension|shape|\b3\b", _IMG - {READ},
                label=_label_beside(lbl))


@_register(IMAGE_CASES)
def tiny_volume(img: Path, lbl: Path | None) -> Case:
    """A 3×3×3 volume of 0.4 mm voxels (1.2 mm across): a single voxel on a 2 mm plan grid, smaller
    than any network's pooling depth. Segment it (padding, as a sliding window does) or refuse it clearly."""
    image, _ = _phantom((3, 3, 3))
    _save(np.round(image).astype(np.int16), good_affine((0.4, 0.4, 0.4)), img)
    return Case("tiny_volume", img, img, r"too small|small|minimum|at least", frozenset({SEGMENT}),
                outcome="either", label=None if lbl is None else _save(_phantom((3, 3, 3))[1],
                                                                        good_affine((0.4, 0.4, 0.4)), lbl))


@_register(IMAGE_CASES)
def symlink_loop(img: Path, lbl: Path | None) -> Case:
    """``case.nii.gz`` → ``.loop.nii.gz`` → ``case.nii.gz``."""
    img.parent.mkdir(parents=True, exist_ok=True)
    other = img.with_name(".loop_" + img.name)
    os.symlink(other.name, img)
    os.symlink(img.name, other)
    return Case("symlink_loop", img, img, r"symbolic link|symlink|link loop|too many levels|loop|no such file|broken",
                _IMG, label=_label_beside(lbl))


@_register(IMAGE_CASES)
def unreadable_file(img: Path, lbl: Path | None) -> Case:
    """A valid image with mode 000. Root reads it anyway: run the command as ``nobody`` to see it bite."""
    write_good_image(img)
    os.chmod(img, 0)
    return Case("unreadable_file", img, img, r"permission|not readable|access|denied", _IMG,
                label=_label_beside(lbl), unprivileged=True)


# --------------------------------------------------------------------------------------------------
# DICOM (folders in place of an image)
def write_dicom_series(folder: Path, shape=(16, 16, 8), spacing=(0.8, 0.8, 2.5), series_uid: str | None = None,
                       skip_slices=(), seed: int = 0, prefix: str = "slice") -> Path:
    """Write a CT DICOM series (one file per slice) with SimpleITK; ``skip_slices`` drops some files."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    image, _ = _phantom(shape, seed)
    vol = sitk.GetImageFromArray(np.transpose(np.round(image).astype(np.int16), (2, 1, 0)))
    vol.SetSpacing(tuple(float(s) for s in spacing))
    vol.SetOrigin((10.0, -20.0, 30.0))
    series_uid = series_uid or f"1.2.826.0.1.3680043.2.1125.{seed}.{abs(hash(folder)) % 10**8}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = vol.GetDirection()
    for z in range(shape[2]):
        if z in skip_slices:
            continue
        sl = vol[:, :, z]
        pos = vol.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {
            "0008|0060": "CT",
            "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
            "0010|0020": "HOSTILE",
            "0020|000d": series_uid.rsplit(".", 1)[0] + ".1",
            "0020|000e": series_uid,
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in pos),
            "0020|0037": "\\".join(f"{d:.6f}" for d in (*direction[0:7:3], *direction[1:8:3])),
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
            "0008|0018": f"{series_uid}.{z + 1}",
        }
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        writer.SetFileName(str(folder / f"{prefix}_{z:03d}.dcm"))
        writer.Execute(sl)
    return folder


def _dicom_folder(img: Path) -> Path:
    name = img.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return img.with_name(name)


@_register(IMAGE_CASES)
def dicom_mixed_series(img: Path, lbl: Path | None) -> Case:
    """One folder holding two DICOM series (e.g. a scout and the axial scan)."""
    folder = _dicom_folder(img)
    write_dicom_series(folder, series_uid="1.2.826.0.1.3680043.2.1125.7.1", seed=1, prefix="a")
    write_dicom_series(folder, series_uid="1.2.826.0.1.3680043.2.1125.7.2", seed=2, prefix="b",
                       spacing=(0.7, 0.7, 3.0))
    return Case("dicom_mixed_series", folder, folder, r"series", frozenset({READ, SEGMENT}))


@_register(IMAGE_CASES)
def dicom_missing_slice(img: Path, lbl: Path | None) -> Case:
    """A DICOM series with slice 5 of 12 missing (a gap twice the slice spacing)."""
    folder = _dicom_folder(img)
    write_dicom_series(folder, shape=(16, 16, 12), series_uid="1.2.826.0.1.3680043.2.1125.8.1", skip_slices=(5,))
    return Case("dicom_missing_slice", folder, folder, r"missing|gap|irregular|spacing", frozenset({READ, SEGMENT}))


# --------------------------------------------------------------------------------------------------
# bad labels (image is fine)
@_register(LABEL_CASES)
def label_shape_mismatch(img: Path, lbl: Path) -> Case:
    write_good_image(img)
    _save(_phantom((24, 20, 12))[1], good_affine(), lbl)
    return Case("label_shape_mismatch", img, lbl, r"shape|size|dimension", _LBL, label=lbl)


@_register(LABEL_CASES)
def label_affine_mismatch(img: Path, lbl: Path) -> Case:
    """Same shape, but the label sits 15 mm away from the image (origin differs)."""
    write_good_image(img)
    aff = good_affine()
    aff[:3, 3] += [15.0, 0.0, 0.0]
    _save(_phantom(GOOD_SHAPE)[1], aff, lbl)
    return Case("label_affine_mismatch", img, lbl, r"affine|geometry|origin|orientation|spacing|direction|world",
                _LBL, label=lbl)


@_register(LABEL_CASES)
def label_outside_classes(img: Path, lbl: Path) -> Case:
    """Values 0, 1, 2 plus a stray 7 that dataset.json does not declare."""
    write_good_image(img)
    lab = _phantom(GOOD_SHAPE)[1].copy()
    lab[0:3, 0:3, 0:3] = 7
    _save(lab, good_affine(), lbl)
    return Case("label_outside_classes", img, lbl, r"\b7\b|class|label value|unexpected|undeclared|not in", _LBL,
                label=lbl)


@_register(LABEL_CASES)
def label_float_values(img: Path, lbl: Path) -> Case:
    """A float label with fractional values (an interpolated mask)."""
    write_good_image(img)
    lab = _phantom(GOOD_SHAPE)[1].astype(np.float32)
    lab[lab == 1] = 0.5
    _save(lab, good_affine(), lbl)
    return Case("label_float_values", img, lbl, r"integer|fraction|float|non-integer|0\.5", _LBL, label=lbl)


@_register(LABEL_CASES)
def label_missing(img: Path, lbl: Path) -> Case:
    """An image listed for training whose label file does not exist."""
    write_good_image(img)
    return Case("label_missing", img, lbl, r"missing|not found|no such|does not exist", _LBL, label=lbl)


# --------------------------------------------------------------------------------------------------
# voxel data that is no image: refused with the reason, never converted with data dropped
_VOX = frozenset({READ, SEGMENT, CHECK})


def _raw_nifti(img: Path, array: np.ndarray, **fields) -> Path:
    """An uncompressed NIfTI whose header fields are then overwritten (datatype codes nibabel will not
    write, e.g. 1 = 1-bit binary); ``img`` keeps its name, gzip-compressed when it ends in ``.gz``."""
    import io

    raw = bytearray(_nifti_bytes(array, good_affine()))
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
    for key, value in fields.items():
        hdr[key] = value
    raw[:348] = hdr.binaryblock
    img.parent.mkdir(parents=True, exist_ok=True)
    img.write_bytes(gzip.compress(bytes(raw)) if img.name.endswith(".gz") else bytes(raw))
    return img


def _colour(gray: np.ndarray, channels: tuple[np.ndarray, ...]) -> np.ndarray:
    names = "RGBA"[: len(channels)]
    out = np.zeros(gray.shape, dtype=[(n, "u1") for n in names])
    for n, c in zip(names, channels, strict=True):
        out[n] = c
    return out


def _gray_u8(shape=GOOD_SHAPE, seed: int = 0) -> np.ndarray:
    image, _ = _phantom(shape, seed)
    return np.clip(image + 100, 0, 255).astype(np.uint8)


@_register(VOXEL_CASES)
def complex_voxels(img: Path, lbl: Path | None) -> Case:
    """complex64 MR signal (real and imaginary parts both used): no single image to take from it."""
    image, _ = _phantom(GOOD_SHAPE)
    _save((image + 1j * image[::-1]).astype(np.complex64), good_affine(), img)
    return Case("complex_voxels", img, img, r"complex", _VOX, label=_label_beside(lbl))


@_register(VOXEL_CASES)
def complex_zero_imaginary(img: Path, lbl: Path | None) -> Case:
    """complex128 whose imaginary part is zero: still complex by type (real part or magnitude?)."""
    image, _ = _phantom(GOOD_SHAPE)
    _save(image.astype(np.complex128), good_affine(), img)
    return Case("complex_zero_imaginary", img, img, r"complex", _VOX, label=_label_beside(lbl))


@_register(VOXEL_CASES)
def rgb_colour(img: Path, lbl: Path | None) -> Case:
    """RGB24 voxels with different red, green and blue: turning them into gray would drop colour."""
    gray = _gray_u8()
    _save(_colour(gray, (gray, gray // 2, 255 - gray)), good_affine(), img)
    return Case("rgb_colour", img, img, r"colou?r|rgb", _VOX, label=_label_beside(lbl))


@_register(VOXEL_CASES)
def rgba_varying_alpha(img: Path, lbl: Path | None) -> Case:
    """RGBA32 gray (R = G = B) whose alpha varies: the alpha would be dropped."""
    gray = _gray_u8()
    _save(_colour(gray, (gray, gray, gray, gray[::-1].copy())), good_affine(), img)
    return Case("rgba_varying_alpha", img, img, r"alpha|transparen", _VOX, label=_label_beside(lbl))


@_register(VOXEL_CASES)
def float64_beyond_float32(img: Path, lbl: Path | None) -> Case:
    """float64 values of 1e300: float32 would make them infinite."""
    image, _ = _phantom(GOOD_SHAPE)
    _save(image.astype(np.float64) * 1e298, good_affine(), img)
    return Case("float64_beyond_float32", img, img, r"float32 range|beyond|too large|overflow", _VOX,
                label=_label_beside(lbl))


@_register(VOXEL_CASES)
def binary_datatype(img: Path, lbl: Path | None) -> Case:
    """NIfTI datatype 1 (1 bit per voxel), which the reader does not support."""
    _raw_nifti(img, _gray_u8(), datatype=1, bitpix=1)
    return Case("binary_datatype", img, img, r"data ?type|binary|not supported", _VOX, label=_label_beside(lbl))


@_register(VOXEL_CASES)
def float128_datatype(img: Path, lbl: Path | None) -> Case:
    """NIfTI datatype 1536 (128-bit float)."""
    image, _ = _phantom(GOOD_SHAPE)
    data = np.repeat(image.astype(np.float64), 2, axis=-1)  # 16 bytes per voxel
    _raw_nifti(img, data, datatype=1536, bitpix=128, dim=[3, *GOOD_SHAPE, 1, 1, 1, 1])
    return Case("float128_datatype", img, img, r"data ?type|128|not supported", _VOX, label=_label_beside(lbl))


@_register(VOXEL_CASES)
def empty_axis(img: Path, lbl: Path | None) -> Case:
    """A 24x0x16 volume: a header whose second axis has no voxels."""
    _save(np.zeros((24, 0, 16), np.int16), good_affine(), img)
    return Case("empty_axis", img, img, r"empty axis|no voxels|\b0\b", _VOX, label=_label_beside(lbl))


@_register(VOXEL_CASES)
def two_extra_axes(img: Path, lbl: Path | None) -> Case:
    """X×Y×Z×2×3: time and vector axes at once; which one is the channel axis is not the reader's guess."""
    image, _ = _phantom(GOOD_SHAPE)
    _save(np.repeat(np.repeat(image[..., None, None], 2, axis=3), 3, axis=4), good_affine(), img)
    return Case("two_extra_axes", img, img, r"axes|shape|dimension", _VOX, label=_label_beside(lbl))


# --------------------------------------------------------------------------------------------------
# what converters and PACS exports really write: segmented in the file's exact geometry
_CONV = frozenset({READ, SEGMENT, CHECK})


def _ok(name: str, img: Path, lbl: Path | None, **extra) -> Case:
    return Case(name, img, img, r"^$", _CONV, outcome="ok", label=_label_beside(lbl), extra=extra)


@_register(CONVERTER_CASES)
def rgb_gray(img: Path, lbl: Path | None) -> Case:
    """RGB24 with R = G = B: gray stored in colour, read losslessly as that gray."""
    gray = _gray_u8()
    _save(_colour(gray, (gray, gray, gray)), good_affine(), img)
    return _ok("rgb_gray", img, lbl, gray=gray)


@_register(CONVERTER_CASES)
def scaled_int16(img: Path, lbl: Path | None) -> Case:
    """int16 storage with scl_slope 0.5 and scl_inter -1024 (how many CT exports store HU)."""
    image, _ = _phantom(GOOD_SHAPE)
    raw = np.round((image + 1024) / 0.5).astype(np.int16)
    nii = nib.Nifti1Image(raw, good_affine())
    nii.header.set_slope_inter(0.5, -1024.0)
    nii.set_sform(good_affine(), code=1)
    nii.set_qform(good_affine(), code=1)
    img.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nii, str(img))
    return _ok("scaled_int16", img, lbl, values=raw * 0.5 - 1024.0)


@_register(CONVERTER_CASES)
def uncompressed_nii(img: Path, lbl: Path | None) -> Case:
    """A plain ``.nii`` (no gzip) next to the ``.nii.gz`` files."""
    img = img.with_name(img.name.replace(".nii.gz", ".nii"))
    write_good_image(img)
    return _ok("uncompressed_nii", img, lbl)


@_register(CONVERTER_CASES)
def unusual_file_name(img: Path, lbl: Path | None) -> Case:
    """Spaces, brackets, non-ASCII letters, extra dots and an upper-case extension."""
    img = img.with_name(f"Patient Müller (séries 2) v1.5 {img.name.split('.')[0]}.NII.GZ")
    write_good_image(img)
    return _ok("unusual_file_name", img, lbl)


@_register(CONVERTER_CASES)
def singleton_axes(img: Path, lbl: Path | None) -> Case:
    """X×Y×Z×1×1 (a time axis and a vector axis of length 1, as some converters write)."""
    image, _ = _phantom(GOOD_SHAPE)
    _save(np.round(image).astype(np.int16)[..., None, None], good_affine(), img)
    return _ok("singleton_axes", img, lbl)


@_register(CONVERTER_CASES)
def wide_integer_types(img: Path, lbl: Path | None) -> Case:
    """int64 storage (values a CT scanner writes): read as the values, not refused for its width."""
    image, _ = _phantom(GOOD_SHAPE)
    nii = nib.Nifti1Image(np.round(image).astype(np.int64), good_affine(), dtype=np.int64)
    nii.set_sform(good_affine(), code=1)
    img.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nii, str(img))
    return _ok("wide_integer_types", img, lbl)


@_register(CONVERTER_CASES)
def blank_scan(img: Path, lbl: Path | None) -> Case:
    """Every voxel 0 (an empty series): the label is empty, not an error."""
    _save(np.zeros(GOOD_SHAPE, np.int16), good_affine(), img)
    return _ok("blank_scan", img, lbl, empty_label=True)


@_register(CONVERTER_CASES)
def padding_only_scan(img: Path, lbl: Path | None) -> Case:
    """Every voxel -3024 (CT padding value only): the label is empty."""
    _save(np.full(GOOD_SHAPE, -3024, np.int16), good_affine(), img)
    return _ok("padding_only_scan", img, lbl, empty_label=True)


@_register(CONVERTER_CASES)
def single_slice(img: Path, lbl: Path | None) -> Case:
    """A 3D file of one axial slice (24×20×1)."""
    image, _ = _phantom((24, 20, 1))
    _save(np.round(image).astype(np.int16), good_affine(), img)
    return _ok("single_slice", img, lbl)


@_register(CONVERTER_CASES)
def one_voxel(img: Path, lbl: Path | None) -> Case:
    """A 1×1×1 volume (a degenerate export)."""
    _save(np.full((1, 1, 1), 40, np.int16), good_affine(), img)
    return _ok("one_voxel", img, lbl)


# --------------------------------------------------------------------------------------------------
# bad folders
@_register(FOLDER_CASES)
def empty_folder(img: Path, lbl: Path | None) -> Case:
    folder = _dicom_folder(img)
    folder.mkdir(parents=True, exist_ok=True)
    return Case("empty_folder", folder, folder, r"empty|no (image|file|nifti|dicom|case|training)|nothing|found",
                frozenset({READ, SEGMENT, CHECK, PLAN}))


# --------------------------------------------------------------------------------------------------
# bad checkpoints (``img`` is the checkpoint path here; ``lbl`` unused)
@_register(CHECKPOINT_CASES)
def checkpoint_missing(ckpt: Path, _lbl=None) -> Case:
    ckpt = ckpt.with_suffix(".pt")
    return Case("checkpoint_missing", ckpt, ckpt, r"not found|no such|does not exist|missing", frozenset({LOAD, SEGMENT}))


@_register(CHECKPOINT_CASES)
def checkpoint_zero_byte(ckpt: Path, _lbl=None) -> Case:
    ckpt = ckpt.with_suffix(".pt")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"")
    return Case("checkpoint_zero_byte", ckpt, ckpt, r"empty|0 bytes|truncat|corrupt", frozenset({LOAD, SEGMENT}))


@_register(CHECKPOINT_CASES)
def checkpoint_truncated(ckpt: Path, _lbl=None, network=None) -> Case:
    import torch

    ckpt = ckpt.with_suffix(".pt")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    net = network if network is not None else torch.nn.Conv3d(1, 2, 3)
    torch.save(net.state_dict(), ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    return Case("checkpoint_truncated", ckpt, ckpt, r"truncat|corrupt|zip|archive|central directory",
                frozenset({LOAD, SEGMENT}))


@_register(CHECKPOINT_CASES)
def checkpoint_other_network(ckpt: Path, _lbl=None, network=None) -> Case:
    """Weights of a different architecture (a tiny SegResNet unless ``network`` is given)."""
    import torch

    from medunet import networks

    ckpt = ckpt.with_suffix(".pt")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if network is None:
        network = networks.create("segresnet", 3, 1, 3, **networks.get_spec("segresnet").tiny_options)
    torch.save({"model": network.state_dict()}, ckpt)
    return Case("checkpoint_other_network", ckpt, ckpt, r"different network|mismatch|missing key|unexpected key|shape",
                frozenset({LOAD, SEGMENT}))


class _Trap:
    """Pickles to a call of ``open(marker, "w")``: unpickling it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@_register(CHECKPOINT_CASES)
def checkpoint_malicious_pickle(ckpt: Path, _lbl=None) -> Case:
    """A torch.save file whose pickle calls ``open(marker, 'w')`` when loaded without weights_only."""
    import torch

    ckpt = ckpt.with_suffix(".pt")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    marker = ckpt.with_name(ckpt.stem + ".PWNED")
    torch.save({"model": {"w": torch.zeros(2)}, "trap": _Trap(marker)}, ckpt)
    return Case("checkpoint_malicious_pickle", ckpt, ckpt, r"unpickl|refus|weights.only|not a plain|unsafe|global",
                frozenset({LOAD, SEGMENT}), marker=marker)


# --------------------------------------------------------------------------------------------------
# bundle config with a typo'd id
def typo_config(src_config: Path, dst_config: Path, wrong: str = "netwrok_def") -> tuple[Path, str]:
    """Copy a bundle config, renaming the first ``@network_def`` reference (or any ``@<id>``) to a typo.

    Returns the written path and the misspelt id the error must name.
    """
    text = Path(src_config).read_text(encoding="utf-8")
    m = re.search(r"@network_def\b", text) or re.search(r"@([A-Za-z_][A-Za-z0-9_]*)", text)
    if m is None:
        raise ValueError(f"{src_config}: no @reference to misspell")
    text = text[: m.start()] + "@" + wrong + text[m.end():]
    dst_config.parent.mkdir(parents=True, exist_ok=True)
    dst_config.write_text(text, encoding="utf-8")
    return dst_config, wrong


def typo_override_file(dst: Path, typo_key: str = "train#trainer#max_epoch") -> Path:
    """An override JSON that sets a misspelt id (``max_epoch`` instead of ``max_epochs``)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps({typo_key: 1}))
    return dst


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --------------------------------------------------------------------------------------------------
# MSD-layout datasets with hostile cases mixed in
GOOD_LABELS = {"0": "background", "1": "organ", "2": "core"}


def write_dataset(root: Path, good: int = 2, bad: list[str] = (), modality: str = "CT") -> dict[str, Case]:
    """An MSD dataset (``dataset.json``, ``imagesTr/``, ``labelsTr/``) with ``good`` valid cases and one
    case per name in ``bad`` (image and/or label cases; ids ``bad_<name>``). Returns name → Case."""
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(good):
        img = write_good_image(root / "imagesTr" / f"good_{i:03d}.nii.gz", seed=i)
        lbl = write_good_label(root / "labelsTr" / f"good_{i:03d}.nii.gz", seed=i)
        training.append({"image": f"./imagesTr/{img.name}", "label": f"./labelsTr/{lbl.name}"})
    meta = {"name": "hostile", "description": "reliability test dataset", "tensorImageSize": "3D",
            "modality": {"0": modality}, "labels": GOOD_LABELS, "numTraining": len(training), "numTest": 0,
            "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return {name: inject_case(root, name) for name in bad}


def inject_case(root: Path, name: str) -> Case:
    """Add hostile case ``name`` (id ``bad_<name>``) to the MSD dataset at ``root`` and its dataset.json."""
    root = Path(root)
    cid = f"bad_{name}"
    case = make_case(name, root / "imagesTr" / f"{cid}.nii.gz", root / "labelsTr" / f"{cid}.nii.gz")
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta["training"].append({"image": f"./imagesTr/{case.path.name}", "label": f"./labelsTr/{cid}.nii.gz"})
    meta["numTraining"] = len(meta["training"])
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return case
