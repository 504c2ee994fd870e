"""Datalists: which image goes with which label.

Three layouts are understood:

- **MSD** (Medical Segmentation Decathlon): ``dataset.json`` with ``labels`` ``{"0": "background", …}``,
  ``modality``, ``training`` ``[{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]`` and
  ``test`` ``["./imagesTs/y.nii.gz"]``. A MONAI datalist JSON (any section name, e.g. ``validation``)
  reads the same way.
- **nnU-Net v2** raw folders: ``dataset.json`` with ``labels`` ``{"background": 0, …}`` and
  ``channel_names`` but no file list; ``imagesTr/<case>_0000.nii.gz`` (one file per channel) paired with
  ``labelsTr/<case>.nii.gz``.
- **plain folders**: ``images/`` and ``labels/`` paired by file name.

Every item is a dict with absolute paths: ``{"image": str, "label": str}``; a multi-channel case in
nnU-Net layout has ``"image"`` as the list of its channel files (MONAI's ``LoadImaged`` stacks them).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medunet.io import IMAGE2D_SUFFIXES, NIFTI_SUFFIXES, InputError, image_id

__all__ = [
    "read_dataset_json", "load_datalist", "pair_folders", "kfold_split", "every_nth_split", "find_dataset_items",
    "dataset_labels", "dataset_modalities", "list_image_files", "case_id", "scan_folders", "FolderScan",
    "CHANNEL_SUFFIX",
]

#: nnU-Net's per-channel file suffix: ``case_0000.nii.gz`` is channel 0 of ``case``.
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_PATH_KEYS = ("image", "label")


def read_dataset_json(dataset_dir: str | os.PathLike) -> dict:
    """Read and minimally validate ``dataset.json`` (give its folder or the file itself).

    Raises:
        InputError: missing file, invalid JSON, not an object, or unusable ``labels``.
    """
    path = _json_path(dataset_dir)
    if not path.is_file():
        raise InputError(path, "dataset.json not found" if path.name == "dataset.json" else "datalist file not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(path, "not a text file (expected JSON)") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(meta, dict):
        raise InputError(path, f"expected a JSON object, got {type(meta).__name__}")
    if "labels" in meta:
        dataset_labels(meta, path)  # raises on unusable labels
    return meta


def dataset_labels(meta: dict, path: str | os.PathLike | None = None) -> dict[str, int]:
    """Class name → value (as :attr:`medunet.data.Plan.labels`) from MSD or nnU-Net v2 ``labels``."""
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise InputError(path, "'labels' must be a non-empty object, e.g. {\"0\": \"background\", \"1\": \"tumour\"}")
    out: dict[str, int] = {}
    for key, value in raw.items():
        if isinstance(value, str) and _is_int(key):  # MSD: {"1": "liver"}
            name, number = value, int(key)
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: {"liver": 1}
            name, number = key, value
        elif isinstance(value, list):
            raise InputError(path, f"label {key!r} is a region (list of values); region-based labels are not supported")
        else:
            raise InputError(path, f"label entry {key!r}: {value!r} is neither MSD (\"1\": \"name\") nor nnU-Net (\"name\": 1)")
        if number < 0:
            raise InputError(path, f"label {name!r} has negative value {number}")
        if name in out:
            raise InputError(path, f"label name {name!r} is used twice")
        if number in out.values():
            raise InputError(path, f"label value {number} is used twice")
        out[name] = number
    if 0 not in out.values():
        raise InputError(path, "labels have no background (value 0)")
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def dataset_modalities(meta: dict) -> dict[int, str]:
    """Channel index → modality name from MSD ``modality`` or nnU-Net v2 ``channel_names`` (may be empty)."""
    raw = meta.get("modality", meta.get("channel_names", {}))
    if not isinstance(raw, dict):
        return {}
    return {int(k): str(v) for k, v in raw.items() if _is_int(k)}


def load_datalist(dataset_dir: str | os.PathLike, section: str = "training") -> list[dict]:
    """The items of one section of a dataset, with absolute paths.

    Args:
        dataset_dir: a dataset folder holding ``dataset.json``, or a datalist JSON file.
        section: ``"training"`` (image + label required), ``"test"`` (image only, as MSD lists them),
            or any other list in the JSON (e.g. ``"validation"``).

    Returns:
        ``[{"image": "/abs/imagesTr/x.nii.gz", "label": "/abs/labelsTr/x.nii.gz", ...}]``; other
        string entries that name files (e.g. ``"instance"``) are made absolute too.

    An nnU-Net v2 ``dataset.json`` has no file list: its ``imagesTr``/``labelsTr`` (or ``imagesTs``)
    folders are paired instead.
    """
    path = _json_path(dataset_dir)
    meta = read_dataset_json(path)
    base = path.parent
    if section not in meta:
        folder = {"training": "imagesTr", "test": "imagesTs"}.get(section)
        if folder and (base / folder).is_dir():
            labels = base / "labelsTr" if section == "training" else None
            return pair_folders(base / folder, labels)
        if section == "test":
            return []
        raise InputError(path, f"has no {section!r} list (and no {folder or 'matching'} folder to pair)")
    entries = meta[section]
    if not isinstance(entries, list):
        raise InputError(path, f"{section!r} must be a list, got {type(entries).__name__}")
    items = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputError(path, f"{section}[{i}] must be a path or an object with an 'image' key")
        if section == "training" and "label" not in entry:
            raise InputError(path, f"training[{i}] has no 'label'")
        items.append({k: _resolve(base, v, path, f"{section}[{i}].{k}") if _looks_like_path(k, v) else v
                      for k, v in entry.items()})
    return items


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files (NIfTI, PNG/TIFF…) and DICOM series sub-folders in ``folder``, sorted; hidden files
    (``.``-prefixed: macOS ``._`` forks, temporary files of interrupted writes) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "folder not found" if not folder.exists() else "not a folder")
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or p.name.lower().endswith(NIFTI_SUFFIXES + IMAGE2D_SUFFIXES):
            out.append(p)
    return out


def case_id(path: str | os.PathLike) -> str:
    """The case a file belongs to: its image id without an nnU-Net channel suffix (``x_0001`` → ``x``)."""
    name = image_id(path)
    m = CHANNEL_SUFFIX.match(name)
    return m.group("case") if m else name


@dataclass
class FolderScan:
    """What pairing an image folder with a label folder found (see :func:`scan_folders`).

    Attributes:
        cases: case id → {channel index → image file}.
        labels: case id → label file.
        duplicates: ``(file, other file)`` pairs sharing one id (``x.nii`` beside ``x.nii.gz``).
        no_label / no_image: case ids with an image but no label, or a label but no image.
        channel_gaps: case id → its channel indices, for cases lacking a channel others have.
    """

    images_dir: Path
    labels_dir: Path | None
    cases: dict[str, dict[int, Path]] = field(default_factory=dict)
    labels: dict[str, Path] = field(default_factory=dict)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)
    no_label: list[str] = field(default_factory=list)
    no_image: list[str] = field(default_factory=list)
    channel_gaps: dict[str, list[int]] = field(default_factory=dict)

    @property
    def n_channels(self) -> int:
        return max((len(ch) for ch in self.cases.values()), default=0)


def scan_folders(images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None = None) -> FolderScan:
    """Group the files of ``images_dir`` into cases and match them with ``labels_dir``; reports every
    irregularity instead of stopping at the first (``pair_folders`` raises, ``check-dataset`` lists)."""
    scan = FolderScan(Path(images_dir), None if labels_dir is None else Path(labels_dir))
    if scan.labels_dir is not None:
        for p in list_image_files(scan.labels_dir):
            if p.is_dir():
                continue
            key = image_id(p)
            if key in scan.labels:
                scan.duplicates.append((p, scan.labels[key]))
            else:
                scan.labels[key] = p
    by_image_id: dict[str, Path] = {}
    for p in list_image_files(scan.images_dir):
        key = image_id(p)
        if key in by_image_id:
            scan.duplicates.append((p, by_image_id[key]))
        else:
            by_image_id[key] = p
    for key, p in by_image_id.items():
        m = CHANNEL_SUFFIX.match(key)
        # A label with the full name wins: "case_0001" may be a case id, not channel 1 of "case".
        if m is None or key in scan.labels:
            scan.cases.setdefault(key, {})[0] = p
        else:
            scan.cases.setdefault(m.group("case"), {})[int(m.group("channel"))] = p
    if scan.labels_dir is not None:
        scan.no_label = sorted(k for k in scan.cases if k not in scan.labels)
        scan.no_image = sorted(k for k in scan.labels if k not in scan.cases)
    expected = list(range(scan.n_channels))
    scan.channel_gaps = {k: sorted(ch) for k, ch in scan.cases.items() if sorted(ch) != expected}
    return scan


def pair_folders(images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None = None) -> list[dict]:
    """Pair the images in ``images_dir`` with the labels in ``labels_dir`` by file name.

    ``x.nii.gz`` pairs with ``x.nii.gz`` (or ``x.nii``, ``x.png``…); nnU-Net channel files
    ``x_0000.nii.gz``, ``x_0001.nii.gz`` pair with ``x.nii.gz`` and become ``"image": [ch0, ch1]``.
    Without ``labels_dir`` the items carry only ``"image"``.

    Raises:
        InputError: unpaired files (all of them listed), a case id present twice, or a case missing a
            channel the others have.
    """
    scan = scan_folders(images_dir, labels_dir)
    if not scan.cases:
        raise InputError(scan.images_dir, "no image files (.nii.gz, .nii, .png, .tif or DICOM folders)")
    if scan.duplicates:
        p, other = scan.duplicates[0]
        raise InputError(p, f"duplicate id {image_id(p)!r} (also {other.name})")
    if scan.no_label or scan.no_image:
        parts = []
        if scan.no_label:
            parts.append(f"{len(scan.no_label)} image(s) without label: {_names(scan.no_label)}")
        if scan.no_image:
            parts.append(f"{len(scan.no_image)} label(s) without image: {_names(scan.no_image)}")
        raise InputError(scan.images_dir, "unpaired files: " + "; ".join(parts))
    for key, channels in scan.channel_gaps.items():
        raise InputError(scan.images_dir / key, f"case has channel(s) {channels}, expected 0…{scan.n_channels - 1}")
    items = []
    for key in sorted(scan.cases):
        channels = scan.cases[key]
        image = [_absolute(channels[c]) for c in sorted(channels)]
        item = {"image": image[0] if len(image) == 1 else image}
        if scan.labels_dir is not None:
            item["label"] = _absolute(scan.labels[key])
        items.append(item)
    return items


def kfold_split(items: Sequence[dict], n_folds: int = 5, fold: int = 0, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic k-fold split: ``(train, val)`` for ``fold`` of ``n_folds``.

    Items are ordered by image path first, so the split depends only on the set of cases and the seed
    (not on listing order); folds are disjoint, cover every case and differ in size by at most one.
    Built on :func:`monai.data.partition_dataset`.
    """
    from monai.data import partition_dataset

    n = len(items)
    if not 2 <= int(n_folds) <= max(n, 2):
        raise ValueError(f"kfold_split: n_folds must be between 2 and the number of cases ({n}), got {n_folds}")
    if n < 2:
        raise ValueError(f"kfold_split: need at least 2 cases, got {n}")
    if not 0 <= int(fold) < int(n_folds):
        raise ValueError(f"kfold_split: fold must be in 0…{int(n_folds) - 1}, got {fold}")
    ordered = sorted(items, key=lambda it: str(it.get("image")))
    index_parts = partition_dataset(list(range(n)), num_partitions=int(n_folds), shuffle=True, seed=int(seed),
                                    even_divisible=False, drop_last=False)
    val_idx = set(index_parts[int(fold)])
    train = [ordered[i] for i in range(n) if i not in val_idx]
    val = [ordered[i] for i in sorted(val_idx)]
    return train, val


