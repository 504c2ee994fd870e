"""DICOM-RT in: CT series + RTSTRUCT / DICOM SEG → MSD dataset (``medunet import-dicom``), the polygon
rasteriser, and bad DICOM (one line naming the file, the batch goes on, nothing half-written).

The series, RTSTRUCTs and SEGs are built here (tests/dicom_support.py), so CI without the shared data
covers the code; the 4 real DICOM-RT patients are checked against their NIfTI labels when present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dicom_support as ds
import nibabel as nib
import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from medunet.cli import EXIT_OK, EXIT_PARTIAL, main
from medunet.io import InputError, read_image
from medunet.io.dicom import (
    fill_polygons,
    find_patients,
    import_dicom,
    mask_to_polygons,
    parse_rois,
    read_dicom_case,
    read_rtstruct_labels,
    write_rtstruct,
)

SARCOMA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sarcoma_ct"
SHAPE = (32, 32, 8)


def _expected_even_odd(polygons, shape2d) -> np.ndarray:
    """Reference fill (matplotlib's point-in-polygon, XOR over polygons) of voxel centres."""
    ii, jj = np.meshgrid(np.arange(shape2d[0]), np.arange(shape2d[1]), indexing="ij")
    centres = np.column_stack([ii.ravel(), jj.ravel()]).astype(float)
    out = np.zeros(centres.shape[0], dtype=bool)
    for poly in polygons:
        out ^= MplPath(np.asarray(poly, dtype=float)).contains_points(centres)
    return out.reshape(shape2d)


# --------------------------------------------------------------------------------------------------
# the rasteriser and the contour tracer
def test_fill_polygons_even_odd_holes_islands_any_order():
    outer, hole = ds.square(3.5, 20.5), ds.square(8.5, 12.5, clockwise=True)
    island = ds.square(24.2, 29.7, 2.3, 6.6)
    triangle = np.array([[2.2, 25.1], [14.7, 22.3], [9.1, 30.6]])
    for order in ([outer, hole, island, triangle], [triangle, hole, island, outer]):
        got = fill_polygons(order, (32, 32))
        np.testing.assert_array_equal(got, _expected_even_odd(order, (32, 32)))
    got = fill_polygons([hole, outer], (32, 32))
    assert got[4:21, 4:21].sum() == 17 * 17 - 4 * 4 and not got[9:13, 9:13].any()
    # a polygon partly outside the slice is clipped, not wrapped
    edge = fill_polygons([ds.square(-5.5, 3.5, 28.5, 40.0)], (32, 32))
    assert edge[:4, 29:].all() and edge.sum() == 4 * 3


@pytest.mark.parametrize("seed", range(6))
def test_traced_contours_fill_back_to_the_same_voxels(seed):
    """mask → polygons (0.5 iso-line) → even-odd fill is exact: holes, diagonal touches, border voxels."""
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    mask = ndimage.binary_opening(rng.random((31, 27)) > 0.45 + 0.05 * (seed % 3)) if seed % 2 else rng.random((31, 27)) > 0.6
    mask[0, :] |= seed == 4  # touching the border
    polys = mask_to_polygons(mask)
    np.testing.assert_array_equal(fill_polygons(polys, mask.shape), mask)
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []


def test_parse_rois():
    assert [(r.name, r.label) for r in parse_rois("GTV, Liver=liver")] == [("GTV", None), ("Liver", "liver")]
    with pytest.raises(ValueError, match="twice"):
        parse_rois(["gtv", "GTV"])
    with pytest.raises(ValueError, match="at least one"):
        parse_rois(" , ")


# --------------------------------------------------------------------------------------------------
# RTSTRUCT and SEG built here
def _patient(root: Path, name: str = "pat01", **series_kw) -> ds.Series:
    return ds.write_ct_series(root / name / "CT", shape=SHAPE, **series_kw)


def _rois(series: ds.Series) -> dict:
    """GTV: a ring (contour with a hole) on slice 2, two islands on slice 5, one square on slice 3 — in
    shuffled order; Liver: a triangle on slices 1 and 6."""
    ring_outer, ring_hole = ds.square(4.5, 20.5), ds.square(9.5, 14.5, clockwise=True)
    a, b = ds.square(2.5, 8.5), ds.square(16.5, 27.5, 18.5, 25.5)
    tri = np.array([[3.2, 24.1], [20.7, 26.3], [11.1, 30.6]])
    return {"GTV": [(5, b), (2, ring_hole), (3, ds.square(10.5, 12.5)), (2, ring_outer), (5, a)],
            "Liver": [(6, tri), (1, tri)]}


def _expected(series: ds.Series) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    for value, contours in enumerate(_rois(series).values(), start=1):
        per_slice: dict[int, list] = {}
        for k, poly in contours:
            per_slice.setdefault(k, []).append(poly)
        for k, polys in per_slice.items():
            label[:, :, k][_expected_even_odd(polys, SHAPE[:2])] = value
    return label


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_import_rtstruct_patient(tmp_path, oblique):
    direction = ds.rotation(25.0, 12.0) if oblique else None
    series = _patient(tmp_path, direction=direction, spacing=(0.7, 0.8, 2.5))
    ds.write_rtstruct(tmp_path / "pat01" / "RT" / "structures.dcm", series, _rois(series))
    result = import_dicom(tmp_path / "pat01", tmp_path / "out", "gtv,LIVER=liver")
    assert result.ok == ["pat01"] and not result.failed
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text(encoding="utf-8"))
    assert meta["labels"] == {"0": "background", "1": "GTV", "2": "liver"} and meta["modality"] == {"0": "CT"}
    assert meta["training"] == [{"image": "./imagesTr/pat01.nii.gz", "label": "./labelsTr/pat01.nii.gz"}]
    label = nib.load(str(tmp_path / "out" / "labelsTr" / "pat01.nii.gz"))
    image = nib.load(str(tmp_path / "out" / "imagesTr" / "pat01.nii.gz"))
    source = read_image(series.folder)  # what `medunet segment` reads
    assert label.shape == image.shape == source.spatial_shape == SHAPE
    np.testing.assert_allclose(label.affine, source.affine, atol=1e-5)
    np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
    np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ source.affine, series.lps, atol=1e-4)  # LPS → RAS
    np.testing.assert_array_equal(np.asarray(image.dataobj), ds.ct_volume(SHAPE))
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(label.dataobj), _expected(series))
    # the slices are read by position (files are named in shuffled order), holes and islands kept
    lab = np.asarray(label.dataobj)
    assert lab[12, 12, 2] == 0 and lab[6, 6, 2] == 1 and lab[5, 5, 5] == 1 and lab[20, 20, 5] == 1


