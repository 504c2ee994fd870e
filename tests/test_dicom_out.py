"""DICOM out: ``medunet segment --format nifti,dicom-seg,rtstruct`` on DICOM series, the geometry and
references of the DICOM SEG / RTSTRUCT on an oblique phantom series, read back with highdicom, pydicom
and SimpleITK, and the function the MONAI Label app calls (``nifti_to_dicom_seg``)."""

from __future__ import annotations

from pathlib import Path

import dicom_support as ds
import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from medunet import networks
from medunet.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main
from medunet.data import Plan
from medunet.io import InputError, read_image, save_checkpoint, write_like
from medunet.io.dicom import (
    build_dicom_seg,
    nifti_to_dicom_seg,
    parse_formats,
    read_dicom_seg,
    read_rtstruct_labels,
    write_dicom_seg,
    write_rtstruct,
)

SHAPE = (32, 32, 8)
LABELS = {"background": 0, "liver": 1, "kidney": 2}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    plan = Plan(labels=LABELS, target_spacing=[1.5, 1.5, 3.0], patch_size=[16, 16, 8],
                normalization={"scheme": "ct", "clip": [-100, 300], "mean": 80.0, "std": 90.0},
                network={"name": "unet", **networks.get_spec("unet").tiny_options})
    torch.manual_seed(0)
    save_checkpoint({"model": plan.build_network().state_dict(), "plan": plan.to_dict()}, root / "models" / "model.pt")
    return root


@pytest.fixture
def oblique(tmp_path) -> ds.Series:
    return ds.write_ct_series(tmp_path / "oblique_ct", shape=SHAPE, spacing=(0.7, 0.8, 2.5),
                              direction=ds.rotation(25.0, 12.0), origin=(-10.0, 20.0, 55.0))


