"""Planning for CT-sized data on a CPU: the grid is coarsened (nnU-Net's 3d_lowres rule) until the
budget's patch covers a quarter of the median image, and the plan reports the network's receptive field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medunet.data.planning import _coarser, format_plan, plan_dataset, receptive_field
from medunet.networks import create


def _fingerprint(shape, spacing, n=6, seed=0):
    """A fingerprint of ``n`` CT cases around ``shape``/``spacing`` (no files: planning reads only this)."""
    rng = np.random.default_rng(seed)
    cases = [{"image": f"case{i}.nii.gz", "shape": [int(s * rng.uniform(0.85, 1.15)) for s in shape],
              "spacing": list(spacing)} for i in range(n)]
    stats = {"mean": 40.0, "std": 60.0, "median": 40.0, "min": -1000.0, "max": 1500.0,
             "percentile_00_5": -100.0, "percentile_99_5": 200.0, "samples": 1000}
    return {"n_cases": n, "n_refused": 0, "cases": cases, "spacing_median": list(spacing),
            "shape_median": list(shape), "intensity": [stats], "in_channels": 1, "nonzero_fraction_median": 1.0,
            "label_voxels": {"0": 1000, "1": 100}, "modality": {"0": "CT"}, "labels": {"background": 0, "tumour": 1},
            "failed": [], "seconds": 0.0}


def test_coarsening_step_evens_out_anisotropy_first():
    assert _coarser([1.0, 1.0, 3.3]) == pytest.approx([1.03, 1.03, 3.3])  # thick axis waits
    assert _coarser([2.0, 2.0, 3.3]) == pytest.approx([2.06, 2.06, 3.399])  # within 2x: all together


def test_cpu_plan_coarsens_until_the_patch_covers_a_quarter():
    fp = _fingerprint([190, 190, 64], [0.98, 0.98, 3.27])
    plan = plan_dataset(fingerprint=fp)
    est = plan.fingerprint["estimate"]
    assert plan.fingerprint["lowres"]["from_spacing"] == pytest.approx([0.98, 0.98, 3.27])
    assert all(t > f for t, f in zip(plan.target_spacing[:2], [0.98, 0.98]))  # in-plane coarsened
    assert max(plan.target_spacing) / min(plan.target_spacing) <= 3.27 / 0.98  # anisotropy not worse
    assert math.prod(plan.patch_size) >= 0.25 * math.prod(plan.median_shape)
    assert est["patch_coverage"] >= 0.25 and est["gflops_per_step"] <= 40.0
    assert all(p <= m for p, m in zip(plan.patch_size, plan.median_shape))  # never larger than the median
    # the receptive field covers the patch, and is stated in mm on the plan's grid
    assert all(rf >= p for rf, p in zip(est["receptive_field_voxels"], plan.patch_size))
    assert est["receptive_field_mm"] == pytest.approx(
        [r * s for r, s in zip(est["receptive_field_voxels"], plan.target_spacing)], abs=0.06)
    text = format_plan(plan)
    assert "receptive field" in text and "coarsened grid" in text


def test_gpu_and_explicit_spacing_keep_the_full_resolution_grid():
    fp = _fingerprint([190, 190, 64], [0.98, 0.98, 3.27])
    gpu = plan_dataset(fingerprint=fp, gpu=True)
    assert gpu.target_spacing == pytest.approx([0.98, 0.98, 3.27]) and "lowres" not in gpu.fingerprint
    fixed = plan_dataset(fingerprint=fp, spacing=[1.5, 1.5, 3.27])
    assert fixed.target_spacing == pytest.approx([1.5, 1.5, 3.27]) and "lowres" not in fixed.fingerprint
    off = plan_dataset(fingerprint=fp, coarsen=False)
    assert off.target_spacing == pytest.approx([0.98, 0.98, 3.27])


def test_small_images_are_not_coarsened():
    plan = plan_dataset(fingerprint=_fingerprint([36, 50, 35], [1.0, 1.0, 1.0]))
    assert plan.target_spacing == pytest.approx([1.0, 1.0, 1.0]) and "lowres" not in plan.fingerprint


@pytest.mark.parametrize("kernels,strides", [
    ([[3, 3, 1], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [2, 2, 1], [2, 2, 2]]),
    ([[3, 3], [3, 3], [3, 3], [3, 3]], [[1, 1], [2, 2], [2, 2], [2, 1]]),
])
def test_receptive_field_matches_the_network_gradient(kernels, strides):
    """The formula against the support of d(output voxel)/d(input) of a real DynUNet (batch norm in eval
    mode, so no statistic spreads the dependency over the whole image)."""
    dims = len(kernels[0])
    torch.manual_seed(0)
    net = create("dynunet", spatial_dims=dims, in_channels=1, out_channels=1, kernel_size=kernels,
                 strides=strides, filters=[2] * len(kernels), norm_name="batch").eval()
    size = [96] * dims
    x = torch.zeros(1, 1, *size, requires_grad=True)
    centre = tuple(s // 2 for s in size)
    net(x)[(0, 0) + centre].backward()
    support = x.grad[0, 0].abs() > 0
    measured = []
    for axis in range(dims):
        hit = torch.nonzero(support.any(dim=tuple(a for a in range(dims) if a != axis))).flatten()
        measured.append(int(hit.max() - hit.min() + 1))
    expected = receptive_field(kernels, strides)
    # the formula is the largest field over output positions; a position's own may be a stride smaller
    assert all(e - 4 <= m <= e for m, e in zip(measured, expected)), (measured, expected)


def _msd(tmp_path, labels):
    """A tiny MSD CT dataset with the given label arrays (images: noise in HU)."""
    import json

    import nibabel as nib

    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    items = []
    for i, lab in enumerate(labels):
        img = rng.normal(40, 30, lab.shape).astype(np.float32)
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(img, affine), str(root / "imagesTr" / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab.astype(np.uint8), affine), str(root / "labelsTr" / f"c{i}.nii.gz"))
        items.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ", "2": "kidney"},
        "training": items}))
    return root


def test_classes_that_are_one_object_in_every_label_keep_their_largest_component(tmp_path):
    labels = []
    for shift in range(3):
        lab = np.zeros((24, 24, 8), dtype=np.uint8)
        lab[4 + shift:12, 4:12, 2:6] = 1  # one organ
        lab[16:20, 2:6, 2:6] = 2  # two kidneys
        lab[16:20, 16 + shift:20 + shift, 2:6] = 2
        labels.append(lab)
    labels[1][1, 1, 1] = 1  # a one-voxel speck of annotation noise does not make the organ two objects
    plan = plan_dataset(_msd(tmp_path, labels))
    assert plan.largest_component == [1]
    fractions = plan.fingerprint["largest_component_fraction"]
    assert fractions["1"] == pytest.approx(1 - 1 / (8 * 8 * 4 - 8 * 4 + 1), abs=1e-3) and fractions["2"] == 0.5
    assert "largest component only" in format_plan(plan)


def test_predictor_and_validation_clean_the_plans_classes():
    from medunet.data.plan import Plan
    from medunet.engines.builders import segmentation_postprocessing
    from medunet.inference.predictor import Predictor

    plan = Plan(labels={"background": 0, "organ": 1, "kidney": 2}, patch_size=[8, 8, 8], largest_component=[1])
    net = create("dynunet", spatial_dims=3, in_channels=1, out_channels=3, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                 filters=[2, 4, 8])
    assert Predictor(net, plan).largest_component == [1]
    assert Predictor(net, plan, largest_component=True).largest_component == [1, 2]
    assert Predictor(net, plan, largest_component=False).largest_component == []
    lab = np.zeros((12, 12, 6), dtype=np.int64)
    lab[1:4, 1:4, 1:3] = 1
    lab[8:11, 8:11, 1:3] = 1  # a second, equally sized organ blob: one of them goes
    lab[7:9, 1:3, 1:2] = 1  # a small island: goes
    lab[1:3, 8:10, 1:3] = 2
    lab[8:10, 1:3, 4:6] = 2  # kidney: two objects, both stay
    onehot = torch.nn.functional.one_hot(torch.from_numpy(lab), 3).movedim(-1, 0).float()
    out = segmentation_postprocessing(plan)({"pred": onehot, "label": torch.from_numpy(lab)[None].float()})
    got = out["pred"].argmax(0).numpy()
    assert (got == 2).sum() == (lab == 2).sum()
    assert (got == 1).sum() == 3 * 3 * 2 and (got[7:9, 1:3, 1:2] == 0).all()
