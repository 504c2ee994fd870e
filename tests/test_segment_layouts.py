"""``medunet segment`` on the folder layouts users have: a folder of patient folders (NIfTI files, DICOM
slices, or both), equal file names in different patients, output sub-folders that cannot be made; and
2D inputs' probability and uncertainty maps written as float32 TIFFs of the input's size."""

from __future__ import annotations

import time
from pathlib import Path

import hostile
import nibabel as nib
import numpy as np
from hostile import write_good_image
from reliability_support import assert_nothing_partial, run_cli, segment_argv

from medunet.data import Plan
from medunet.inference.predictor import scan_input_folders
from medunet.io import read_image, save_checkpoint


def _assert_label_of(label_path: Path, image_path: Path) -> None:
    """The label exists with the image's grid (shape, affine) and uint8 voxels."""
    lab, img = nib.load(str(label_path)), read_image(image_path)
    assert lab.shape == img.spatial_shape and lab.get_data_dtype() == np.uint8, (lab.shape, img.spatial_shape)
    np.testing.assert_allclose(lab.affine, img.affine, atol=1e-5)


def _lines(res, text: str) -> list[str]:
    return [ln for ln in res.lines if text in ln]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# a folder of patient folders
def test_patient_folders_are_read_as_their_files_and_mirrored(tmp_path, tiny_checkpoint):
    patients, out = tmp_path / "patients", tmp_path / "out"
    images = {name: write_good_image(patients / name, seed=i)
              for i, name in enumerate(["p01/image.nii.gz", "p02/image.nii.gz", "p03/ct.nii.gz"])}
    (patients / "p03" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    series = hostile.write_dicom_series(patients / "p04", seed=4)  # a DICOM-only patient, as before
    found, left_out = scan_input_folders(patients)
    assert [(str(p.relative_to(patients)), str(rel)) for p, rel in found] == [
        ("p01/image.nii.gz", "p01"), ("p02/image.nii.gz", "p02"), ("p03/ct.nii.gz", "p03"), ("p04", ".")]
    assert [p.name for p, _ in left_out] == [".DS_Store"]

    res = run_cli(segment_argv([patients], out, tiny_checkpoint))
    assert res.code == 0, res.stderr
    assert _files(out) == ["p01/image_seg.nii.gz", "p02/image_seg.nii.gz", "p03/ct_seg.nii.gz", "p04_seg.nii.gz"]
    for name, image in images.items():
        _assert_label_of(out / name.replace(".nii.gz", "_seg.nii.gz"), image)
    _assert_label_of(out / "p04_seg.nii.gz", series)
    assert len(_lines(res, ".DS_Store")) == 1 and "ignored" in _lines(res, ".DS_Store")[0]
    table = res.stdout.splitlines()  # equal file names are told apart by their folder
    for shown in ("p01/image.nii.gz ", "p02/image.nii.gz ", "ct.nii.gz "):
        assert sum(ln.startswith(shown) for ln in table) == 1, res.stdout

    before = {name: (out / name).stat().st_mtime_ns for name in _files(out)}
    time.sleep(0.01)
    again = run_cli(segment_argv([patients], out, tiny_checkpoint))
    assert again.code == 0, again.stderr
    assert len(_lines(again, "skipped (exists)")) == 4, again.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in _files(out)} == before


def test_patient_folder_with_other_files_and_dicom_slices(tmp_path, tiny_checkpoint):
    """A patient folder holding a NIfTI file, a text file and DICOM slices: the NIfTI file segmented into
    its sub-folder, the slices as one series beside the others, the text file named with its reason."""
    patients, out = tmp_path / "patients", tmp_path / "out"
    ct = write_good_image(patients / "p01" / "ct.nii.gz")
    (patients / "p01" / "other.txt").write_text("notes")
    hostile.write_dicom_series(patients / "p01", seed=2)  # slice_000.dcm ... beside ct.nii.gz
    write_good_image(patients / "p02" / "ct.nii.gz", seed=1)
    res = run_cli(segment_argv([patients], out, tiny_checkpoint))
    assert res.code == 3, res.stderr
    lines = _lines(res, "other.txt")
    assert len(lines) == 1 and "failed" in lines[0] and "extension" in lines[0], res.stderr
    assert not _lines(res, ".dcm"), res.stderr  # the slices are read as a series, not one by one
    assert _files(out) == ["p01/ct_seg.nii.gz", "p01_seg.nii.gz", "p02/ct_seg.nii.gz"]
    _assert_label_of(out / "p01" / "ct_seg.nii.gz", ct)
    assert nib.load(str(out / "p01_seg.nii.gz")).shape == read_image(patients / "p01").spatial_shape == (16, 16, 8)


