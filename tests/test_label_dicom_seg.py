"""What the label server's DICOM SEG answers are made of (:mod:`medunet.label.dicom_seg`), without monailabel:
the request's format, the series folder of a study (local or DICOMweb cache layout), the SEG file itself,
and which studies-folder entries are DICOM series (:func:`medunet.io.dicom.files.is_image_series_folder`)."""

from __future__ import annotations

import json
from pathlib import Path

import dicom_support
import highdicom as hd
import numpy as np
import pytest

from medunet.io import InputError, read_image, write_nifti
from medunet.io.dicom.files import is_image_series_folder
from medunet.label.dicom_seg import (
    dicom_series_folder,
    requested_format,
    with_dicom_seg,
    write_dicom_seg_answer,
)

LABELS = {"background": 0, "liver": 1, "kidney": 2}


@pytest.mark.parametrize("value, expected", [(None, "nifti"), ("", "nifti"), ("nifti", "nifti"), ("NII", "nifti"),
                                             ("dicom-seg", "dicom-seg"), ("dicom_seg", "dicom-seg"),
                                             ("seg", "dicom-seg"), (["dicom-seg"], "dicom-seg")])
def test_requested_format(value, expected):
    assert requested_format({} if value is None else {"output_format": value}) == expected


@pytest.mark.parametrize("value", ["png", "rtstruct", "nifti,dicom-seg", ",", 7])
def test_requested_format_refuses_other_formats_in_one_line(value):
    with pytest.raises(ValueError, match=r"^output_format .*: /infer answers with one of nifti, dicom-seg$"):
        requested_format({"output_format": value})


def test_with_dicom_seg_sets_the_param_and_keeps_the_others():
    assert json.loads(with_dicom_seg('{"tta": true}')) == {"tta": True, "output_format": "dicom-seg"}
    assert json.loads(with_dicom_seg("")) == {"output_format": "dicom-seg"}
    assert json.loads(with_dicom_seg('{"output_format": "seg"}')) == {"output_format": "dicom-seg"}
    with pytest.raises(ValueError, match="output=dicom_seg but params say output_format 'nifti'"):
        with_dicom_seg('{"output_format": "nifti"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        with_dicom_seg("{tta")
    with pytest.raises(ValueError, match="JSON object, not list"):
        with_dicom_seg("[1]")


def test_dicom_series_folder_local_and_dicomweb_cache(tmp_path):
    series = dicom_support.write_ct_series(tmp_path / "studies" / "1.2.3.4", shape=(8, 8, 3))
    nifti = tmp_path / "studies" / "case.nii.gz"
    nifti.write_bytes(b"")
    assert dicom_series_folder(series.folder) == series.folder  # a series folder study
    assert dicom_series_folder(nifti, tmp_path / "studies", "case") is None  # a NIfTI study
    # DICOMweb: the image is a NIfTI converted elsewhere; the series is cached as <images dir>/<series uid>/
    assert dicom_series_folder(tmp_path / "tmp123.nii.gz", tmp_path / "studies", "1.2.3.4") == series.folder
    assert dicom_series_folder(nifti) is None


def test_is_image_series_folder(tmp_path):
    series = dicom_support.write_ct_series(tmp_path / "series", shape=(8, 8, 3))
    assert is_image_series_folder(series.folder)
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not DICOM")
    assert not is_image_series_folder(tmp_path / "empty")
    assert not is_image_series_folder(tmp_path / "text")
    assert not is_image_series_folder(tmp_path / "missing")


def test_write_dicom_seg_answer_references_the_series(tmp_path):
    series = dicom_support.write_ct_series(tmp_path / "ct", shape=(16, 12, 4), direction=dicom_support.rotation(20.0))
    image = read_image(series.folder)
    label = np.zeros(image.spatial_shape, np.uint8)
    label[2:7, 3:9, 1:3] = 1
    label[10:14, 1:4, 3] = 2
    path, info = write_dicom_seg_answer(label, image, LABELS, name="my study")
    assert Path(path).name.startswith("my_study_") and path.endswith("_seg.dcm")
    assert info == {"output_format": "dicom-seg", "referenced_series": series.series}
    seg = hd.seg.segread(path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]  # slice order k = 0, 1, ...
    for number in (1, 2):
        frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number])
        np.testing.assert_array_equal(np.transpose(frames[..., 0], (2, 1, 0)), label == number)
    Path(path).unlink()
    nifti = tmp_path / "x.nii.gz"
    write_nifti(label, image.affine, nifti)
    with pytest.raises(InputError, match="needs a DICOM series input"):
        write_dicom_seg_answer(label, read_image(nifti), LABELS, name="x")
    assert not list(Path(path).parent.glob("x_*_seg.dcm"))
