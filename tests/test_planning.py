"""Dataset fingerprint and nnU-Net-style planning: spacing rule, RAS frame, intensity statistics, patch
and batch fitted to budgets, other networks, ``medunet plan``, and the real hippocampus data."""

from __future__ import annotations

import json
import math
import time

import nibabel as nib
import numpy as np
import pytest

from medunet.cli import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, main
from medunet.data import Plan
from medunet.data.datalist import load_datalist
from medunet.data.phantoms import generate_dataset
from medunet.data.planning import (
    _ras_geometry,
    estimate_memory_mb,
    fingerprint_dataset,
    format_plan,
    plan_dataset,
    target_spacing,
)


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory):
    return generate_dataset("ct", tmp_path_factory.mktemp("ct") / "ct", cases=4, seed=3, size="small", test_cases=0)


@pytest.fixture(scope="module")
def ct_fingerprint(ct_dir):
    return fingerprint_dataset(ct_dir)


def test_target_spacing_median_and_anisotropic_rule():
    iso = np.array([[1.0, 1.0, 1.2], [0.9, 0.9, 1.0], [1.1, 1.1, 1.1]])
    assert target_spacing(iso) == pytest.approx(np.median(iso, axis=0).tolist())
    thick = np.array([[0.7, 0.7, 5.0], [0.8, 0.8, 5.0], [0.75, 0.75, 1.5], [0.7, 0.7, 5.0], [0.8, 0.8, 2.5]])
    out = target_spacing(thick)
    assert out[:2] == pytest.approx([0.75, 0.75])
    assert out[2] == pytest.approx(np.percentile(thick[:, 2], 10))  # 10th percentile, not the median 5.0
    # never finer than the coarsest in-plane axis
    assert target_spacing(np.array([[1.0, 1.0, 4.0], [1.0, 1.0, 0.2], [1.0, 1.0, 4.0]]))[2] >= 1.0


