"""Dataset integrity check (``medunet check-dataset DIR``), in the spirit of nnU-Net's
``verify_dataset_integrity``: every problem is reported, one line each, naming the file.

What is checked:

- the layout: ``dataset.json`` present and valid (labels, modality/channel names, ``numTraining``,
  ``numTest``), every listed file present, files in the folders that the list leaves out, duplicate ids,
  images without labels and labels without images, missing channels (nnU-Net ``_0000`` files);
- every image: readable (not corrupt, truncated, zero-byte, unreadable), finite voxels, positive finite
  spacing, non-singular affine, 3D where 3D is expected (not 4D/2D), channel count vs the modalities,
  constant intensity (warning), sform/qform disagreement and sheared grids (warnings);
- every label: readable, integer values, values declared in ``dataset.json``, same shape and geometry
  (spacing, origin, direction) as its image, not empty (warning); an ``instance`` map (cells) has the
  label's shape and foreground.

Example::

    >>> problems = check_dataset("/data/Task04_Hippocampus")      # doctest: +SKIP
    >>> print(problems.summary())                                  # doctest: +SKIP
    /data/Task04_Hippocampus: 260 case(s) checked, no problems
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medunet.data.datalist import (
    FolderScan,
    dataset_labels,
    dataset_modalities,
    image_id,
    load_datalist,
    read_dataset_json,
    scan_folders,
)
from medunet.io import ImageData, InputError, read_image

__all__ = ["Problem", "CheckResult", "check_dataset", "check_case_data", "summarize", "PROBLEM_KINDS"]

#: every kind of problem the check reports, with what it means
PROBLEM_KINDS = {
    "not-a-dataset": "the folder does not exist or holds no dataset",
    "dataset-json-missing": "imagesTr/ exists but dataset.json does not",
    "dataset-json-invalid": "dataset.json is not valid JSON or lacks/garbles required keys",
    "num-training": "numTraining disagrees with the training cases",
    "num-test": "numTest disagrees with the test cases",
    "missing-file": "a file listed in dataset.json does not exist",
    "missing-label": "an image without a label",
    "missing-image": "a label without an image",
    "missing-channel": "a case lacks one of the channel files the others have",
    "duplicate-id": "two files or two entries share one case id",
    "unlisted-file": "a file in imagesTr/labelsTr that dataset.json does not list (warning)",
    "unreadable": "corrupt, truncated or unreadable file, or an unknown format",
    "empty-file": "zero-byte file",
    "too-large": "the header claims a volume beyond the memory budget",
    "bad-spacing": "zero, negative or NaN voxel spacing",
    "singular-affine": "voxel-to-world matrix is singular or not finite",
    "nan-inf": "NaN or Inf voxel values",
    "dimensions": "4D where 3D is expected, 2D where 3D is expected, or a 4D label",
    "channel-count": "number of channels differs from the modalities in dataset.json",
    "shape-mismatch": "label (or channel) shape differs from the image",
    "affine-mismatch": "label (or channel) spacing, origin or direction differs from the image",
    "label-values": "label values not declared in dataset.json labels (or negative)",
    "label-non-integer": "label holds fractional values",
    "label-empty": "label is all background (warning)",
    "constant-image": "image has one value everywhere (warning)",
    "sform-qform": "NIfTI sform and qform both set but disagree (warning)",
    "sheared-affine": "voxel axes are not orthogonal (warning)",
}
_WARNINGS = {"unlisted-file", "label-empty", "constant-image", "sform-qform", "sheared-affine"}


@dataclass(frozen=True)
class Problem:
    """One finding. ``str()`` is one line: ``error: <path>: <message> [<kind>]``."""

    path: str
    kind: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message} [{self.kind}]"


class CheckResult(list):
    """The problems found (a ``list[Problem]``) plus how many cases were checked."""

    def __init__(self, dataset_dir: str | os.PathLike) -> None:
        super().__init__()
        self.dataset_dir = str(dataset_dir)
        self.cases_checked = 0

    def add(self, path, kind: str, message: str) -> None:
        assert kind in PROBLEM_KINDS, kind
        self.append(Problem(os.fspath(path), kind, " ".join(str(message).split()),
                            "warning" if kind in _WARNINGS else "error"))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self if p.severity == "warning"]

    def summary(self) -> str:
        return summarize(self.dataset_dir, self, self.cases_checked)


def summarize(dataset_dir: str | os.PathLike, problems: list[Problem], cases_checked: int | None = None) -> str:
    """One closing line: how many cases, errors and warnings, by kind."""
    if cases_checked is None:
        cases_checked = getattr(problems, "cases_checked", None)
    checked = f"{cases_checked} case(s) checked" if cases_checked is not None else "checked"
    if not problems:
        return f"{dataset_dir}: {checked}, no problems"
    n_err = sum(p.severity == "error" for p in problems)
    kinds = Counter(p.kind for p in problems)
    by_kind = ", ".join(f"{k} ×{n}" for k, n in sorted(kinds.items()))
    return f"{dataset_dir}: {checked}, {n_err} error(s), {len(problems) - n_err} warning(s) ({by_kind})"


@dataclass
class _Case:
    case_id: str
    images: list[Path]
    label: Path | None
    section: str  # "training" or "test"
    ndims: dict[Path, int] = field(default_factory=dict)  # array dimensions of each readable image
    instance: Path | None = None  # instance map (cells): same grid as the label, same foreground


@dataclass
class _Expect:
    labels: dict[str, int] | None = None
    channels: int | None = None  # modalities declared in dataset.json
    spatial_dims: int | None = None  # from tensorImageSize
    one_file_per_channel: bool = False  # nnU-Net layout
    labels_from: str = "dataset.json labels"  # where ``labels`` were declared, for the messages


def check_dataset(dataset_dir: str | os.PathLike) -> CheckResult:
    """Check a dataset folder (MSD or nnU-Net v2 layout, or ``images/`` + ``labels/``).

    Returns:
        :class:`CheckResult`, a list of :class:`Problem` (empty when the dataset is clean); every
        problem names the offending file. Nothing raises for bad data.
    """
    root = Path(dataset_dir)
    result = CheckResult(root)
    if not root.is_dir():
        result.add(root, "not-a-dataset", "dataset folder not found" if not root.exists() else "not a folder")
        return result
    expect = _Expect()
    cases = _collect_cases(root, result, expect)
    for case in cases:
        _check_case(case, expect, result)
    result.cases_checked = len(cases)
    _check_dimension_consistency(cases, expect, result)
    return result


# -- layout ----------------------------------------------------------------------------------------
def _collect_cases(root: Path, result: CheckResult, expect: _Expect) -> list[_Case]:
    json_path = root / "dataset.json"
    if not json_path.exists():
        if (root / "imagesTr").is_dir():
            result.add(json_path, "dataset-json-missing", "dataset.json not found (MSD/nnU-Net layout needs it)")
            return _scan_cases(root / "imagesTr", root / "labelsTr", "training", result, expect)
        if (root / "images").is_dir():
            labels = root / "labels"
            return _scan_cases(root / "images", labels if labels.is_dir() else None, "training", result, expect)
        empty = not any(root.iterdir())
        result.add(root, "not-a-dataset", ("empty folder: " if empty else "")
                   + "no dataset.json, imagesTr/ or images/ found")
        return []

    try:
        meta = read_dataset_json(root)
    except InputError as e:
        result.add(json_path, "dataset-json-invalid", e.reason)
        meta = None
    if meta is None:
        return _scan_cases(root / "imagesTr", root / "labelsTr", "training", result, expect) \
            if (root / "imagesTr").is_dir() else []
    _read_expectations(meta, json_path, result, expect)

    cases: list[_Case] = []
    for section, num_key, folder in (("training", "numTraining", "Tr"), ("test", "numTest", "Ts")):
        if section in meta:
            found = _listed_cases(root, json_path, section, result, expect)
            if section == "test":
                _pair_test_labels(root, found)
            _check_unlisted(root, folder, found, result)
        elif section == "training" and (root / "imagesTr").is_dir():  # nnU-Net v2 lists no files
            found = _scan_cases(root / "imagesTr", root / "labelsTr", "training", result, expect)
        elif section == "test" and (root / "imagesTs").is_dir():
            found = _scan_cases(root / "imagesTs", None, "test", result, expect)
        else:
            if section == "training":
                result.add(json_path, "dataset-json-invalid", "no 'training' list and no imagesTr/ folder")
            found = []
        declared = meta.get(num_key)
        if declared is not None and (not isinstance(declared, int) or declared != len(found)):
            kind = "num-training" if section == "training" else "num-test"
            result.add(json_path, kind, f"{num_key} is {declared!r} but there are {len(found)} {section} case(s)")
        cases += found
    _check_duplicate_ids(cases, result)
    _pair_test_labels(root, cases)  # nnU-Net layout: imagesTs scanned without labels
    if not any(c.section == "training" for c in cases) and "training" in meta:
        result.add(json_path, "dataset-json-invalid", "the 'training' list is empty")
    return cases


def _read_expectations(meta: dict, json_path: Path, result: CheckResult, expect: _Expect) -> None:
    if "labels" not in meta:
        result.add(json_path, "dataset-json-invalid", "no 'labels' (e.g. {\"0\": \"background\", \"1\": \"organ\"})")
    else:
        expect.labels = dataset_labels(meta, json_path)  # validated by read_dataset_json
    modalities = dataset_modalities(meta)
    if "modality" not in meta and "channel_names" not in meta:
        result.add(json_path, "dataset-json-invalid", "no 'modality' (MSD) or 'channel_names' (nnU-Net)")
    elif not modalities:
        result.add(json_path, "dataset-json-invalid", "'modality' must map channel indices to names, e.g. {\"0\": \"CT\"}")
    else:
        expect.channels = len(modalities)
    size = str(meta.get("tensorImageSize", "")).upper()
    if size in ("2D", "3D"):
        expect.spatial_dims = int(size[0])
    elif size == "4D":  # MSD multi-modal: 3D volumes with a channel axis
        expect.spatial_dims = 3


def _listed_cases(root: Path, json_path: Path, section: str, result: CheckResult, expect: _Expect) -> list[_Case]:
    try:
        items = load_datalist(root, section)
    except InputError as e:
        result.add(json_path, "dataset-json-invalid", e.reason)
        return []
    cases = []
    for item in items:
        images = [Path(p) for p in (item["image"] if isinstance(item["image"], list) else [item["image"]])]
        label = Path(item["label"]) if item.get("label") else None
        instance = Path(item["instance"]) if isinstance(item.get("instance"), str) else None
        missing = [p for p in images + [q for q in (label, instance) if q] if not os.path.lexists(p)]
        for p in missing:
            result.add(p, "missing-file", f"listed in dataset.json {section} but not found")
        label_ok = label is not None and label not in missing
        cases.append(_Case(image_id(images[0]), [p for p in images if p not in missing],
                           label if label_ok else None, section,
                           instance=instance if instance is not None and instance not in missing else None))
    if len(images_of := [c.images[0] for c in cases if c.images]) != len(set(images_of)):
        for path, n in Counter(images_of).items():
            if n > 1:
                result.add(path, "duplicate-id", f"listed {n} times in dataset.json {section}")
    expect.one_file_per_channel = expect.one_file_per_channel or any(len(c.images) > 1 for c in cases)
    return [c for c in cases if c.images]


def _check_unlisted(root: Path, folder: str, cases: list[_Case], result: CheckResult) -> None:
    listed = {os.path.abspath(p) for c in cases for p in c.images + ([c.label] if c.label else [])}
    for sub in (f"images{folder}", f"labels{folder}"):
        if not (root / sub).is_dir():
            continue
        scan = scan_folders(root / sub)
        for p, other in scan.duplicates:
            result.add(p, "duplicate-id", f"same case id as {other.name} (which one is meant?)")
        for channels in scan.cases.values():
            for p in channels.values():
                if os.path.abspath(p) not in listed:
                    result.add(p, "unlisted-file", "not listed in dataset.json (ignored by training)")


def _scan_cases(images_dir: Path, labels_dir: Path | None, section: str, result: CheckResult,
                expect: _Expect) -> list[_Case]:
    if not images_dir.is_dir():
        result.add(images_dir, "not-a-dataset", "image folder not found")
        return []
    if labels_dir is not None and not labels_dir.is_dir():
        result.add(labels_dir, "missing-label", "label folder not found")
        labels_dir = None
    scan: FolderScan = scan_folders(images_dir, labels_dir)
    if not scan.cases:
        result.add(images_dir, "not-a-dataset", "no image files (.nii.gz, .nii, .png, .tif or DICOM folders)")
    for p, other in scan.duplicates:
        result.add(p, "duplicate-id", f"same case id as {other.name}")
    for key in scan.no_label:
        first = scan.cases[key][min(scan.cases[key])]
        result.add(first, "missing-label", f"no label {key}.* in {labels_dir}")
    for key in scan.no_image:
        result.add(scan.labels[key], "missing-image", f"no image {key}.* (or {key}_0000.*) in {images_dir}")
    for key, channels in scan.channel_gaps.items():
        first = scan.cases[key][channels[0]]
        result.add(first, "missing-channel", f"case {key} has channel(s) {channels}, expected 0…{scan.n_channels - 1}")
    # nnU-Net naming (x_0000 → case x) means one file per channel
    if any(image_id(p) != key for key, ch in scan.cases.items() for p in ch.values()):
        expect.one_file_per_channel = True
    return [_Case(key, [ch[c] for c in sorted(ch)], scan.labels.get(key), section)
            for key, ch in sorted(scan.cases.items())]


def _check_duplicate_ids(cases: list[_Case], result: CheckResult) -> None:
    seen: dict[str, _Case] = {}
    for case in cases:
        if case.case_id in seen and seen[case.case_id].images[0] != case.images[0]:
            result.add(case.images[0], "duplicate-id",
                       f"case id {case.case_id!r} also used by {seen[case.case_id].images[0]}")
        seen.setdefault(case.case_id, case)


def _pair_test_labels(root: Path, cases: list[_Case]) -> None:
    """Test cases get their ground truth from labelsTs/ when it exists (MSD lists images only)."""
    labels_ts = root / "labelsTs"
    if not labels_ts.is_dir():
        return
    by_id = {image_id(p): p for p in labels_ts.iterdir() if not p.name.startswith(".")}
    for case in cases:
        if case.section == "test" and case.label is None:
            case.label = by_id.get(case.case_id)


# -- per case --------------------------------------------------------------------------------------
def _read(path: Path, result: CheckResult):
    """``read_image`` with every refusal turned into a classified problem (None when unreadable)."""
    try:
        return read_image(path, check_finite=False)
    except InputError as e:
        result.add(e.path or path, _classify(e.reason), e.reason)
    except Exception as e:  # anything a reader library throws must still become one line
        result.add(path, "unreadable", f"{type(e).__name__}: {e}")
    return None


def _classify(reason: str) -> str:
    r = reason.lower()
    for pattern, kind in (
        (r"no such file|not found|broken or looping|link loop", "missing-file"),
        (r"empty file \(0 bytes\)", "empty-file"),
        (r"too large|memory budget|exceed", "too-large"),
        (r"spacing|pixdim", "bad-spacing"),
        (r"singular|affine contains nan|affine must be", "singular-affine"),
        (r"nan|inf", "nan-inf"),
    ):
        if re.search(pattern, r):
            return kind
    return "unreadable"


def _check_case(case: _Case, expect: _Expect, result: CheckResult) -> None:
    declared = expect.channels
    if expect.one_file_per_channel and declared and len(case.images) != declared:
        result.add(case.images[0], "channel-count", f"case {case.case_id} has {len(case.images)} channel file(s) "
                                                    f"but dataset.json declares {declared} channels")
    images = [image for path in case.images if (image := _read(path, result)) is not None]
    label = _read(case.label, result) if case.label is not None else None
    _check_read_case(images, label, expect, result)
    case.ndims.update({Path(image.path): image.array.ndim for image in images})
    if label is not None and case.instance is not None and (instance := _read(case.instance, result)) is not None:
        _check_instances(instance, case.instance, label, result)


def _check_read_case(images: list, label, expect: _Expect, result: CheckResult) -> None:
    """The checks of one case whose files are read: each image (channel files on one grid), the label."""
    reference = None
    for image in images:
        _check_image(image, Path(image.path), expect, result)
        if reference is None:
            reference = image
        else:  # another channel file of the same case must share the grid
            _compare_geometry(image, Path(image.path), reference, f"channel 0 ({Path(reference.path).name})", result)
    if label is None:
        return
    _check_label(label, Path(label.path), expect, result)
    if reference is not None:
        _compare_geometry(label, Path(label.path), reference, f"its image ({Path(reference.path).name})", result)


def check_case_data(images: Sequence[ImageData], label: ImageData | None = None, *,
                    labels: dict[str, int] | None = None, channels: int | None = None,
                    spatial_dims: int | None = None, labels_from: str = "dataset.json labels") -> list[Problem]:
    """:func:`check_dataset`'s per-case checks on files already read (for callers that read them anyway,
    e.g. planning).

    Args:
        images: the case's image(s): one file, or one file per channel (all on one grid).
        label: its label, or None.
        labels: class name → value declared by ``dataset.json`` (None: any non-negative value).
        channels: modalities declared by ``dataset.json`` (None: one channel, no 4D image).
        spatial_dims: 2 or 3 when ``tensorImageSize`` declares it.
        labels_from: what declared ``labels``, as the messages name it (e.g. "the model's classes").

    Returns:
        the problems (errors and warnings), each naming its file.
    """
    expect = _Expect(labels=labels, channels=channels, spatial_dims=spatial_dims,
                     one_file_per_channel=len(images) > 1, labels_from=labels_from)
    result = CheckResult("")
    _check_read_case(list(images), label, expect, result)
    return list(result)


def _check_image(image, path: Path, expect: _Expect, result: CheckResult) -> int:
    """Check one image file; returns its number of array dimensions."""
    arr = image.array
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            result.add(path, "nan-inf", f"{bad} NaN/Inf voxel(s)")
            arr = np.nan_to_num(arr)
    ndim = arr.ndim
    want_dims = expect.spatial_dims
    channels = arr.shape[3] if ndim == 4 else 1
    declared = expect.channels
    if ndim == 4:
        if (declared or 1) == 1 or expect.one_file_per_channel:
            result.add(path, "dimensions", f"4D image {arr.shape} where a 3D volume is expected "
                                           f"(dataset.json declares {declared or 1} channel(s), one file per case)")
        elif channels != declared:
            result.add(path, "channel-count", f"{channels} channels on the 4th axis but dataset.json declares "
                                              f"{declared} modalities")
    elif ndim > 4:
        result.add(path, "dimensions", f"{ndim}D image {arr.shape}; expected 3D (or 4D with channels)")
    else:
        if want_dims is not None and ndim != want_dims:
            result.add(path, "dimensions", f"{ndim}D image {arr.shape} where a {want_dims}D "
                                           f"{'volume' if want_dims == 3 else 'image'} is expected")
        if declared and declared > 1 and not expect.one_file_per_channel:
            result.add(path, "channel-count", f"1 channel but dataset.json declares {declared} modalities "
                                              f"(stack them on a 4th axis or use _0000… files)")
    if arr.size and float(arr.min()) == float(arr.max()):
        result.add(path, "constant-image", f"every voxel is {float(arr.min()):g}: no contrast")
    _check_header(image, path, result)
    return ndim


def _check_header(image, path: Path, result: CheckResult) -> None:
    spatial = image.affine[:3, :3]
    cols = spatial / np.maximum(np.linalg.norm(spatial, axis=0, keepdims=True), 1e-12)
    off = np.abs(cols.T @ cols - np.eye(3))
    if image.spatial_dims == 3 and float(off.max()) > 1e-3:
        result.add(path, "sheared-affine", f"voxel axes are not orthogonal (max cosine {float(off.max()):.3f})")
    header = image.header
    if header is None:
        return
    raw = _raw_pixdim(path)
    ndim = min(int(raw[0]), 3) if raw is not None and 1 <= int(raw[0]) <= 7 else 0
    if ndim and np.any(raw[1:ndim + 1] < 0):
        # nibabel silently takes the absolute value; a negative pixdim means a broken writer
        result.add(path, "bad-spacing", f"negative voxel spacing in the header (pixdim {_fmt(raw[1:ndim + 1])})")
    if int(header["sform_code"]) > 0 and int(header["qform_code"]) > 0:
        diff = float(np.abs(header.get_sform() - header.get_qform()).max())
        if diff > 1e-3:
            result.add(path, "sform-qform", f"sform and qform disagree by up to {diff:.3g} (the sform is used)")


def _raw_pixdim(path: Path) -> np.ndarray | None:
    """``dim[0]`` followed by ``pixdim[1:8]`` exactly as stored (nibabel's loader fixes negative values)."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as fh:
            header = nib.Nifti1Header.from_fileobj(fh, check=False)
    except Exception:  # the reader already reported an unreadable header
        return None
    return np.concatenate([[float(header["dim"][0])], np.asarray(header["pixdim"][1:8], dtype=np.float64)])


def _check_label(label, path: Path, expect: _Expect, result: CheckResult) -> None:
    arr = label.array
    if arr.ndim == 4:
        result.add(path, "dimensions", f"4D label {arr.shape}; a label is one 3D volume of class values")
        return
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            result.add(path, "nan-inf", f"{int(arr.size - finite.sum())} NaN/Inf voxel(s) in the label")
            arr = np.where(finite, arr, 0)
        fractional = np.abs(arr - np.rint(arr)) > 1e-3
        if fractional.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(arr[fractional])[:3])
            result.add(path, "label-non-integer", f"{int(fractional.sum())} voxel(s) with non-integer values "
                                                  f"(e.g. {examples}); labels must be integer class values")
        arr = np.rint(arr)
    values = np.unique(arr).astype(np.int64)
    if expect.labels is not None:
        allowed = set(expect.labels.values())
        stray = [int(v) for v in values if int(v) not in allowed]
        if stray:
            result.add(path, "label-values", f"value(s) {stray} not declared in {expect.labels_from} "
                                             f"{sorted(allowed)}")
    elif values.size and values.min() < 0:
        result.add(path, "label-values", f"negative label value(s) {[int(v) for v in values if v < 0]}")
    if values.size and values.max() == 0:
        result.add(path, "label-empty", "label is all background (no foreground voxel)")


