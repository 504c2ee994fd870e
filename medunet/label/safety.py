"""Request checks for the label server: ids are names inside the studies folder, never paths.

MONAI Label joins image ids, label tags and session ids onto folders (``labels/<tag>/<id>.nii.gz``)
and treats an image id that exists as a path as that file. The server therefore refuses any id that
could leave the studies folder before a request reaches MONAI Label (see :mod:`medunet.label.asgi`).
Pure Python: importable without monailabel.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

__all__ = ["ID_PARAMS", "unsafe_id_reason", "check_request"]

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