def test_geometry_is_reported_in_the_ras_frame():
    # voxel axis 0 runs along world z, axis 1 along x, axis 2 along y (a sagittal-ish storage order)
    affine = np.array([[0, 0.8, 0, 0], [0, 0, 0.7, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    shape, spacing = _ras_geometry((20, 100, 90), affine, 3)
    assert shape == [100, 90, 20] and spacing == pytest.approx([0.8, 0.7, 3.0])


def test_ct_fingerprint_statistics(ct_dir, ct_fingerprint):
    fp = ct_fingerprint
    assert fp["n_cases"] == 4 and not fp["failed"] and fp["modality"] == {"0": "CT"}
    # independent check: percentiles of all labelled voxels
    values = []
    for item in load_datalist(ct_dir):
        img, lab = (np.asarray(nib.load(item[k]).dataobj) for k in ("image", "label"))
        values.append(img[lab > 0])
    values = np.concatenate(values)
    stats = fp["intensity"][0]
    spread = np.percentile(values, 99.5) - np.percentile(values, 0.5)
    assert stats["percentile_00_5"] == pytest.approx(np.percentile(values, 0.5), abs=0.05 * spread)
    assert stats["percentile_99_5"] == pytest.approx(np.percentile(values, 99.5), abs=0.05 * spread)
    assert stats["mean"] == pytest.approx(values.mean(), abs=0.05 * spread)
    for case in fp["cases"]:
        img = nib.load(case["image"])
        assert sorted(case["shape"]) == sorted(img.shape)  # permuted to RAS order
        assert sorted(case["spacing"]) == pytest.approx(sorted(float(z) for z in img.header.get_zooms()), rel=1e-4)


def test_ct_plan(ct_dir, ct_fingerprint):
    plan = plan_dataset(ct_dir, fingerprint=ct_fingerprint)
    assert plan.modality == "CT" and plan.labels["background"] == 0 and plan.out_channels == 4
    norm = plan.normalization
    assert norm["scheme"] == "ct" and norm["clip"][0] < norm["mean"] < norm["clip"][1] and norm["std"] > 0
    spacings = np.array([c["spacing"] for c in ct_fingerprint["cases"]])
    assert plan.target_spacing == pytest.approx(target_spacing(spacings))
    net = plan.network
    assert net["name"] == "dynunet" and len(net["kernel_size"]) == len(net["strides"]) == len(net["filters"])
    divisors = [math.prod(s[a] for s in net["strides"]) for a in range(3)]
    assert all(p % d == 0 for p, d in zip(plan.patch_size, divisors))
    # never larger than the median shape rounded up to a valid size
    assert all(p <= math.ceil(m / d) * d for p, m, d in zip(plan.patch_size, plan.median_shape, divisors))
    # thick slices: the first level does not pool along z
    assert net["strides"][1][2] == 1 and net["kernel_size"][0][2] == 1
    est = plan.fingerprint["estimate"]
    assert est["memory_mb"] <= est["memory_budget_mb"] and est["gflops_per_step"] <= est["gflops_budget"]
    assert plan.batch_size >= 2
    plan.build_network().check_input_shape(plan.patch_size)


def test_budgets_shape_the_patch(ct_dir, ct_fingerprint):
    cpu = plan_dataset(ct_dir, fingerprint=ct_fingerprint)
    tiny = plan_dataset(ct_dir, fingerprint=ct_fingerprint, gflops_budget=4.0)
    gpu = plan_dataset(ct_dir, fingerprint=ct_fingerprint, gpu=True)
    assert math.prod(tiny.patch_size) < math.prod(cpu.patch_size) <= math.prod(gpu.patch_size)
    assert tiny.fingerprint["estimate"]["gflops_per_step"] <= 4.0
    assert gpu.network["filters"][0] == 32 and cpu.network["filters"][0] == 16
    assert estimate_memory_mb([32] * 3, [[1] * 3, [2] * 3], [8, 16], batch_size=4) == pytest.approx(
        4 * estimate_memory_mb([32] * 3, [[1] * 3, [2] * 3], [8, 16], batch_size=1))


@pytest.mark.parametrize("network", ["unet", "unetr"])
def test_other_networks_get_a_valid_patch(ct_dir, ct_fingerprint, network):
    plan = plan_dataset(ct_dir, network=network, fingerprint=ct_fingerprint)
    assert plan.network["name"] == network
    plan.build_network().check_input_shape(plan.patch_size)


def test_2d_plan_and_round_trip(ct_dir, ct_fingerprint, tmp_path):
    plan = plan_dataset(ct_dir, spatial_dims=2, fingerprint=ct_fingerprint)
    assert plan.spatial_dims == 2 and len(plan.patch_size) == 2 and len(plan.target_spacing) == 2
    assert plan.fingerprint["slice_axis"] == 2
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.to_dict() == plan.to_dict()
    assert "patch size" in format_plan(loaded)


def test_cli_plan(ct_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(ct_dir), "-o", str(out), "--dims", "3"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "target spacing" in printed and "patch size" in printed
    assert Plan.load(out).modality == "CT"
    assert main(["plan", str(tmp_path / "missing"), "-o", str(tmp_path / "x.json")]) == EXIT_FAILURE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and not (tmp_path / "x.json").exists()


def test_broken_case_is_skipped_and_reported(tmp_path, capsys):
    data = generate_dataset("mri", tmp_path / "mri", cases=3, seed=0, size="small", test_cases=0)
    broken = load_datalist(data)[1]["image"]
    with open(broken, "wb") as f:
        f.write(b"\x1f\x8b truncated")
    out = tmp_path / "plan.json"
    assert main(["plan", str(data), "-o", str(out)]) == EXIT_PARTIAL
    err = capsys.readouterr().err
    assert broken in err
    plan = Plan.load(out)
    assert plan.fingerprint["n_cases"] == 2 and plan.normalization["scheme"] == "zscore"


def test_hippocampus_plan(hippocampus_dir):
    start = time.perf_counter()
    fp = fingerprint_dataset(hippocampus_dir)
    seconds = time.perf_counter() - start
    print(f"hippocampus fingerprint: {fp['n_cases']} cases in {seconds:.1f} s")
    assert fp["n_cases"] == 195 and not fp["failed"]
    # independent: median RAS shape from the headers (these files are stored in RAS order)
    headers = [nib.load(c["image"]) for c in fp["cases"]]
    assert all(nib.aff2axcodes(h.affine) == ("R", "A", "S") for h in headers)
    median_shape = np.median([h.shape for h in headers], axis=0)
    plan = plan_dataset(hippocampus_dir, fingerprint=fp)
    assert plan.modality == "MRI" and plan.normalization["scheme"] == "zscore"
    assert plan.labels == {"background": 0, "anterior": 1, "posterior": 2}
    assert plan.target_spacing == pytest.approx([1.0, 1.0, 1.0])
    assert plan.median_shape == [int(round(s)) for s in median_shape]
    assert all(p <= m + 8 for p, m in zip(plan.patch_size, plan.median_shape))
    gpu = plan_dataset(hippocampus_dir, fingerprint=fp, gpu=True)
    json.dumps(gpu.to_dict())
    print("hippocampus plan (cpu):", plan.patch_size, plan.batch_size, "(gpu):", gpu.patch_size, gpu.batch_size)


def _rewrite_4d(path, frames: int) -> None:
    """Replace a 3D NIfTI by a (X, Y, Z, frames) one on the same grid."""
    img = nib.load(path)
    data = np.stack([np.asarray(img.dataobj)] * frames, axis=-1)
    nib.save(nib.Nifti1Image(data, img.affine), path)


def test_header_only_cases_are_refused_with_the_readers_wording(tmp_path):
    """With --intensity-cases the other cases are judged from their headers: a 4D image in a 1-modality
    dataset and a PNG named .nii.gz are refused (io's own wording), the plan keeps 1 channel."""
    data = generate_dataset("mri", tmp_path / "mri", cases=3, seed=0, size="small", test_cases=0)
    items = load_datalist(data)
    _rewrite_4d(items[1]["image"], 2)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(items[2]["image"], format="PNG")
    fp = fingerprint_dataset(data, intensity_cases=1)  # only case 0 has its voxels read
    assert fp["n_cases"] == 1 and fp["n_refused"] == 2 and fp["in_channels"] == 1
    assert [line.split(": ")[0] for line in fp["failed"]] == [items[1]["image"], items[2]["image"]]
    assert "4D image with 2 frames/channels where dataset.json declares 1 modality" in fp["failed"][0]
    assert "PNG" in fp["failed"][1]


def test_without_dataset_json_the_majority_sets_the_channels(tmp_path):
    data = generate_dataset("mri", tmp_path / "mri", cases=3, seed=1, size="small", test_cases=0)
    items = load_datalist(data)
    _rewrite_4d(items[0]["image"], 3)
    fp = fingerprint_dataset(items)  # a bare list: nothing declared
    assert fp["in_channels"] == 1 and fp["n_cases"] == 2
    assert fp["failed"] == [f"{items[0]['image']}: 4D image with 3 frames/channels where the dataset's other "
                            f"cases are 1 channel(s)"]


def test_label_problems_refuse_the_case_and_every_refusal_is_named(tmp_path, capsys):
    """Labels off their image or with undeclared classes are refused (check-dataset's own checks); when
    nothing is left, every refused file is named on its own line and no plan is written."""
    data = generate_dataset("mri", tmp_path / "mri", cases=2, seed=2, size="small", test_cases=0)
    items = load_datalist(data)
    shifted = nib.load(items[0]["label"])
    affine = shifted.affine.copy()
    affine[:3, 3] += 15.0
    nib.save(nib.Nifti1Image(np.asarray(shifted.dataobj), affine), items[0]["label"])
    stray = nib.load(items[1]["label"])
    values = np.asarray(stray.dataobj).copy()
    values[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(values, stray.affine), items[1]["label"])
    out = tmp_path / "plan.json"
    assert main(["plan", str(data), "-o", str(out)]) == EXIT_FAILURE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and not out.exists(), err
    assert items[0]["label"] in err[0] and "mm away" in err[0]
    assert items[1]["label"] in err[1] and "[9] not declared" in err[1]
    assert err[2].startswith("medunet plan: error:") and "no usable cases (2 refused)" in err[2]