def _asymmetric_label() -> np.ndarray:
    """Two classes, no symmetry (a flip or transpose of any axis would show)."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[3:12, 5:22, 1:6] = 1
    lab[6:8, 8:10, 3] = 0  # a hole
    lab[20:27, 2:5, 6:8] = 2
    lab[28, 29, 0] = 2
    return lab


def _on_grid(array: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray, shape) -> np.ndarray:
    """Put ``array`` (voxel → RAS ``affine``) on the grid of ``ref_affine`` when both grids are the same
    points (axes possibly flipped or permuted); fails otherwise."""
    t = np.linalg.inv(ref_affine) @ affine
    perm = np.round(t[:3, :3])
    np.testing.assert_allclose(t[:3, :3], perm, atol=1e-4)
    np.testing.assert_allclose(t[:3, 3], np.round(t[:3, 3]), atol=1e-3)
    out = np.zeros(shape, array.dtype)
    idx = np.argwhere(np.ones(array.shape, bool))
    ijk = idx @ perm.astype(int).T + np.round(t[:3, 3]).astype(int)
    out[tuple(ijk.T)] = array[tuple(idx.T)]
    return out


def test_parse_formats():
    assert parse_formats("nifti") == ("nifti",)
    assert parse_formats("rtstruct, NIfTI,dicom-seg") == ("nifti", "dicom-seg", "rtstruct")
    assert parse_formats(["seg", "rtstruct"]) == ("dicom-seg", "rtstruct")
    with pytest.raises(ValueError, match="choose from nifti, dicom-seg, rtstruct"):
        parse_formats("nifti,png")


def test_dicom_seg_geometry_and_references_on_an_oblique_series(oblique, tmp_path):
    image = read_image(oblique.folder)
    label = _asymmetric_label()
    path = write_dicom_seg(label, image, tmp_path / "seg.dcm", {1: "liver", 2: "kidney"})
    seg = hd.seg.segread(str(path))
    assert seg.StudyInstanceUID == oblique.study and seg.PatientID == "PHANTOM01"
    assert seg.FrameOfReferenceUID == oblique.frame_of_reference
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == oblique.series
    assert sorted(r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence) == sorted(oblique.sop_instances)
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "liver"), (2, "kidney")]
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in oblique.datasets[0].ImageOrientationPatient], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [0.8, 0.7])
    for frame in seg.PerFrameFunctionalGroupsSequence:  # every frame: its source slice, at that slice's position
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = oblique.sop_instances.index(uid)
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   oblique.to_lps([0, 0, k])[0], atol=1e-4)
    # read back: the SEG's own grid is the NIfTI label's (voxels and RAS affine), and on the CT grid too
    back, affine, names = read_dicom_seg(path)
    np.testing.assert_array_equal(back, label)
    np.testing.assert_allclose(affine, image.affine, atol=1e-4)
    assert names == {1: "liver", 2: "kidney"}
    np.testing.assert_array_equal(read_dicom_seg(path, image)[0], label)
    # highdicom by source instance, in the CT's slice order
    by_source = seg.get_pixels_by_source_instance(oblique.sop_instances, combine_segments=True)
    np.testing.assert_array_equal(by_source, np.transpose(label, (2, 1, 0)))


def test_single_segment_dicom_seg_reads_back_in_simpleitk(oblique, tmp_path):
    import SimpleITK as sitk

    image = read_image(oblique.folder)
    label = (_asymmetric_label() == 1).astype(np.uint8)
    path = write_dicom_seg(label, image, tmp_path / "seg.dcm", {1: "liver"})
    img = sitk.ReadImage(str(path))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())[None, :]
    lps[:3, 3] = img.GetOrigin()
    array = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
    back = _on_grid(array, np.diag([-1, -1, 1, 1]) @ lps, image.affine, SHAPE)  # same points, same voxels
    np.testing.assert_array_equal(back > 0, label > 0)


def test_rtstruct_geometry_on_an_oblique_series(oblique, tmp_path):
    image = read_image(oblique.folder)
    label = _asymmetric_label()
    path = write_rtstruct(label, image, tmp_path / "rt.dcm", {1: "liver", 2: "kidney"})
    back, names = read_rtstruct_labels(path, image)
    np.testing.assert_array_equal(back, label)
    d = pydicom.dcmread(str(path))
    normal = oblique.lps[:3, 2] / np.linalg.norm(oblique.lps[:3, 2])
    for roi in d.ROIContourSequence:
        for c in roi.ContourSequence:  # planar in the referenced (oblique) slice
            k = oblique.sop_instances.index(c.ContourImageSequence[0].ReferencedSOPInstanceUID)
            pts = np.asarray(c.ContourData, float).reshape(-1, 3)
            np.testing.assert_allclose((pts - oblique.to_lps([0, 0, k])[0]) @ normal, 0, atol=1e-3)
    assert [r.ROIName for r in d.StructureSetROISequence] == ["liver", "kidney"]


def _segment(*args) -> int:
    return main(["segment", "--no-progress", *[str(a) for a in args]])


def test_segment_writes_nifti_dicom_seg_and_rtstruct_that_agree(bundle, oblique, tmp_path, capsys):
    out = tmp_path / "out"
    assert _segment("-i", oblique.folder, "-o", out, "--bundle", bundle, "--format", "nifti,dicom-seg,rtstruct") == EXIT_OK
    name = oblique.folder.name
    assert sorted(p.name for p in out.iterdir()) == [f"{name}_rtstruct.dcm", f"{name}_seg.dcm", f"{name}_seg.nii.gz"]
    nii = nib.load(str(out / f"{name}_seg.nii.gz"))
    label = np.asarray(nii.dataobj)
    image = read_image(oblique.folder)
    back, affine, names = read_dicom_seg(out / f"{name}_seg.dcm")
    np.testing.assert_array_equal(back, label)
    np.testing.assert_allclose(affine, nii.affine, atol=1e-4)
    assert names == {1: "liver", 2: "kidney"}  # one segment per plan label, named
    present = [n for n, v in LABELS.items() if v and (label == v).any()]  # an empty class is a ROI without contours
    assert present, "the tiny network predicted only background"
    rt_label, _ = read_rtstruct_labels(out / f"{name}_rtstruct.dcm", image, names=present)
    expected = np.zeros_like(label)
    for value, n in enumerate(present, start=1):
        expected[label == LABELS[n]] = value
    np.testing.assert_array_equal(rt_label, expected)
    # only the DICOM SEG; an existing output is kept, the missing one written
    out2 = tmp_path / "out2"
    assert _segment("-i", oblique.folder, "-o", out2, "--bundle", bundle, "--format", "dicom-seg") == EXIT_OK
    assert [p.name for p in out2.iterdir()] == [f"{name}_seg.dcm"]
    before = (out2 / f"{name}_seg.dcm").stat().st_mtime_ns
    assert _segment("-i", oblique.folder, "-o", out2, "--bundle", bundle, "--format", "dicom-seg,rtstruct") == EXIT_OK
    assert (out2 / f"{name}_seg.dcm").stat().st_mtime_ns == before and (out2 / f"{name}_rtstruct.dcm").is_file()


def test_dicom_formats_need_a_dicom_input_the_batch_goes_on(bundle, oblique, tmp_path, capsys):
    nifti = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(ds.ct_volume(SHAPE).astype(np.int16), np.diag([0.8, 0.8, 2.5, 1])), str(nifti))
    out = tmp_path / "out"
    code = _segment("-i", nifti, oblique.folder, "-o", out, "--bundle", bundle, "--format", "nifti,dicom-seg")
    err = [line for line in capsys.readouterr().err.splitlines() if "vol.nii.gz" in line]
    assert code == EXIT_PARTIAL and len(err) == 1 and "needs a DICOM series input" in err[0]
    assert sorted(p.name for p in out.iterdir()) == [f"{oblique.folder.name}_seg.dcm", f"{oblique.folder.name}_seg.nii.gz"]


def test_bad_format_is_a_usage_error(bundle, oblique, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _segment("-i", oblique.folder, "-o", tmp_path / "o", "--bundle", bundle, "--format", "dicom")
    assert e.value.code == EXIT_USAGE and "choose from nifti, dicom-seg, rtstruct" in capsys.readouterr().err


def test_nothing_half_written_when_a_dicom_output_fails(bundle, oblique, tmp_path, monkeypatch, capsys):
    import medunet.io.dicom.rtstruct as rt

    def broken(*a, **k):
        raise ValueError("contour tracing failed")

    monkeypatch.setattr(rt, "build_rtstruct", broken)
    out = tmp_path / "out"
    code = _segment("-i", oblique.folder, "-o", out, "--bundle", bundle, "--format", "nifti,dicom-seg,rtstruct")
    assert code != EXIT_OK and "contour tracing failed" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


def test_monai_label_function_nifti_to_dicom_seg(oblique, tmp_path):
    """What the MONAI Label infer endpoint returns for a DICOM study: the same DICOM SEG as
    ``medunet segment --format dicom-seg``, from the NIfTI label it made for the series."""
    image = read_image(oblique.folder)
    label = _asymmetric_label()
    nii = write_like(label, image, tmp_path / "label.nii.gz")
    path = nifti_to_dicom_seg(nii, oblique.folder, tmp_path / "label_seg.dcm", LABELS)
    back, affine, names = read_dicom_seg(path)
    np.testing.assert_array_equal(back, label)
    assert names == {1: "liver", 2: "kidney"}
    expected = build_dicom_seg(label, image, {1: "liver", 2: "kidney"})
    got = hd.seg.segread(str(path))
    np.testing.assert_array_equal(got.pixel_array, expected.pixel_array)
    wrong = tmp_path / "shifted.nii.gz"
    aff = image.affine.copy()
    aff[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(label, aff), str(wrong))
    with pytest.raises(InputError, match="affine"):
        nifti_to_dicom_seg(wrong, oblique.folder, tmp_path / "x.dcm", LABELS)
    assert not (tmp_path / "x.dcm").exists()