def test_files_given_one_by_one_with_equal_names_collide(tmp_path, tiny_checkpoint):
    first = write_good_image(tmp_path / "p01" / "image.nii.gz")
    second = write_good_image(tmp_path / "p02" / "image.nii.gz", seed=1)
    out = tmp_path / "out"
    res = run_cli(segment_argv([first, second], out, tiny_checkpoint))
    assert res.code == 3, res.stderr
    lines = _lines(res, "collides")
    assert len(lines) == 1 and str(first) in lines[0] and str(second) in lines[0], res.stderr
    assert lines[0].index(str(second)) < lines[0].index(str(first))  # the refused input comes first
    assert _files(out) == ["image_seg.nii.gz"]
    _assert_label_of(out / "image_seg.nii.gz", first)


def test_output_subfolder_problems_are_found_before_predicting(tmp_path, tiny_checkpoint, predictions):
    """``out/p01`` is a file: p01 fails before anything is read or predicted, naming that folder; p02
    (corrupt) fails reading and leaves no empty ``out/p02``; p03 is segmented."""
    patients, out = tmp_path / "patients", tmp_path / "out"
    write_good_image(patients / "p01" / "image.nii.gz")
    (patients / "p02").mkdir(parents=True)
    (patients / "p02" / "image.nii.gz").write_bytes(b"not a nifti")
    good = write_good_image(patients / "p03" / "image.nii.gz", seed=3)
    out.mkdir()
    (out / "p01").write_text("in the way")
    res = run_cli(segment_argv([patients], out, tiny_checkpoint))
    assert res.code == 3, res.stderr
    blocked = _lines(res, str(patients / "p01" / "image.nii.gz"))
    assert len(blocked) == 1 and f"output folder {out / 'p01'}" in blocked[0] and "is a file" in blocked[0]
    assert len(_lines(res, str(patients / "p02" / "image.nii.gz"))) == 1, res.stderr
    assert predictions == [str(good)]  # p01 never predicted; p02 never got past reading
    assert (out / "p01").read_text(encoding="utf-8") == "in the way" and not (out / "p02").exists()
    assert _files(out) == ["p01", "p03/image_seg.nii.gz"]
    assert_nothing_partial(out)


# --------------------------------------------------------------------------------------------------
# 2D inputs: probabilities and uncertainty as float32 TIFFs
def _tiff_pages(path: Path) -> np.ndarray:
    """Every page of a TIFF as float32 ``(pages, rows, columns)``, checked to be 32-bit float."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        assert im.format == "TIFF"
        pages = []
        for page in ImageSequence.Iterator(im):
            assert page.mode == "F", page.mode
            pages.append(np.asarray(page, dtype=np.float32))
    return np.stack(pages)


def test_2d_probabilities_and_uncertainty_are_tiffs_of_the_input_size(tmp_path):
    from PIL import Image

    plan = Plan(spatial_dims=2, modality="microscopy", patch_size=[100, 100], target_spacing=None,
                labels={"background": 0, "cell": 1, "border": 2},
                normalization={"scheme": "zscore", "nonzero": False},
                network={"name": "unet2015", "features": [4, 8, 16], "padding": "valid", "dropout": 0.0})
    models = tmp_path / "models"
    save_checkpoint(plan.build_network().state_dict(), models / "weights.pt")
    plan.save(models / "plan.json")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (61, 87), dtype=np.uint8)).save(images / "cells.png")
    out = tmp_path / "out"
    res = run_cli(segment_argv([images], out, models / "weights.pt", "--save-probabilities", "--uncertainty",
                               "--no-largest-component"))
    assert res.code == 0, res.stderr
    assert _files(out) == ["cells_probabilities.tiff", "cells_seg.png", "cells_uncertainty.tiff"]
    with Image.open(out / "cells_seg.png") as seg:
        label = np.asarray(seg)
    probs = _tiff_pages(out / "cells_probabilities.tiff")
    assert label.shape == (61, 87) and probs.shape == (3, 61, 87)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(axis=0), label)
    assert probs.std() > 0  # maps, not a constant
    unc = _tiff_pages(out / "cells_uncertainty.tiff")
    assert unc.shape == (1, 61, 87) and unc.min() >= 0 and unc.max() <= 1 and unc.max() > 0
    assert_nothing_partial(out)
