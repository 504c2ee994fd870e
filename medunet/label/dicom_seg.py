"""DICOM SEG answers of the label server's ``/infer``, for studies that are DICOM series.

A client asks for a DICOM SEG instead of the NIfTI label in either of two ways:

* MONAI Label's own REST convention, ``POST /infer/<model>?image=<id>&output=dicom_seg`` (what its
  ``ResultType.dicom_seg`` names; :mod:`medunet.label.asgi` turns it into the request parameter below);
* the request parameter ``"output_format": "dicom-seg"`` (for clients that only send params, such as
  ``MONAILabelClient.infer``); ``"nifti"`` is the default.

The study must be a DICOM series: a series folder in the studies folder (listed as an image by
:class:`medunet.label.main.MedunetDatastore`), or a series of a DICOMweb datastore (MONAI Label caches
it as ``<cache>/<series uid>/`` next to the NIfTI it converts it to). The SEG is the one ``medunet
segment --format dicom-seg`` writes (:func:`medunet.io.dicom.outputs.build_dicom_outputs`): one
segment per class of the plan, every frame referencing its source slice of that series.

Importable without monailabel (errors are plain ``ValueError``; the app turns them into HTTP 400).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medunet.io.image import ImageData

__all__ = ["OUTPUT_FORMAT_PARAM", "LABEL_FORMATS", "requested_format", "with_dicom_seg", "dicom_series_folder",
           "write_dicom_seg_answer"]

#: the request parameter that chooses the /infer answer's format
OUTPUT_FORMAT_PARAM = "output_format"
#: the formats /infer answers in (the first is the default)
LABEL_FORMATS = ("nifti", "dicom-seg")


def requested_format(request: Mapping) -> str:
    """``"nifti"`` or ``"dicom-seg"``: the request's ``output_format`` (names as ``medunet segment --format``
    takes them, ``dicom_seg``, ``seg`` and ``nii`` too); ``"nifti"`` when absent.

    Raises:
        ValueError: another format, or more than one.
    """
    from medunet.io.dicom.outputs import parse_formats

    value = request.get(OUTPUT_FORMAT_PARAM)
    if value is None or value == "":
        return LABEL_FORMATS[0]
    try:
        items = [value] if isinstance(value, str) else [str(v) for v in value]
        formats = parse_formats([v.replace("_", "-") for v in items])  # MONAI Label spells it dicom_seg
    except (TypeError, ValueError):
        formats = ()
    if len(formats) != 1 or formats[0] not in LABEL_FORMATS:
        raise ValueError(f"{OUTPUT_FORMAT_PARAM} {value!r}: /infer answers with one of {', '.join(LABEL_FORMATS)}")
    return formats[0]


def with_dicom_seg(params: str | None) -> str:
    """The ``params`` form field (JSON text) of a request sent with ``?output=dicom_seg``, with
    ``output_format`` set to ``dicom-seg``.

    Raises:
        ValueError: ``params`` is not a JSON object, or it asks for another format.
    """
    try:
        values = json.loads(params) if params else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"params is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(values, dict):
        raise ValueError(f"params must be a JSON object, not {type(values).__name__}")
    if OUTPUT_FORMAT_PARAM in values and requested_format(values) != "dicom-seg":
        raise ValueError(f"output=dicom_seg but params say {OUTPUT_FORMAT_PARAM} {values[OUTPUT_FORMAT_PARAM]!r}")
    values[OUTPUT_FORMAT_PARAM] = "dicom-seg"
    return json.dumps(values)


def dicom_series_folder(image_uri: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                        image_id: str | None = None) -> Path | None:
    """The DICOM series folder a study's image comes from, or ``None`` when it is not a DICOM series.

    Args:
        image_uri: what the datastore gives for the study (``get_image_uri``): a series folder itself
            (a local series study; a DICOMweb datastore that keeps DICOM), or a NIfTI file.
        images_dir: the datastore's image folder; with ``image_id``, ``<images_dir>/<image_id>/`` is
            where a DICOMweb datastore caches the series it converted to ``image_uri``.
        image_id: the study's id.
    """
    if image_uri and Path(image_uri).is_dir():
        return Path(image_uri)
    if images_dir and image_id:
        cached = Path(images_dir) / image_id
        if cached.is_dir():
            return cached
    return None


def write_dicom_seg_answer(label: np.ndarray, image: ImageData, labels: Mapping, name: str = "") -> tuple[str, dict]:
    """Write the DICOM SEG of ``label`` for the series ``image`` was read from to a new temporary file.

    Args:
        label: ``(X, Y, Z)`` class values on ``image``'s grid (the Predictor's label).
        image: the series as :func:`medunet.io.image.read_dicom_series` read it.
        labels: the plan's ``{name: value}`` (segment number = value, background left out).
        name: the study's name, which starts the file name (``<name>_…_seg.dcm``).

    Returns:
        ``(path of the .dcm file, {"output_format": "dicom-seg", "referenced_series": series UID})``.

    Raises:
        medunet.io.InputError: ``image`` was not read from a DICOM series.
    """
    from medunet.io.dicom.outputs import build_dicom_outputs, write_dicom_outputs

    built = build_dicom_outputs(label, image, ["dicom-seg"], labels)  # raises before any file is made
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]
    handle, out = tempfile.mkstemp(prefix=f"{stem}_" if stem else "tmp", suffix="_seg.dcm")
    os.close(handle)
    try:
        write_dicom_outputs(built, {"dicom-seg": Path(out)})
    except BaseException:
        Path(out).unlink(missing_ok=True)
        raise
    series = str(built["dicom-seg"].ReferencedSeriesSequence[0].SeriesInstanceUID)
    return out, {OUTPUT_FORMAT_PARAM: "dicom-seg", "referenced_series": series}
