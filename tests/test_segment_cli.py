"""``medunet segment`` end to end: bundles/checkpoints, NIfTI folders with a broken file, DICOM series,
PNG with a 2D model, outputs that exist, probabilities and uncertainty maps."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet import networks
from medunet.cli import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main
from medunet.data import Plan
from medunet.io import read_image, save_checkpoint


def _ct_plan() -> Plan:
    return Plan(labels={"background": 0, "liver": 1, "kidney": 2, "spleen": 3}, target_spacing=[1.5, 1.5, 3.0],
                patch_size=[16, 16, 8], normalization={"scheme": "ct", "clip": [-100, 300], "mean": 80.0, "std": 90.0},
                network={"name": "unet", **networks.get_spec("unet").tiny_options})


def _ct_volume(seed: int, shape=(40, 36, 14)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = np.full(shape, -1000.0, np.float32)
    c = np.asarray(shape) / 2
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    body = np.linalg.norm((idx - c) / (c * 0.8), axis=-1) < 1
    img[body] = 40 + rng.normal(0, 10, int(body.sum()))
    organ = np.linalg.norm((idx - c - [4, 3, 0]) / [6, 5, 4], axis=-1) < 1
    img[organ] = 150
    affine = np.diag([-0.9, -0.9, 2.5, 1.0])  # LPS voxel order
    affine[:3, 3] = [20.0, 15.0, -30.0]
    return img, affine


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle folder whose models/model.pt holds weights and the plan ({"model", "plan"})."""
    root = tmp_path_factory.mktemp("bundle")
    plan = _ct_plan()
    torch.manual_seed(0)
    net = plan.build_network()
    save_checkpoint({"model": net.state_dict(), "plan": plan.to_dict()}, root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def nifti_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(2):
        img, affine = _ct_volume(i)
        nib.save(nib.Nifti1Image(img.astype(np.int16), affine), str(folder / f"case_{i}.nii.gz"))
    good = (folder / "case_0.nii.gz").read_bytes()
    (folder / "broken.nii.gz").write_bytes(good[: len(good) // 3])  # truncated download
    (folder / "notes.txt").write_text("not an image")  # not segmented: named with its reason
    return folder


def _segment(*args: str) -> int:
    return main(["segment", "--no-progress", *[str(a) for a in args]])


def test_folder_with_a_broken_file_segments_the_rest(bundle, nifti_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = _segment("-i", nifti_folder, "-o", out, "--bundle", bundle)
    captured = capsys.readouterr()
    assert code == EXIT_PARTIAL
    errors = [line for line in captured.err.splitlines() if "broken.nii.gz" in line]
    assert len(errors) == 1 and "truncated" in errors[0] or "corrupt" in errors[0]
    assert "2/4 succeeded" in captured.out and "case_1.nii.gz" in captured.out
    assert len([line for line in captured.err.splitlines() if "notes.txt" in line and "extension" in line]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["case_0_seg.nii.gz", "case_1_seg.nii.gz"]  # no temp files
    for i in range(2):
        src = nib.load(str(nifti_folder / f"case_{i}.nii.gz"))
        seg = nib.load(str(out / f"case_{i}_seg.nii.gz"))
        assert seg.shape == src.shape and seg.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(seg.affine, src.affine)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}


def test_existing_outputs_are_kept_unless_overwrite(bundle, nifti_folder, tmp_path, capsys):
    src = nifti_folder / "case_1.nii.gz"
    out = tmp_path / "out"
    assert _segment("-i", src, "-o", out, "--bundle", bundle) == EXIT_OK
    target = out / "case_1_seg.nii.gz"
    before = target.stat().st_mtime_ns
    time.sleep(0.01)
    capsys.readouterr()
    assert _segment("-i", src, "-o", out, "--bundle", bundle) == EXIT_OK  # done already: not a failure
    res = capsys.readouterr()
    assert "skipped (exists)" in res.err and "--overwrite" in res.err and str(target) in res.err
    assert "skipped (exists)" in res.out  # summary table
    assert target.stat().st_mtime_ns == before
    # an incomplete case (probabilities requested, only the label there) is completed, the label kept
    assert _segment("-i", src, "-o", out, "--bundle", bundle, "--save-probabilities") == EXIT_OK
    assert (out / "case_1_probabilities.nii.gz").is_file()
    assert target.stat().st_mtime_ns == before
    assert _segment("-i", src, "-o", out, "--bundle", bundle, "--overwrite") == EXIT_OK
    assert target.stat().st_mtime_ns != before


def _write_dicom_series(volume: np.ndarray, spacing, origin, direction, folder: Path) -> None:
    """Write a (X, Y, Z) int16 volume as one DICOM file per slice (LPS geometry), with SimpleITK."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(np.transpose(volume, (2, 1, 0)).astype(np.int16))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    d = np.asarray(direction, dtype=float)
    orientation = "\\".join(f"{v:.6f}" for v in (*d[:, 0], *d[:, 1]))
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.41", "0020|000e": series_uid,
            "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": orientation, "0008|0018": f"{series_uid}.{k + 1}", "0028|1052": "0", "0028|1053": "1",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_with_tta_probabilities_and_uncertainty(bundle, tmp_path, capsys):
    img, _ = _ct_volume(3, shape=(36, 32, 10))
    theta = np.deg2rad(10)
    direction = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    series = tmp_path / "series"
    _write_dicom_series(img, (0.8, 0.8, 3.0), (-10.0, 5.0, 40.0), direction, series)
    out = tmp_path / "out"
    code = _segment("-i", series, "-o", out, "--bundle", bundle, "--tta", "--save-probabilities", "--uncertainty")
    assert code == EXIT_OK, capsys.readouterr().err
    ref = read_image(series)
    seg = nib.load(str(out / "series_seg.nii.gz"))
    assert seg.shape == ref.spatial_shape == (36, 32, 10)
    np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-5)
    probs = np.asarray(nib.load(str(out / "series_probabilities.nii.gz")).dataobj)
    assert probs.shape == (36, 32, 10, 4)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), probs.argmax(-1))
    unc = np.asarray(nib.load(str(out / "series_uncertainty.nii.gz")).dataobj)
    assert unc.shape == (36, 32, 10) and unc.min() >= 0 and unc.max() <= 1 and unc.max() > 0


def test_png_images_with_a_2d_valid_network(tmp_path, capsys):
    from PIL import Image

    plan = Plan(spatial_dims=2, modality="microscopy", patch_size=[100, 100], target_spacing=None,
                normalization={"scheme": "zscore", "nonzero": False},
                network={"name": "unet2015", "features": [4, 8, 16], "padding": "valid", "dropout": 0.0})
    models = tmp_path / "models"
    save_checkpoint(plan.build_network().state_dict(), models / "weights.pt")  # raw state_dict
    plan.save(models / "plan.json")  # found beside the checkpoint
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (61, 87), dtype=np.uint8)).save(images / "cells.png")
    out = tmp_path / "out"
    assert _segment("-i", images, "-o", out, "--checkpoint", models / "weights.pt") == EXIT_OK
    with Image.open(out / "cells_seg.png") as seg:
        assert seg.size == (87, 61)


def test_untrained_bundle_warns_and_bad_arguments(tmp_path, nifti_folder, capsys):
    bundle = tmp_path / "b"
    (bundle / "configs").mkdir(parents=True)
    _ct_plan().save(bundle / "configs" / "plan.json")
    assert _segment("-i", nifti_folder / "case_0.nii.gz", "-o", tmp_path / "o", "--bundle", bundle) == EXIT_OK
    assert "UNTRAINED" in capsys.readouterr().err
    assert _segment("-i", tmp_path / "missing.nii.gz", "-o", tmp_path / "o", "--bundle", bundle) == EXIT_FAILURE
    err = capsys.readouterr().err.strip().splitlines()
    assert any("missing.nii.gz" in line and "no such file" in line for line in err)
    assert _segment("-i", nifti_folder, "-o", tmp_path / "o") == EXIT_USAGE
    bad = tmp_path / "bad.pt"
    bad.write_bytes(gzip.compress(b"junk"))
    assert _segment("-i", nifti_folder, "-o", tmp_path / "o", "--checkpoint", bad) == EXIT_FAILURE
    assert "bad.pt" in capsys.readouterr().err
