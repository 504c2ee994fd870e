"""``medunet check-dataset``: a clean phantom set passes; deliberately broken copies are caught, each
problem on one line naming the file."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.cli import main
from medunet.data.check import PROBLEM_KINDS, check_dataset
from medunet.data.phantoms import generate_dataset


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory) -> Path:
    return generate_dataset("ct", tmp_path_factory.mktemp("check") / "ct", cases=4, size="small", test_cases=1)


def _copy(clean_set: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean_set, tmp_path / "ct"))


def _load(path: Path) -> nib.Nifti1Image:
    img = nib.load(path)
    return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)


def _save(array, affine, path: Path, header=None) -> Path:
    img = nib.Nifti1Image(array, affine, header)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)
    return path


def _edit_json(root: Path, change: Callable[[dict], None]) -> Path:
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    change(meta)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root / "dataset.json"


IMG, LBL = "imagesTr/ct_001.nii.gz", "labelsTr/ct_001.nii.gz"


def _label_changed(root: Path, change) -> Path:
    img = _load(root / LBL)
    data = np.asarray(img.dataobj).copy()
    data = change(data)
    return _save(data, img.affine, root / LBL)


def _shifted_label(root):
    img = _load(root / LBL)
    aff = img.affine.copy()
    aff[:3, 3] += 15.0
    return _save(np.asarray(img.dataobj), aff, root / LBL)


def _flipped_label(root):  # the classic: label saved in another voxel order than its image
    img = _load(root / LBL)
    aff = img.affine @ np.array([[-1, 0, 0, img.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return _save(np.asarray(img.dataobj), aff, root / LBL)


def _image_spacing(root, value):
    img = _load(root / IMG)
    hdr = img.header.copy()
    aff = img.affine.copy()
    aff[:3, 2] *= 0.0 if value == 0 else 1.0
    hdr["pixdim"][3] = value
    raw = nib.Nifti1Image(np.asarray(img.dataobj), None, hdr)
    raw.header["sform_code"], raw.header["qform_code"] = 1, 0
    raw.header.set_sform(aff if value == 0 else img.affine, code=1)
    raw.header["pixdim"][3] = value
    path = root / IMG
    path.write_bytes(gzip.compress(raw.header.binaryblock + b"\x00" * 4 + np.asarray(img.dataobj).tobytes("F")))
    return path


def _singular(root):
    img = _load(root / IMG)
    aff = img.affine.copy()
    aff[:3, 2] = aff[:3, 0]
    im = nib.Nifti1Image(np.asarray(img.dataobj), aff)
    im.set_sform(aff, code=1)
    im.set_qform(np.eye(4), code=0)
    nib.save(im, root / IMG)
    return root / IMG


def _float_image(root, value):
    img = _load(root / IMG)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[2:4, 2:4, 2] = value
    return _save(data, img.affine, root / IMG)


def _stack_4d(root):
    img = _load(root / IMG)
    data = np.asarray(img.dataobj)
    return _save(np.stack([data] * 3, axis=-1), img.affine, root / IMG)


def _slice_2d(root):
    img = _load(root / IMG)
    return _save(np.asarray(img.dataobj)[:, :, 5], img.affine, root / IMG)


def _overwrite(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncate(root):
    data = (root / IMG).read_bytes()
    (root / IMG).write_bytes(data[: len(data) // 2])
    return root / IMG


def _unlisted(root):
    return Path(shutil.copy(root / IMG, root / "imagesTr" / "ct_099.nii.gz"))


def _duplicate(root):
    _edit_json(root, lambda m: (m["training"].append(m["training"][1]), m.update(numTraining=5)))
    return root / IMG


def _orphan_label_plain_layout(root):
    (root / "dataset.json").unlink()
    shutil.rmtree(root / "imagesTs")
    shutil.rmtree(root / "labelsTs")
    (root / "imagesTr").rename(root / "images")
    (root / "labelsTr").rename(root / "labels")
    (root / "images" / "ct_001.nii.gz").unlink()
    return root / "labels" / "ct_001.nii.gz"


#: defect name → (make it in a copy and return the file to blame, expected kind)
DEFECTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "label_missing": (lambda r: (r / LBL).unlink() or r / LBL, "missing-file"),
    "image_missing": (lambda r: (r / IMG).unlink() or r / IMG, "missing-file"),
    "label_shape": (lambda r: _label_changed(r, lambda d: d[:, :, :-3]), "shape-mismatch"),
    "label_shifted": (_shifted_label, "affine-mismatch"),
    "label_flipped": (_flipped_label, "affine-mismatch"),
    "label_undeclared_value": (lambda r: _label_changed(r, lambda d: np.where(d == 3, 7, d).astype(np.uint8)),
                               "label-values"),
    "label_fractional": (lambda r: _label_changed(r, lambda d: d.astype(np.float32) * 0.5), "label-non-integer"),
    "label_empty": (lambda r: _label_changed(r, np.zeros_like), "label-empty"),
    "label_4d": (lambda r: _label_changed(r, lambda d: np.stack([d, d], axis=-1)), "dimensions"),
    "image_nan": (lambda r: _float_image(r, np.nan), "nan-inf"),
    "image_inf": (lambda r: _float_image(r, np.inf), "nan-inf"),
    "image_zero_spacing": (lambda r: _image_spacing(r, 0.0), "bad-spacing"),
    "image_negative_spacing": (lambda r: _image_spacing(r, -2.5), "bad-spacing"),
    "image_singular_affine": (_singular, "singular-affine"),
    "image_4d": (_stack_4d, "dimensions"),
    "image_2d": (_slice_2d, "dimensions"),
    "image_zero_byte": (lambda r: _overwrite(r / IMG, b""), "empty-file"),
    "image_truncated": (_truncate, "unreadable"),
    "image_not_nifti": (lambda r: _overwrite(r / IMG, b"id,value\n1,2\n"), "unreadable"),
    "image_constant": (lambda r: _save(np.full((48, 48, 24), -1000, np.int16), _load(r / IMG).affine, r / IMG),
                       "constant-image"),
    "json_missing": (lambda r: (r / "dataset.json").unlink() or r / "dataset.json", "dataset-json-missing"),
    "json_invalid": (lambda r: _overwrite(r / "dataset.json", b"{'labels': 1"), "dataset-json-invalid"),
    "json_no_labels": (lambda r: _edit_json(r, lambda m: m.pop("labels")), "dataset-json-invalid"),
    "json_num_training": (lambda r: _edit_json(r, lambda m: m.update(numTraining=7)), "num-training"),
    "json_num_test": (lambda r: _edit_json(r, lambda m: m.update(numTest=3)), "num-test"),
    "json_two_modalities": (lambda r: _edit_json(r, lambda m: m.update(modality={"0": "CT", "1": "PET"})) and r / IMG,
                            "channel-count"),
    "unlisted_image": (_unlisted, "unlisted-file"),
    "duplicate_entry": (_duplicate, "duplicate-id"),
    "orphan_label": (_orphan_label_plain_layout, "missing-image"),
}


def test_clean_set_has_no_problem(clean_set, capsys):
    assert list(check_dataset(clean_set)) == []
    assert main(["check-dataset", str(clean_set)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{clean_set}: 5 case(s) checked, no problems"]


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_defect_is_found_and_names_the_file(name, clean_set, tmp_path):
    root = _copy(clean_set, tmp_path)
    make, kind = DEFECTS[name]
    culprit = make(root)
    problems = check_dataset(root)
    hits = [p for p in problems if p.kind == kind]
    assert hits, f"{name}: expected a {kind} problem, got {[str(p) for p in problems]}"
    assert any(Path(p.path).name == Path(culprit).name for p in hits), [str(p) for p in hits]
    for p in problems:
        line = str(p)
        assert "\n" not in line and p.path in line and p.kind in PROBLEM_KINDS


def test_many_defects_in_one_copy_cli(clean_set, tmp_path, capsys):
    """Ten and more kinds of defect at once: each one line, then the summary; exit status 1."""
    root = _copy(clean_set, tmp_path)
    img = _load(root / "imagesTr/ct_000.nii.gz")
    _save(np.asarray(img.dataobj)[:, :, :20], img.affine, root / "labelsTr/ct_000.nii.gz")  # shape
    _shifted_label(root)  # ct_001 affine
    lbl = _load(root / "labelsTr/ct_002.nii.gz")
    data = np.asarray(lbl.dataobj).astype(np.float32)
    data[0, 0, 0], data[1, 1, 1] = 9, 0.5
    _save(data, lbl.affine, root / "labelsTr/ct_002.nii.gz")  # undeclared value + fractional
    (root / "labelsTr/ct_003.nii.gz").unlink()  # missing
    (root / "imagesTs/ct_004.nii.gz").write_bytes(b"")  # zero-byte test image
    _unlisted(root)
    _edit_json(root, lambda m: m.update(numTraining=9, numTest=4))
    problems = check_dataset(root)
    kinds = {p.kind for p in problems}
    assert kinds >= {"shape-mismatch", "affine-mismatch", "label-values", "label-non-integer", "missing-file",
                     "empty-file", "unlisted-file", "num-training", "num-test"}, kinds

    assert main(["check-dataset", str(root)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(problems) + 1
    assert lines[-1].startswith(f"{root}: ") and "error(s)" in lines[-1]
    assert all(line.startswith(("error: ", "warning: ")) for line in lines[:-1])


def test_at_least_ten_kinds_are_checked():
    assert len({kind for _, kind in DEFECTS.values()}) >= 20


def test_warnings_only_pass_unless_strict(clean_set, tmp_path):
    root = _copy(clean_set, tmp_path)
    _label_changed(root, np.zeros_like)
    problems = check_dataset(root)
    assert [p.severity for p in problems] == ["warning"]
    assert main(["check-dataset", str(root)]) == 0
    assert main(["check-dataset", "--strict", str(root)]) == 1


def test_not_a_dataset(tmp_path):
    assert [p.kind for p in check_dataset(tmp_path / "nowhere")] == ["not-a-dataset"]
    (tmp_path / "empty").mkdir()
    problems = check_dataset(tmp_path / "empty")
    assert len(problems) == 1 and "empty folder" in str(problems[0])
    assert main(["check-dataset", str(tmp_path / "empty")]) == 1


def test_nnunet_layout_channel_files(tmp_path, clean_set):
    """nnU-Net v2: one file per channel; a case missing its second channel is reported."""
    root = tmp_path / "nn"
    for case in ("ct_000", "ct_001"):
        for ch in (0, 1):
            (root / "imagesTr").mkdir(parents=True, exist_ok=True)
            shutil.copy(clean_set / f"imagesTr/{case}.nii.gz", root / f"imagesTr/{case}_{ch:04d}.nii.gz")
        (root / "labelsTr").mkdir(exist_ok=True)
        shutil.copy(clean_set / f"labelsTr/{case}.nii.gz", root / f"labelsTr/{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "CT2"}, "labels": {"background": 0, "liver": 1, "kidney": 2, "spleen": 3},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    assert list(check_dataset(root)) == []
    (root / "imagesTr/ct_001_0001.nii.gz").unlink()
    kinds = {p.kind: p for p in check_dataset(root)}
    assert "missing-channel" in kinds and "ct_001_0000" in kinds["missing-channel"].path


def test_real_hippocampus_is_clean(hippocampus_dir):
    result = check_dataset(hippocampus_dir)
    assert list(result) == [] and result.cases_checked == 195


def test_cells_png_instances_checked(tmp_path):
    from PIL import Image

    root = generate_dataset("cells", tmp_path / "cells", cases=2, size="small", fmt="png", test_cases=0)
    assert list(check_dataset(root)) == []
    path = root / "instancesTr" / "cells_001.png"
    inst = np.array(Image.open(path))
    inst[inst == inst.max()] = 0  # an annotator erased one cell from the instance map only
    Image.fromarray(inst).save(path)
    (problem,) = check_dataset(root)
    assert problem.kind == "label-values" and problem.path == str(path) and "foreground" in problem.message