def test_import_dicom_seg_patient(tmp_path):
    series = _patient(tmp_path)
    a = np.zeros(SHAPE, bool)
    a[5:20, 8:12, 2:5] = True
    b = np.zeros(SHAPE, bool)
    b[20:28, 3:9, 6] = True
    b[1:3, 1:3, 7] = True  # frames for only some slices (empty frames omitted)
    ds.write_seg(tmp_path / "pat01" / "SEG" / "seg.dcm", series, {"Tumour": a, "Kidney": b})
    case = read_dicom_case(tmp_path / "pat01", "kidney,tumour")
    assert case.labels == {1: "Kidney", 2: "Tumour"}
    expected = np.zeros(SHAPE, np.uint8)
    expected[b], expected[a] = 1, 2
    np.testing.assert_array_equal(case.label, expected)


def test_flat_folder_with_ct_seg_and_rtstruct(tmp_path):
    """One folder holding the slices, a SEG and an RTSTRUCT (a common export): the SEG is not a second
    image series, for the importer and for `medunet segment`'s reader alike; later ROIs win overlaps."""
    series = ds.write_ct_series(tmp_path / "flat", shape=SHAPE)
    a = np.zeros(SHAPE, bool)
    a[3:9, 4:7, 2:4] = True
    ds.write_seg(tmp_path / "flat" / "seg.dcm", series, {"A": a})
    ds.write_rtstruct(tmp_path / "flat" / "rs.dcm", series, {"B": [(2, ds.square(3.5, 9.5))]})
    assert read_image(series.folder).spatial_shape == SHAPE
    case = read_dicom_case(series.folder, "A,B")
    assert np.bincount(case.label.ravel()).tolist() == [8192 - 21 - 36, 21, 36]
    assert case.warnings == ["ROI 'B' overlaps earlier ROIs in 15 voxel(s); it wins there"]