def every_nth_split(items: Sequence[dict], n: int = 5, fold: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic interleaved hold-out in listing order: for ``fold`` 0 the items n-1, 2n-1, … are
    validation and the rest training; fold ``f`` shifts the held-out positions by ``f`` (the n folds
    partition the items)."""
    if n < 2:
        raise ValueError(f"every_nth_split needs n >= 2, got {n}")
    if not 0 <= int(fold) < n:
        raise ValueError(f"every_nth_split: fold must be in 0…{n - 1}, got {fold}")
    held = (n - 1 + int(fold)) % n
    val = [it for i, it in enumerate(items) if i % n == held]
    train = [it for i, it in enumerate(items) if i % n != held]
    return train, val


def find_dataset_items(path: str | os.PathLike, section: str = "training") -> list[dict]:
    """Items of whatever dataset ``path`` is: a ``dataset.json``/datalist file, an MSD or nnU-Net
    folder, or a folder with ``images/`` and ``labels/`` (``labels/`` optional for ``section="test"``)."""
    path = Path(path)
    if path.is_file():
        return load_datalist(path, section)
    if not path.is_dir():
        raise InputError(path, "dataset not found")
    if (path / "dataset.json").is_file():
        return load_datalist(path, section)
    tr = "Tr" if section == "training" else "Ts"
    for images, labels in ((f"images{tr}", f"labels{tr}"), ("images", "labels")):
        if (path / images).is_dir():
            if (path / labels).is_dir():
                return pair_folders(path / images, path / labels)
            if section != "training":
                return pair_folders(path / images)
            raise InputError(path / labels, "label folder not found")
    raise InputError(path, "not a dataset: expected dataset.json (MSD/nnU-Net), imagesTr/ + labelsTr/, "
                           "or images/ + labels/")


def _json_path(dataset_dir: str | os.PathLike) -> Path:
    p = Path(dataset_dir)
    return p if p.suffix.lower() == ".json" else p / "dataset.json"


def _is_int(s) -> bool:
    try:
        int(s)
    except (TypeError, ValueError):
        return False
    return True


def _looks_like_path(key: str, value) -> bool:
    if key in _PATH_KEYS:
        return True
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(isinstance(v, str) and v.lower().endswith(NIFTI_SUFFIXES + IMAGE2D_SUFFIXES)
                                for v in values)


def _resolve(base: Path, value, json_path: Path, where: str):
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [_absolute(base / v) for v in value]
    if not isinstance(value, str) or not value:
        raise InputError(json_path, f"{where} must be a file path, got {value!r}")
    return _absolute(base / value)


def _absolute(path: str | os.PathLike) -> str:
    """Absolute and normalised (``./`` and ``..`` removed) but with symbolic links kept, so a linked
    file keeps its own name (and case id)."""
    return os.path.abspath(path)


def _names(keys: list[str], most: int = 8) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f", … ({len(keys) - most} more)" if len(keys) > most else "")
