"""Request checks for the label server: ids are names inside the studies folder, never paths, and a
submitted label is a NIfTI volume on its image's grid holding the model's classes.

MONAI Label joins image ids, label tags and session ids onto folders (``labels/<tag>/<id>.nii.gz``)
and treats an image id that exists as a path as that file. The server therefore refuses any id that
could leave the studies folder before a request reaches MONAI Label (see :mod:`medunet.label.asgi`).
:func:`label_problems` is what the datastore asks before it stores a label and what the train task
asks before it trains on one. Importable without monailabel.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from urllib.parse import parse_qsl

__all__ = ["ID_PARAMS", "unsafe_id_reason", "check_request", "label_problems"]

#: query parameters that MONAI Label's endpoints turn into file names
ID_PARAMS = ("image", "label", "id", "tag", "session_id", "model", "model_filename")


def unsafe_id_reason(value: str) -> str | None:
    """Why ``value`` cannot be an image/label id or tag (``None`` when it is a plain name)."""
    if value in (".", ".."):
        return "is a relative folder reference"
    for ch, what in (("/", "a '/'"), ("\\", "a '\\'"), ("\x00", "a NUL byte")):
        if ch in value:
            return f"contains {what} (ids are file names in the studies folder, not paths)"
    if value.startswith("~"):
        return "starts with '~'"
    if len(value) > 255:
        return "is longer than 255 characters"
    return None


def check_request(path: str, query_string: bytes | str) -> str | None:
    """One-line reason to refuse a request with 400, or ``None``.

    Args:
        path: the decoded URL path (``%2F`` already turned into ``/``).
        query_string: the raw query string.
    """
    segments = [s for s in path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        return f"path {path!r} contains a '..' or '.' segment"
    if isinstance(query_string, bytes):
        query_string = query_string.decode("latin-1")
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        if key in ID_PARAMS and value:
            reason = unsafe_id_reason(value)
            if reason:
                return f"{key} {value!r} {reason}"
    return None


def label_problems(label_path: str | os.PathLike, image_path: str | os.PathLike,
                   classes: Iterable[int] | None = None, label_name: str | None = None) -> list[str]:
    """Why the label file at ``label_path`` cannot be a label of the image at ``image_path`` (empty: it can).

    The label must be a readable NIfTI file (``.nii``/``.nii.gz``) of one integer class value per voxel,
    on the image's grid (shape, spacing, direction, origin) and, when ``classes`` is given, hold only
    those values (background 0 included). The checks are ``medunet check-dataset``'s
    (:func:`medunet.data.check.check_case_data`); warnings (e.g. an all-background label) do not count.

    Args:
        label_path: the label file (e.g. an upload's temporary copy).
        image_path: the image it is meant for.
        classes: the class values the model predicts, or None for any non-negative value.
        label_name: how the messages name the label (default: its file name).
    """
    from medunet.data.check import check_case_data
    from medunet.io import InputError, is_nifti, read_image

    name = label_name or os.path.basename(os.fspath(label_path))
    if not is_nifti(label_path):
        return [f"label {name!r} is not a NIfTI file (.nii or .nii.gz); save the segmentation as NIfTI"]
    try:
        label = read_image(label_path)
    except InputError as e:
        return [f"label {name!r} is not a readable NIfTI volume ({e.reason})"]
    try:
        image = read_image(image_path)
    except InputError as e:
        return [f"its image cannot be read to compare grids ({e.reason})"]
    values = None if classes is None else {str(v): int(v) for v in {0, *classes}}
    problems = check_case_data([image], label, labels=values, labels_from="the model's classes")
    return [f"label {name!r}: {p.message}" for p in problems
            if p.severity == "error" and os.path.samefile(p.path, label_path)]