def test_folder_of_patients_cli(tmp_path, capsys):
    for name in ("pat_a", "pat_b"):
        s = ds.write_ct_series(tmp_path / "src" / name / "image", shape=SHAPE, patient=name)
        ds.write_rtstruct(tmp_path / "src" / name / "mask" / "x.dcm", s, {"GTV_Mass": [(3, ds.square(4.5, 9.5))]})
    assert [p[0] for p in find_patients(tmp_path / "src")] == ["pat_a", "pat_b"]
    assert [p[0] for p in find_patients(tmp_path / "src" / "pat_a")] == ["pat_a"]
    code = main(["import-dicom", str(tmp_path / "src"), str(tmp_path / "out"), "--roi", "gtv_mass=tumour"])
    out = capsys.readouterr().out
    assert code == EXIT_OK and "2/2 patient(s) imported" in out
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text(encoding="utf-8"))
    assert meta["labels"] == {"0": "background", "1": "tumour"} and meta["numTraining"] == 2
    lab = np.asarray(nib.load(str(tmp_path / "out" / "labelsTr" / "pat_b.nii.gz")).dataobj)
    assert lab.sum() == 25 and lab[5:10, 5:10, 3].all()
    from medunet.data import load_datalist
    from medunet.data.check import check_dataset

    assert len(load_datalist(tmp_path / "out")) == 2
    assert [p for p in check_dataset(tmp_path / "out") if p.severity == "error"] == []


def test_missing_roi_is_one_line_listing_the_names(tmp_path, capsys):
    series = _patient(tmp_path)
    rs = ds.write_rtstruct(tmp_path / "pat01" / "rs.dcm", series, _rois(series))
    with pytest.raises(InputError) as err:
        read_dicom_case(tmp_path / "pat01", "GTV_Mass")
    assert str(rs) in str(err.value) and "'GTV', 'Liver'" in str(err.value) and "\n" not in str(err.value)
    code = main(["import-dicom", str(tmp_path / "pat01"), str(tmp_path / "out"), "--roi", "GTV_Mass"])
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(err_lines) == 1 and "no ROI named 'GTV_Mass'" in err_lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii.gz"))


# --------------------------------------------------------------------------------------------------
# bad DICOM: one line naming the file, the batch goes on, nothing half-written
def _good(root: Path, name: str) -> None:
    s = ds.write_ct_series(root / name / "CT", shape=SHAPE, patient=name)
    ds.write_rtstruct(root / name / "RS" / "rs.dcm", s, {"GTV": [(2, ds.square(3.5, 9.5))]})


def _bad_cases(root: Path) -> dict[str, str]:
    """patient folder name → regex the error line must match (it must also name a file or folder)."""
    gtv = {"GTV": [(2, ds.square(3.5, 9.5))]}
    cases = {}
    s = ds.write_ct_series(root / "missing_slice" / "CT", shape=SHAPE, skip=(4,))
    ds.write_rtstruct(root / "missing_slice" / "rs.dcm", s, gtv)
    cases["missing_slice"] = r"missing slice"
    s = ds.write_ct_series(root / "duplicate_slice" / "CT", shape=SHAPE, duplicate=3)
    ds.write_rtstruct(root / "duplicate_slice" / "rs.dcm", s, gtv)
    cases["duplicate_slice"] = r"duplicate slice"
    s = ds.write_ct_series(root / "two_series" / "CT", shape=SHAPE, prefix="a")
    ds.write_ct_series(root / "two_series" / "CT", shape=SHAPE, prefix="b", study=s.study,
                       frame_of_reference=s.frame_of_reference, spacing=(0.7, 0.7, 3.0))
    ds.write_rtstruct(root / "two_series" / "rs.dcm", s, gtv)
    cases["two_series"] = r"2 image series mixed"
    s = ds.write_ct_series(root / "other_frame" / "CT", shape=SHAPE)
    ds.write_rtstruct(root / "other_frame" / "rs.dcm", s, gtv, frame_of_reference="1.2.3.4.5.6.7")
    cases["other_frame"] = r"frame of reference 1\.2\.3\.4\.5\.6\.7, not the image series"
    s = ds.write_ct_series(root / "other_series" / "CT", shape=SHAPE)
    ds.write_rtstruct(root / "other_series" / "rs.dcm", s, gtv, referenced_series="1.2.3.4.5.6.8")
    cases["other_series"] = r"drawn on series 1\.2\.3\.4\.5\.6\.8, not the image series"
    s = ds.write_ct_series(root / "no_contour" / "CT", shape=SHAPE)
    ds.write_rtstruct(root / "no_contour" / "rs.dcm", s, {"GTV": []})
    cases["no_contour"] = r"ROI 'GTV' has no contour"
    s = ds.write_ct_series(root / "points_only" / "CT", shape=SHAPE)
    ds.write_rtstruct(root / "points_only" / "rs.dcm", s, gtv, geometric_type="POINT")
    cases["points_only"] = r"ROI 'GTV' has no contour \(only POINT contours\)"
    s = ds.write_ct_series(root / "tilted_slice" / "CT", shape=SHAPE, tilt=5)
    ds.write_rtstruct(root / "tilted_slice" / "rs.dcm", s, gtv)
    cases["tilted_slice"] = r"different orientation"
    s = ds.write_ct_series(root / "between_slices" / "CT", shape=SHAPE)
    rs = ds.write_rtstruct(root / "between_slices" / "rs.dcm", s, gtv)
    _shift_contours(rs, 1.1)  # 1.1 mm off the 2.5 mm slices
    cases["between_slices"] = r"lies between slices"
    s = ds.write_ct_series(root / "no_structure" / "CT", shape=SHAPE)
    cases["no_structure"] = r"no RTSTRUCT or DICOM SEG found"
    mask = np.zeros(SHAPE, bool)
    mask[3:9, 4:7, 2:4] = True
    s = ds.write_ct_series(root / "seg_other_frame" / "CT", shape=SHAPE)
    ds.write_seg(root / "seg_other_frame" / "seg.dcm", s, {"GTV": mask}, frame_of_reference="1.2.3.4.5.6.9")
    cases["seg_other_frame"] = r"DICOM SEG is in frame of reference 1\.2\.3\.4\.5\.6\.9, not the image series"
    s = ds.write_ct_series(root / "seg_empty" / "CT", shape=SHAPE)
    ds.write_seg(root / "seg_empty" / "seg.dcm", s, {"GTV": np.zeros(SHAPE, bool), "other": mask})
    cases["seg_empty"] = r"segment 'GTV' is empty"
    return cases


