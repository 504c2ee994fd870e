"""Reading NIfTI / DICOM / PNG-TIFF images with their exact geometry, and writing labels atomically.

Every failure is an :class:`~medunet.io.errors.InputError` naming the file and the problem.

Which voxel types are images (:func:`scalar_voxels`, applied by every reader): an image is one real
number per voxel (per channel).

* accepted: booleans, signed and unsigned integers of any width, and floating point of any width,
  after NIfTI scaling (``scl_slope``/``scl_inter``). Readers return float32: integers beyond 2**24
  are rounded to float32's 24-bit precision (a relative change below 6e-8), floats must be finite and
  within float32's range (NaN/Inf, or values beyond ±3.4e38, are refused: converting them would
  invent infinities).
* accepted by a lossless conversion: colour voxels (NIfTI RGB24/RGBA32, RGB/RGBA PNG, multi-component
  DICOM) whose red, green and blue are equal everywhere, and whose alpha, if any, is one value — a
  gray image stored in colour; it is read as that gray.
* refused, with the reason: complex voxels (MR complex signal: whether the real part or the
  magnitude is the image is not the file's to say, and either drops data), colour voxels whose
  channels differ (turning them into gray would drop colour), any other structured type, and
  non-numeric data (strings, objects, dates).

Shapes: the first three axes are spatial. Singleton axes beyond them (``X×Y×Z×1``, NIfTI's
``X×Y×Z×1×C`` vector layout) are dropped; one remaining extra axis is the channel axis; more than
one is refused. An axis of length 0 is refused from the header, before anything is loaded.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from medunet.io.atomic import atomic_path
from medunet.io.errors import InputError

__all__ = [
    "ImageData", "read_image", "read_nifti", "read_nifti_header", "read_dicom_series", "read_2d_image", "write_nifti",
    "write_like", "validate_affine", "is_nifti", "is_2d_image", "NIFTI_SUFFIXES", "IMAGE2D_SUFFIXES",
    "image_id", "scalar_voxels", "to_float32", "voxel_type_problem", "is_dicom_file", "write_maps_like",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE2D_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_GZIP_MAGIC = b"\x1f\x8b"
_PNG_MAGIC = b"\x89PNG"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_2d_image(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE2D_SUFFIXES)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a readable, non-empty file that looks like DICOM: the ``DICM`` marker at byte
    128 (Part 10), or a ``.dcm`` name. False for folders, links that lead nowhere, unreadable files and
    anything but a regular file (a FIFO is never opened), so that reading them as files names their
    problem."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:  # a broken link, no permission
        return False
    if len(head) == 132 and head[128:] == b"DICM":
        return True
    return bool(head) and str(path).lower().endswith(".dcm")


def image_id(path: str | os.PathLike) -> str:
    """File name without its image extension (``case_01.nii.gz`` → ``case_01``)."""
    name = Path(path).name
    for ext in NIFTI_SUFFIXES + IMAGE2D_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


@dataclass
class ImageData:
    """An image array with the geometry it came with.

    Attributes:
        array: voxel data, spatial axes first in NIfTI order ``(X, Y[, Z])``, optionally a trailing
            channel axis for multi-channel images ``(X, Y, Z, C)``.
        affine: 4×4 voxel-to-world (RAS mm) matrix.
        path: where it was read from.
        header: the NIfTI header (sform/qform codes kept) or ``None`` for DICOM/2D images.
        source: ``"nifti"``, ``"dicom"`` or ``"2d"``.
    """

    array: np.ndarray
    affine: np.ndarray
    path: str
    header: nib.Nifti1Header | None = None
    source: str = "nifti"
    meta: dict = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[: self.spatial_dims])

    @property
    def spatial_dims(self) -> int:
        return 2 if self.source == "2d" else min(self.array.ndim, 3)

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, : self.spatial_dims], axis=0))


@contextlib.contextmanager
def _quiet_nibabel_header_fixes():
    """Silence nibabel's header-fix messages (e.g. "pixdim should be non-zero", "data code 1 not
    supported; not attempting fix") while loading.

    Our own checks report those problems as one line naming the file; nibabel's logger also has its
    own stream handler, bound to the ``sys.stderr`` of import time, which may since have been closed.
    """
    logger = logging.getLogger("nibabel.global")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def validate_affine(affine: np.ndarray, path: str | os.PathLike, spatial_dims: int = 3) -> np.ndarray:
    """Check a voxel-to-world matrix: finite, non-singular, positive spacing. Returns it as float64."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(path, f"affine must be 4x4, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "affine contains NaN or Inf (spacing or origin is not a number)")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing[:spatial_dims] <= 1e-8):
        raise InputError(path, f"zero voxel spacing {tuple(round(float(s), 6) for s in spacing)}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12 * max(float(np.prod(spacing)), 1e-30):
        raise InputError(path, "singular affine (voxel axes are linearly dependent)")
    return affine


def _check_header_spacing(img: nib.Nifti1Image, path: Path) -> None:
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    ndim = min(len(img.shape), 3)
    if not np.all(np.isfinite(zooms[:ndim])):
        raise InputError(path, f"voxel spacing (pixdim) is not a number: {tuple(zooms[:ndim].tolist())}")
    if np.any(zooms[:ndim] <= 0):
        raise InputError(path, f"zero or negative voxel spacing (pixdim) {tuple(zooms[:ndim].tolist())}")


def memory_budget_bytes() -> int:
    """Largest image (as float32) a reader may allocate: ``MEDUNET_MAX_IMAGE_GB`` or half the machine's RAM."""
    env = os.environ.get("MEDUNET_MAX_IMAGE_GB")
    if env:
        return int(float(env) * 2**30)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _check_memory_budget(shape: tuple[int, ...], path: Path) -> None:
    """Refuse, from the header alone, a volume whose float32 array would not fit the memory budget."""
    nbytes = int(np.prod([int(s) for s in shape], dtype=np.float64)) * 4
    budget = memory_budget_bytes()
    if nbytes > budget:
        dims = "x".join(str(int(s)) for s in shape)
        raise InputError(path, f"volume too large: header claims {dims} voxels ({nbytes / 2**30:.1f} GiB as float32), "
                               f"over the memory budget of {budget / 2**30:.1f} GiB (set MEDUNET_MAX_IMAGE_GB to raise it)")


_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: NIfTI datatype codes nibabel cannot read here (its errors give only the number)
_NIFTI_UNSUPPORTED_CODES = {1: "1-bit binary", 1536: "128-bit float", 2048: "256-bit complex"}


def _dtype_name(dtype: np.dtype) -> str:
    return str(dtype) if dtype.fields is None else "structured " + ", ".join(
        f"{name}:{dtype.fields[name][0]}" for name in dtype.names)


def _colour_channels(dtype: np.dtype) -> list[str] | None:
    """Field names of a colour voxel type (3 or 4 numeric fields of one type: RGB24, RGBA32...)."""
    names = list(dtype.names or ())
    if len(names) not in (3, 4):
        return None
    kinds = {dtype.fields[n][0] for n in names}
    if len(kinds) != 1 or next(iter(kinds)).kind not in "uif" or next(iter(kinds)).shape:
        return None
    return names


def voxel_type_problem(dtype: np.dtype) -> str | None:
    """Why voxels of ``dtype`` can never be an image, or None when they can (or may, for colour
    types, when their channels turn out equal). The rule is the module docstring's."""
    dtype = np.dtype(dtype)
    if dtype.fields is not None:
        if _colour_channels(dtype) is not None:
            return None
        return f"voxel type {_dtype_name(dtype)} is a structured record, not an image intensity"
    if dtype.kind == "c":
        return (f"complex voxels ({dtype}): a complex (MR signal/phase) image is not a scalar image; "
                "save its magnitude or real part as a real type")
    if dtype.kind in "biuf":
        return None
    return f"non-numeric voxels ({dtype}): not an image"


def scalar_voxels(array: np.ndarray, path: str | os.PathLike, channel_axis: int | None = None) -> np.ndarray:
    """``array`` as real scalars (bool → uint8), or :class:`InputError` saying why it is not an image.

    Colour comes either as a structured type (NIfTI RGB24/RGBA32) or as a trailing ``channel_axis``
    (RGB PNG, multi-component DICOM); it is accepted when it is gray in disguise: red, green and blue
    equal everywhere and alpha, if any, one value. Anything else is refused (see the module docstring).
    """
    array = np.asanyarray(array)
    problem = voxel_type_problem(array.dtype)
    if problem is not None:
        raise InputError(path, problem)
    if array.dtype.fields is not None:
        names = _colour_channels(array.dtype)
        channels = [np.asarray(array[n]) for n in names]
        what = f"colour voxels ({_dtype_name(array.dtype)})"
    elif channel_axis is not None:
        count = array.shape[channel_axis]
        if count not in (1, 2, 3, 4):
            raise InputError(path, f"{count} colour components per pixel; expected gray, RGB or RGBA")
        channels = list(np.moveaxis(array, channel_axis, 0))
        what = f"colour pixels ({count} components)"
        if count in (1, 2):  # gray, gray + alpha
            channels = [channels[0]] * 3 + channels[1:]
    else:
        return array.astype(np.uint8) if array.dtype.kind == "b" else array
    colour, alpha = channels[:3], channels[3] if len(channels) == 4 else None
    if not (np.array_equal(colour[0], colour[1]) and np.array_equal(colour[0], colour[2])):
        raise InputError(path, f"{what} with differing red, green and blue: a colour image, not a gray one; "
                               "converting it to gray would drop its colour (convert it yourself if that is meant)")
    if alpha is not None and alpha.size and np.any(alpha != alpha.flat[0]):
        raise InputError(path, f"{what} with a varying alpha (transparency) channel: it would be dropped")
    gray = np.ascontiguousarray(colour[0])
    return gray.astype(np.uint8) if gray.dtype.kind == "b" else gray


def to_float32(array: np.ndarray, path: str | os.PathLike, check_finite: bool = True) -> np.ndarray:
    """Real scalar voxels as float32, refusing values float32 cannot hold instead of making them Inf.

    NaN/Inf are refused when ``check_finite``; finite floats beyond ±3.4e38 always are.
    """
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if check_finite and not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise InputError(path, f"contains {bad} NaN/Inf voxel(s)")
        if array.dtype.itemsize > 4:
            values = array[finite] if not finite.all() else array
            peak = float(np.max(np.abs(values))) if values.size else 0.0
            if peak > _FLOAT32_MAX:
                beyond = int(np.count_nonzero(np.abs(values) > _FLOAT32_MAX))
                raise InputError(path, f"{beyond} voxel value(s) beyond the float32 range (largest |value| "
                                       f"{peak:.3g} > 3.4e38): not an image intensity")
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(array, dtype=np.float32)


def _check_header_shape_and_type(img: nib.Nifti1Image, path: Path) -> None:
    """Refuse from the header alone: an axis of length 0, and voxel types that are never images."""
    shape = tuple(int(s) for s in img.shape)
    if any(s == 0 for s in shape):
        raise InputError(path, f"has an empty axis: shape {'x'.join(map(str, shape))} holds no voxels")
    problem = voxel_type_problem(img.get_data_dtype())
    if problem is not None:
        raise InputError(path, problem)


def _squeeze_extra_axes(array: np.ndarray, path: Path) -> np.ndarray:
    """Drop singleton axes beyond the three spatial ones; at most one extra (channel) axis may remain."""
    if array.ndim <= 3:
        return array
    extra = [a for a in range(3, array.ndim) if array.shape[a] != 1]
    if len(extra) > 1:
        raise InputError(path, f"shape {'x'.join(map(str, array.shape))} has {len(extra)} axes of length > 1 "
                               "beyond the three spatial ones; an image may have one (channels)")
    return array.reshape(array.shape[:3] + tuple(array.shape[a] for a in extra))


def read_nifti_header(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI file and check it from its header alone (file readable, really NIfTI, spacing,
    size within the memory budget) without loading voxels; the same errors :func:`read_nifti` gives.

    Returns:
        the nibabel image (``.shape``, ``.affine``, ``.header``; voxels still on disk).
    """
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:4] == _PNG_MAGIC:
        raise InputError(path, "is a PNG image, not NIfTI (wrong extension)")
    if str(path).lower().endswith(".gz") and magic[:2] != _GZIP_MAGIC:
        raise InputError(path, "named .gz but not gzip-compressed")
    try:
        with _quiet_nibabel_header_fixes():
            img = nib.load(str(path))
    except (gzip.BadGzipFile, zlib.error, EOFError) as e:
        raise InputError(path, f"corrupt gzip stream ({e})") from None
    except nib.filebasedimages.ImageFileError as e:
        raise InputError(path, f"not a readable NIfTI file ({e})") from None
    except Exception as e:  # nibabel raises many types for malformed headers
        code = re.search(r"data code (\d+) not supported", str(e))
        if code:
            name = _NIFTI_UNSUPPORTED_CODES.get(int(code.group(1)), "unknown to NIfTI readers")
            raise InputError(path, f"voxel data type code {code.group(1)} ({name}) is not supported") from None
        raise InputError(path, f"cannot read NIfTI header ({type(e).__name__}: {e})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image ({type(img).__name__})")
    _check_header_shape_and_type(img, path)
    _check_header_spacing(img, path)
    _check_memory_budget(img.shape, path)
    return img


def read_nifti(path: str | os.PathLike, check_finite: bool = True, dtype=np.float32) -> ImageData:
    """Read a NIfTI file; raise :class:`InputError` for corrupt, truncated or ill-formed files."""
    path = Path(path)
    img = read_nifti_header(path)
    try:
        array = np.asanyarray(img.dataobj)
    except (gzip.BadGzipFile, zlib.error, EOFError) as e:
        raise InputError(path, f"corrupt or truncated gzip data ({e})") from None
    except MemoryError:
        dims = "x".join(str(int(s)) for s in img.shape)
        raise InputError(path, f"not enough free memory to load its {dims} voxels") from None
    except Exception as e:
        raise InputError(path, f"truncated or unreadable voxel data ({type(e).__name__}: {e})") from None
    if array.ndim < 2:
        raise InputError(path, f"has {array.ndim} dimension(s); an image needs at least 2")
    array = _squeeze_extra_axes(scalar_voxels(array, path), path)
    if dtype is not None and np.dtype(dtype) == np.float32:
        array = to_float32(array, path, check_finite=check_finite)
    else:
        if dtype is not None:
            array = np.asarray(array, dtype=dtype)
        if check_finite and array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise InputError(path, f"contains {bad} NaN/Inf voxel(s)")
    affine = validate_affine(img.affine, path, spatial_dims=min(array.ndim, 3))
    header = img.header.copy()
    return ImageData(array=array, affine=affine, path=str(path), header=header, source="nifti")


def read_dicom_series(folder: str | os.PathLike, dtype=np.float32) -> ImageData:
    """Read one DICOM series from a folder with SimpleITK (affine converted from LPS to RAS)."""
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    if not any(folder.iterdir()):
        raise InputError(folder, "empty folder (no DICOM files)")
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as e:
        raise InputError(folder, f"cannot scan for DICOM series ({e})") from None
    if not series:
        raise InputError(folder, "no DICOM series found in folder")
    if len(series) > 1:  # a DICOM SEG, RT dose or similar beside the slices is not a second image series
        series = tuple(uid for uid in series
                       if _dicom_modality(reader.GetGDCMSeriesFileNames(str(folder), uid)) not in _NON_IMAGE_MODALITIES)
        if not series:
            raise InputError(folder, "no image series in folder (only DICOM SEG / RT objects)")
    if len(series) > 1:
        counts = []
        for uid in series[:3]:
            names = reader.GetGDCMSeriesFileNames(str(folder), uid)
            counts.append(f"{uid}: {len(names)} file(s), e.g. {Path(names[0]).name}" if names else uid)
        raise InputError(folder, f"holds {len(series)} DICOM series mixed in one folder ({'; '.join(counts)}); "
                                 "give one series per folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    if len(files) < 2:
        raise InputError(folder, f"DICOM series has {len(files)} slice(s); need a 3D series")
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    # ITK prints a multi-line warning for uneven slices; _check_dicom_slice_spacing reports it in one line.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise InputError(folder, f"unreadable DICOM series ({' '.join(str(e).split())[:200]})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    _check_dicom_orientation(reader, files, folder)
    _check_dicom_slice_spacing(reader, files, folder)
    array = sitk.GetArrayFromImage(img)  # (z, y, x), (z, y, x, c) for colour
    array = scalar_voxels(array, folder, channel_axis=-1 if img.GetNumberOfComponentsPerPixel() > 1 else None)
    array = np.ascontiguousarray(np.transpose(array, (2, 1, 0)))
    if dtype is not None:
        array = to_float32(array, folder) if np.dtype(dtype) == np.float32 else array.astype(dtype, copy=False)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)[None, :]
    lps[:3, 3] = img.GetOrigin()
    affine = validate_affine(_LPS_TO_RAS @ lps, folder)
    return ImageData(array=array, affine=affine, path=str(folder), header=None, source="dicom",
                     meta={"files": list(files)})


#: DICOM modalities that are never the image series to read (segmentations, RT objects, reports)
_NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "RTRECORD", "RTIMAGE", "SR", "PR", "KO",
                                   "REG", "DOC"})


def _dicom_modality(files) -> str:
    """Modality (0008,0060) of a series' first file, from its header ('' when unreadable)."""
    import SimpleITK as sitk

    if not files:
        return ""
    r = sitk.ImageFileReader()
    r.SetFileName(str(files[0]))
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return ""
    return r.GetMetaData("0008|0060").strip().upper() if r.HasMetaDataKey("0008|0060") else ""


def _check_dicom_orientation(reader, files, folder: Path) -> None:
    """Every slice of a series must share one orientation (ImageOrientationPatient)."""
    first = None
    for i in range(len(files)):
        if not reader.HasMetaDataKey(i, "0020|0037"):
            continue
        try:
            iop = np.asarray([float(v) for v in reader.GetMetaData(i, "0020|0037").split("\\")], dtype=np.float64)
        except ValueError:
            raise InputError(files[i], "unreadable ImageOrientationPatient") from None
        if first is None:
            first = (iop, i)
        elif iop.shape != first[0].shape or np.max(np.abs(iop - first[0])) > 1e-4:
            raise InputError(files[i], f"slice orientation {np.round(iop, 4).tolist()} differs from "
                                       f"{Path(files[first[1]]).name}'s {np.round(first[0], 4).tolist()} "
                                       "(slices with different orientation in one series)")


def _check_dicom_slice_spacing(reader, files, folder: Path) -> None:
    """A missing slice shows up as one gap twice the others along the slice normal; a duplicated slice
    as a gap of zero (two files at one position)."""
    positions = []
    for i in range(len(files)):
        if reader.HasMetaDataKey(i, "0020|0032"):
            try:
                positions.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
            except ValueError:
                return
    if len(positions) != len(files) or len(positions) < 2:
        return
    p = np.asarray(positions)
    name = [Path(f).name for f in files]
    # along the slice normal (GDCM falls back to file-name order when two slices share a position)
    normal = None
    if reader.HasMetaDataKey(0, "0020|0037"):
        with contextlib.suppress(ValueError):
            iop = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
            normal = np.cross(iop[:3], iop[3:6]) if len(iop) == 6 else None
    depth = p @ normal if normal is not None and np.linalg.norm(normal) > 0.5 else np.linalg.norm(p - p[0], axis=1)
    order = np.argsort(depth, kind="stable")
    same = np.flatnonzero(np.linalg.norm(np.diff(p[order], axis=0), axis=1) <= 1e-4)
    if same.size:
        a, b = int(order[same[0]]), int(order[same[0] + 1])
        raise InputError(files[max(a, b)], f"duplicate slice: same position {np.round(p[a], 3).tolist()} as "
                                           f"{name[min(a, b)]} ({same.size} duplicate(s) in the series)")
    steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
    if len(positions) < 3:
        return
    median = float(np.median(steps))
    irregular = np.abs(steps - median) > 0.01 * median + 1e-4
    if np.any(irregular):
        where = int(np.argmax(irregular))
        missing = steps[where] > median
        what = (f"missing slice(s) between {name[where]} and {name[where + 1]}" if missing
                else f"extra slice between {name[where]} and {name[where + 1]}")
        raise InputError(
            folder,
            f"irregular slice spacing: gap of {steps[where]:.3g} mm after slice {where + 1} "
            f"(median {median:.3g} mm) — {what}",
        )


def read_2d_image(path: str | os.PathLike, dtype=np.float32) -> ImageData:
    """Read a PNG/TIFF/JPEG image as a 2D (X, Y) array, unit spacing.

    Gray stored as RGB/RGBA/palette (all three colour channels equal, alpha one value) is read as
    that gray; a colour image is refused (:func:`scalar_voxels`).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "1":
                im = im.convert("L")  # 0/255: lossless
            elif im.mode not in ("L", "LA", "I", "F", "RGB", "RGBA") and not im.mode.startswith("I;16"):
                im = im.convert("RGBA")  # palette, CMYK, YCbCr...: judged as colour below
            colour = im.mode in ("LA", "RGB", "RGBA")
            array = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(path, f"not a readable 2D image ({e})") from None
    if array.ndim != (3 if colour else 2):
        raise InputError(path, f"unexpected pixel array shape {array.shape} for image mode {im.mode}")
    array = scalar_voxels(array, path, channel_axis=-1 if colour else None)
    array = np.ascontiguousarray(array.T)  # PIL is (row, col) = (y, x); NIfTI order is (x, y)
    if dtype is not None:
        array = to_float32(array, path) if np.dtype(dtype) == np.float32 else array.astype(dtype, copy=False)
    return ImageData(array=array, affine=np.eye(4), path=str(path), header=None, source="2d")


def _check_file(path: Path) -> None:
    if not path.exists():
        if path.is_symlink():
            raise InputError(path, "broken or looping symbolic link")
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, expected a file")
    if not os.access(path, os.R_OK):
        raise InputError(path, "permission denied (file is not readable)")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(path, f"cannot stat file ({e.strerror})") from None
    if size == 0:
        raise InputError(path, "empty file (0 bytes)")


def _check_dicom_folder_candidate(folder: Path) -> None:
    """A folder is read as one DICOM series; say so when it is plainly something else."""
    kind = "NIfTI" if is_nifti(folder) else "2D image" if is_2d_image(folder) else None
    if kind:
        raise InputError(folder, f"is a folder, though its name is that of a {kind} file; "
                                 "expected a file (or a DICOM series folder with another name)")
    try:
        entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    except OSError:
        return  # read_dicom_series says why the folder cannot be listed
    images = [e.name for e in entries if is_nifti(e) or is_2d_image(e)]
    # a patient folder may hold DICOM slices beside NIfTI/PNG files: the slices are its series
    if images and not any(is_dicom_file(e) for e in entries if not (is_nifti(e) or is_2d_image(e))):
        raise InputError(folder, f"is a folder of {len(images)} image file(s) (e.g. {sorted(images)[0]}), not a "
                                 "DICOM series; give the folder itself as an input to segment its files")


def read_image(path: str | os.PathLike, check_finite: bool = True) -> ImageData:
    """Read a NIfTI file, a DICOM series folder, or a 2D PNG/TIFF image."""
    p = Path(path)
    try:
        if p.is_dir():
            _check_dicom_folder_candidate(p)
            return read_dicom_series(p)
        if is_nifti(p):
            return read_nifti(p, check_finite=check_finite)
        if is_2d_image(p):
            return read_2d_image(p)
    except OSError as e:
        if e.errno == 40:  # ELOOP
            raise InputError(p, "symbolic link loop") from None
        raise InputError(p, f"cannot read ({e.strerror or e})") from None
    _check_file(p)
    suffix = "".join(p.suffixes[-2:]) if p.suffixes else ""
    what = f"unknown extension {suffix!r}" if suffix else "no file extension"
    raise InputError(p, f"{what}: not an image format medunet reads (.nii, .nii.gz, .png, .tif, .jpg, .bmp, "
                        "or a DICOM series folder)")


def write_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    header: nib.Nifti1Header | None = None,
    dtype=np.uint8,
    overwrite: bool = True,
) -> Path:
    """Write ``array`` as NIfTI atomically (temp file + rename).

    With a reference ``header`` the output keeps its sform/qform codes and matrices exactly; the data
    type, scaling and intent are reset for the new data.
    """
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if header is not None:
        hdr = header.copy()
        hdr.set_data_dtype(array.dtype)
        hdr.set_slope_inter(1.0, 0.0)
        hdr.set_intent("none")
        img = nib.Nifti1Image(array, None, header=hdr)
        img.set_sform(header.get_sform(), code=int(header["sform_code"]))
        img.set_qform(header.get_qform(), code=int(header["qform_code"]))
        # Both codes 0 (no orientation info): stay so; readers derive the same fallback affine from the
        # copied pixdim and the identical shape, so the label overlays the image in every viewer.
    else:
        img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
    if not all(int(s) > 0 for s in array.shape):
        raise ValueError(f"{path}: refusing to write an empty array {array.shape}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def write_like(array: np.ndarray, reference: ImageData, path: str | os.PathLike, dtype=np.uint8,
               overwrite: bool = True) -> Path:
    """Write ``array`` with the geometry of ``reference`` (shape must match its spatial shape)."""
    spatial = tuple(array.shape[: reference.spatial_dims])
    if spatial != reference.spatial_shape:
        raise ValueError(f"{path}: array shape {array.shape} does not match reference {reference.spatial_shape}")
    if reference.source == "2d":
        return _write_2d(array, path, overwrite)
    return write_nifti(array, reference.affine, path, header=reference.header, dtype=dtype, overwrite=overwrite)


def write_maps_like(maps: np.ndarray, reference: ImageData, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write float32 maps (probabilities ``(K, *S)`` or one map ``(*S)``, ``S`` the reference's spatial
    shape) in the reference's geometry, atomically.

    A 2D image reference and a ``.tif``/``.tiff`` path give a float32 multi-page TIFF, one page per map
    (each page ``S`` in the input's pixel layout: width X, height Y); anything else a NIfTI with the
    reference's header, maps on the last axis (``X×Y×Z×K``).
    """
    maps = np.asarray(maps, dtype=np.float32)
    d = reference.spatial_dims
    stacked = maps.ndim == d + 1
    if tuple(maps.shape[int(stacked):]) != reference.spatial_shape or maps.ndim not in (d, d + 1):
        raise ValueError(f"{path}: maps of shape {maps.shape} do not match reference {reference.spatial_shape}")
    if reference.source == "2d" and str(path).lower().endswith((".tif", ".tiff")):
        return _write_float_tiff(maps if stacked else maps[None], path, overwrite)
    data = np.moveaxis(maps, 0, -1) if stacked else maps
    return write_nifti(data, reference.affine, path, header=reference.header, dtype=np.float32, overwrite=overwrite)


def _write_float_tiff(pages: np.ndarray, path: str | os.PathLike, overwrite: bool) -> Path:
    """``pages`` ``(K, X, Y)`` float32 → a K-page 32-bit float TIFF (PIL mode ``F``), atomically."""
    from PIL import Image

    if pages.shape[0] == 0 or not all(int(s) > 0 for s in pages.shape):
        raise ValueError(f"{path}: refusing to write an empty array {pages.shape}")
    frames = [Image.fromarray(np.ascontiguousarray(page.T, dtype=np.float32)) for page in pages]
    with atomic_path(path, overwrite=overwrite) as tmp:
        frames[0].save(tmp, format="TIFF", save_all=True, append_images=frames[1:], compression="tiff_adobe_deflate")
    return Path(path)


def _write_2d(array: np.ndarray, path: str | os.PathLike, overwrite: bool) -> Path:
    from PIL import Image

    if is_nifti(path):
        return write_nifti(array, np.eye(4), path, dtype=np.uint8, overwrite=overwrite)
    data = np.ascontiguousarray(np.asarray(array).T)
    with atomic_path(path, overwrite=overwrite) as tmp:
        Image.fromarray(data.astype(np.uint8)).save(tmp, format="PNG" if str(path).lower().endswith(".png") else None)
    return Path(path)