def _check_instances(instance, path: Path, label, result: CheckResult) -> None:
    """An instance map must cover exactly the label's foreground (one id per object)."""
    if instance.spatial_shape != label.spatial_shape:
        result.add(path, "shape-mismatch", f"instance map shape {instance.spatial_shape} differs from its label "
                                           f"{label.spatial_shape}")
        return
    differ = int(np.count_nonzero((instance.array > 0) != (label.array > 0)))
    if differ:
        result.add(path, "label-values", f"instance map foreground differs from its label's in {differ} voxel(s)")


def _compare_geometry(other, path: Path, reference, what: str, result: CheckResult) -> None:
    shape, ref_shape = other.spatial_shape, reference.spatial_shape
    if shape != ref_shape:
        result.add(path, "shape-mismatch", f"shape {shape} differs from {what} {ref_shape}")
        return
    a, b = other.affine, reference.affine
    sp_a, sp_b = other.spacing, reference.spacing
    if not np.allclose(sp_a, sp_b, rtol=1e-4, atol=1e-5):
        result.add(path, "affine-mismatch", f"spacing {_fmt(sp_a)} differs from {what} {_fmt(sp_b)}")
        return
    dirs_a = a[:3, :3] / np.asarray(sp_a + (1.0,) * (3 - len(sp_a)))[None, :]
    dirs_b = b[:3, :3] / np.asarray(sp_b + (1.0,) * (3 - len(sp_b)))[None, :]
    if not np.allclose(dirs_a, dirs_b, atol=1e-4):
        import nibabel as nib

        codes = "".join(nib.aff2axcodes(a)), "".join(nib.aff2axcodes(b))
        result.add(path, "affine-mismatch", f"direction/orientation differs from {what} ({codes[0]} vs {codes[1]})")
        return
    shift = float(np.linalg.norm(a[:3, 3] - b[:3, 3]))
    if shift > 1e-3 + 1e-5 * float(np.abs(b[:3, 3]).max()):
        result.add(path, "affine-mismatch", f"origin {_fmt(a[:3, 3])} is {shift:.3g} mm away from {what}'s "
                                            f"{_fmt(b[:3, 3])}")


def _check_dimension_consistency(cases: list[_Case], expect: _Expect, result: CheckResult) -> None:
    """Without tensorImageSize, the majority decides whether the dataset is 2D or 3D."""
    if expect.spatial_dims is not None:
        return
    dims = Counter(min(nd, 3) for case in cases for nd in case.ndims.values())
    if len(dims) > 1:
        majority = dims.most_common(1)[0][0]
        for case in cases:
            for p, nd in case.ndims.items():
                if min(nd, 3) != majority:
                    result.add(p, "dimensions", f"{nd}D image in a dataset of {majority}D images")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