def _shift_contours(path: Path, mm: float) -> None:
    import pydicom

    d = pydicom.dcmread(str(path))
    for c in d.ROIContourSequence[0].ContourSequence:
        pts = np.asarray(c.ContourData, float).reshape(-1, 3)
        pts[:, 2] += mm
        c.ContourData = [f"{v:.5f}" for v in pts.ravel()]
    d.save_as(str(path))


def test_bad_dicom_each_one_line_and_the_batch_goes_on(tmp_path, capsys):
    src = tmp_path / "src"
    _good(src, "aa_good")
    cases = _bad_cases(src)
    _good(src, "zz_good")
    dst = tmp_path / "out"
    code = main(["import-dicom", str(src), str(dst), "--roi", "GTV"])
    captured = capsys.readouterr()
    assert code == EXIT_PARTIAL, captured.err
    assert f"2/{len(cases) + 2} patient(s) imported" in captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == len(cases), captured.err
    import re

    for name, pattern in cases.items():
        line = next((line for line in lines if f"/{name}/" in line or line.split(": ")[2].endswith(f"/{name}")), None)
        assert line is not None, f"{name}: no error line in {captured.err}"
        assert re.search(pattern, line), f"{name}: {line}"
        assert str(src / name) in line  # names the file or folder
    # nothing half-written: only the good cases, no temporary files
    assert sorted(p.name for p in (dst / "imagesTr").iterdir()) == ["aa_good.nii.gz", "zz_good.nii.gz"]
    assert sorted(p.name for p in (dst / "labelsTr").iterdir()) == ["aa_good.nii.gz", "zz_good.nii.gz"]
    meta = json.loads((dst / "dataset.json").read_text(encoding="utf-8"))
    assert [t["image"] for t in meta["training"]] == ["./imagesTr/aa_good.nii.gz", "./imagesTr/zz_good.nii.gz"]
    assert sorted(p.name for p in dst.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]


def test_bad_series_fail_segment_reading_too(tmp_path):
    """The same checks guard `medunet segment`'s DICOM reader (one line, naming the file)."""
    s = ds.write_ct_series(tmp_path / "dup", shape=SHAPE, duplicate=2)
    with pytest.raises(InputError, match=r"duplicate slice: same position .* as ct\d{4}\.dcm") as err:
        read_image(s.folder)
    assert str(err.value).startswith(str(s.folder / "ct"))
    s = ds.write_ct_series(tmp_path / "tilt", shape=SHAPE, tilt=3)
    with pytest.raises(InputError, match=r"slice orientation .* differs"):
        read_image(s.folder)
    s = ds.write_ct_series(tmp_path / "gap", shape=SHAPE, skip=(3,))
    with pytest.raises(InputError, match=r"irregular slice spacing: gap of 5 mm .* missing slice\(s\) between"):
        read_image(s.folder)


def test_reimport_keeps_earlier_cases_and_refuses_other_labels(tmp_path):
    _good(tmp_path / "one", "p1")
    _good(tmp_path / "two", "p2")
    assert import_dicom(tmp_path / "one", tmp_path / "out", "GTV").ok == ["p1"]
    assert import_dicom(tmp_path / "two", tmp_path / "out", "GTV").ok == ["p2"]
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text(encoding="utf-8"))
    assert meta["numTraining"] == 2
    result = import_dicom(tmp_path / "two", tmp_path / "out", "GTV=tumour")
    assert not result.ok and "differ from those of the dataset" in result.failed["p2"]


def test_rtstruct_writer_round_trip_and_references(tmp_path):
    """The RTSTRUCT medunet writes reads back (by position) to the same voxels, referencing the series."""
    import pydicom

    series = _patient(tmp_path, direction=ds.rotation(-30.0, 8.0))
    image = read_image(series.folder)
    label = _expected(series)
    path = write_rtstruct(label, image, tmp_path / "rt.dcm", {1: "GTV", 2: "liver"})
    back, names = read_rtstruct_labels(path, image)
    np.testing.assert_array_equal(back, label)
    assert names == {1: "GTV", 2: "liver"}
    d = pydicom.dcmread(str(path))
    assert d.Modality == "RTSTRUCT" and d.StudyInstanceUID == series.study and d.PatientID == "PHANTOM01"
    fr = d.ReferencedFrameOfReferenceSequence[0]
    assert fr.FrameOfReferenceUID == series.frame_of_reference
    se = fr.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert se.SeriesInstanceUID == series.series
    assert [r.ReferencedSOPInstanceUID for r in se.ContourImageSequence] == series.sop_instances
    for c in d.ROIContourSequence[0].ContourSequence:  # each contour references its own slice
        k = series.sop_instances.index(c.ContourImageSequence[0].ReferencedSOPInstanceUID)
        pts = np.asarray(c.ContourData, float).reshape(-1, 3)
        ijk = (np.linalg.inv(series.lps) @ np.c_[pts, np.ones(len(pts))].T).T
        np.testing.assert_allclose(ijk[:, 2], k, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# the 4 real DICOM-RT patients against their NIfTI labels
PATIENTS = ("sts_001", "sts_002", "sts_004", "sts_005")


@pytest.fixture(scope="module")
def sarcoma_import(tmp_path_factory):
    if not (SARCOMA / "dicom").is_dir():
        pytest.skip(f"real DICOM-RT data not present at {SARCOMA / 'dicom'} (read-only shared dataset)")
    dst = tmp_path_factory.mktemp("sarcoma_import")
    result = import_dicom(SARCOMA / "dicom", dst, "GTV_Mass_CT=tumour")
    return dst, result


@pytest.mark.realdata
def test_real_rtstruct_matches_reference_nifti(sarcoma_import):
    dst, result = sarcoma_import
    assert result.ok == list(PATIENTS) and not result.failed
    for case in PATIENTS:
        ours = nib.load(str(dst / "labelsTr" / f"{case}.nii.gz"))
        ref = nib.load(str(SARCOMA / "labelsTr" / f"{case}.nii.gz"))
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)
        a, b = np.asarray(ours.dataobj) > 0, np.asarray(ref.dataobj) > 0
        dice = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
        assert dice >= 0.98, f"{case}: Dice {dice:.4f}"
        img = nib.load(str(dst / "imagesTr" / f"{case}.nii.gz"))
        ref_img = nib.load(str(SARCOMA / "imagesTr" / f"{case}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(ref_img.dataobj))
        np.testing.assert_allclose(img.affine, ref_img.affine, atol=1e-4)


@pytest.mark.realdata
def test_real_round_trip_dicom_seg_and_rtstruct(sarcoma_import, tmp_path):
    from medunet.io.dicom import read_dicom_seg, write_dicom_seg

    dst, _ = sarcoma_import
    for case in ("sts_002", "sts_005"):
        image = read_image(SARCOMA / "dicom" / case / "image")
        label = np.asarray(nib.load(str(dst / "labelsTr" / f"{case}.nii.gz")).dataobj)
        seg = write_dicom_seg(label, image, tmp_path / f"{case}_seg.dcm", {1: "tumour"})
        back, affine, names = read_dicom_seg(seg)
        np.testing.assert_array_equal(back, label)
        np.testing.assert_allclose(affine, image.affine, atol=1e-4)
        rt = write_rtstruct(label, image, tmp_path / f"{case}_rt.dcm", {1: "tumour"})
        np.testing.assert_array_equal(read_rtstruct_labels(rt, image)[0], label)
    shutil.rmtree(tmp_path, ignore_errors=True)
