"""CT/MRI/cell pipelines from a Plan: shapes, orientation, spacing, normalisation, exact inversion,
2D slice sampling, the seed's weight map in the pipeline, caching datasets and loaders."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from medunet.data import Plan
from medunet.data.datalist import load_datalist
from medunet.data.datasets import estimate_cache_bytes, find_input_error, make_dataset, make_loader
from medunet.data.phantoms import generate_dataset
from medunet.data.planning import plan_dataset
from medunet.data.transforms import infer_transforms, train_transforms, val_transforms
from medunet.io import InputError


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory):
    return generate_dataset("ct", tmp_path_factory.mktemp("ct") / "ct", cases=3, seed=1, size="small", test_cases=0)


@pytest.fixture(scope="module")
def mri_dir(tmp_path_factory):
    return generate_dataset("mri", tmp_path_factory.mktemp("mri") / "mri", cases=2, seed=2, size="small",
                            test_cases=0)


@pytest.fixture(scope="module")
def ct_plan(ct_dir):
    plan = plan_dataset(ct_dir)
    plan.patch_size = [24, 24, 8]  # small, for speed; the pipeline does not depend on the value
    return plan


def _ct_items(ct_dir):
    return load_datalist(ct_dir)


def test_train_pipeline_ct_shapes_types_and_labels(ct_dir, ct_plan):
    t = train_transforms(ct_plan, num_samples=3, elastic=True, elastic_prob=1.0)
    t.set_random_state(0)
    out = t(_ct_items(ct_dir)[0])
    assert isinstance(out, list) and len(out) == 3
    label_values = set(ct_plan.labels.values())
    for sample in out:
        assert isinstance(sample["image"], MetaTensor) and sample["image"].dtype == torch.float32
        assert tuple(sample["image"].shape) == (1, 24, 24, 8)
        assert tuple(sample["label"].shape) == (1, 24, 24, 8)
        lab = sample["label"].as_tensor()
        assert torch.equal(lab, lab.round()) and set(torch.unique(lab).tolist()) <= label_values
    # positive-only sampling: every patch is centred on a foreground voxel
    positive = train_transforms(ct_plan, num_samples=4, augment=False, pos_neg=(1.0, 0.0))
    positive.set_random_state(0)
    assert all(bool((s["label"] > 0).any()) for s in positive(_ct_items(ct_dir)[1]))


def test_val_pipeline_reorients_resamples_and_normalises(ct_dir, ct_plan):
    items = _ct_items(ct_dir)
    for item in items:
        out = val_transforms(ct_plan)(item)
        image, label = out["image"], out["label"]
        assert image.shape[1:] == label.shape[1:]
        affine = image.affine.numpy()
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), ct_plan.target_spacing, rtol=1e-4)
        norm = ct_plan.normalization
        lo, hi = ((v - norm["mean"]) / norm["std"] for v in norm["clip"])
        assert float(image.min()) >= lo - 1e-4 and float(image.max()) <= hi + 1e-4
        # foreground (organ) voxels are standardised with the dataset's foreground statistics
        fg = image[label > 0]
        assert abs(float(fg.mean())) < 1.0


def test_mri_zscore_per_image(mri_dir):
    plan = plan_dataset(mri_dir)
    assert plan.normalization["scheme"] == "zscore"
    out = val_transforms(plan)(load_datalist(mri_dir)[0])
    assert abs(float(out["image"].mean())) < 1e-3 and abs(float(out["image"].std()) - 1) < 1e-2


def test_infer_pipeline_inverts_to_the_input_grid(ct_dir, ct_plan):
    item = _ct_items(ct_dir)[0]  # stored in a non-RAS voxel order (see the phantom's affine)
    original = nib.load(item["label"])
    pre = infer_transforms(ct_plan)
    data = pre({"image": item["image"]})
    resampled_label = val_transforms(ct_plan)(item)["label"]
    assert data["image"].shape[1:] == resampled_label.shape[1:]
    data["pred"] = MetaTensor(resampled_label.as_tensor(), meta=data["image"].meta,
                              applied_operations=data["image"].applied_operations)
    back = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
    assert tuple(back.shape[1:]) == original.shape
    np.testing.assert_allclose(back.affine.numpy(), original.affine, atol=1e-4)
    truth = np.asarray(original.dataobj)
    pred = back[0].numpy()
    for value in np.unique(truth)[1:]:
        a, b = truth == value, pred == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9  # resampled there and back


def test_2d_plan_samples_slices_from_volumes(ct_dir, ct_plan):
    plan = Plan(**{**ct_plan.to_dict(), "spatial_dims": 2, "patch_size": [24, 24],
                   "target_spacing": ct_plan.target_spacing[:2], "network": {"name": "dynunet"}})
    out = train_transforms(plan, num_samples=2)(_ct_items(ct_dir)[1])
    assert [tuple(s["image"].shape) for s in out] == [(1, 24, 24)] * 2
    assert [tuple(s["label"].shape) for s in out] == [(1, 24, 24)] * 2
    val = val_transforms(plan)(_ct_items(ct_dir)[1])
    assert val["image"].ndim == 4  # volumes stay volumes for slice-wise inference


def test_2d_png_cells_with_seed_weight_map(tmp_path):
    cells = generate_dataset("cells", tmp_path / "cells", cases=2, seed=0, size="small", fmt="png", test_cases=0)
    plan = plan_dataset(cells, spatial_dims=2)
    items = load_datalist(cells)
    t = train_transforms(plan, num_samples=2, weight_map=True, instance_key="instance")
    t.set_random_state(0)
    out = t(items[0])
    for sample in out:
        assert tuple(sample["image"].shape) == (1, *plan.patch_size)
        assert tuple(sample["weight"].shape) == (1, *plan.patch_size)
        assert "instance" not in sample
        # the border term appears in the gaps between touching cells
        assert float(sample["weight"].max()) > 5.0


def test_multichannel_items_stack_channels(ct_dir, ct_plan):
    item = _ct_items(ct_dir)[0]
    plan = Plan(**{**ct_plan.to_dict(), "in_channels": 2})
    out = val_transforms(plan)({"image": [item["image"], item["image"]], "label": item["label"]})
    assert out["image"].shape[0] == 2
    torch.testing.assert_close(out["image"][0], out["image"][1])


def test_bad_file_gives_one_line_input_error(tmp_path, ct_plan):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti at all" * 10))
    with pytest.raises(RuntimeError) as info:
        infer_transforms(ct_plan)({"image": str(bad)})
    err = find_input_error(info.value)
    assert isinstance(err, InputError) and str(bad) in str(err) and "\n" not in str(err)


def test_datasets_cache_choice_and_loader(ct_dir, ct_plan, tmp_path):
    items = _ct_items(ct_dir)
    need = estimate_cache_bytes(items, plan=ct_plan)
    assert need > 0
    t = train_transforms(ct_plan, num_samples=2, augment=False)
    ds = make_dataset(items, t, cache="auto", memory_budget_gb=1.0, plan=ct_plan)
    assert ds.medunet_cache == "memory"
    tight = need / 2 / 1024**3
    assert make_dataset(items, t, cache="auto", memory_budget_gb=tight, plan=ct_plan).medunet_cache.startswith(
        "memory(0.")
    persistent = make_dataset(items, t, cache="auto", memory_budget_gb=tight, cache_dir=tmp_path / "c", plan=ct_plan)
    assert persistent.medunet_cache == "persistent"
    assert make_dataset(items, t, cache="none").medunet_cache == "none"
    for dataset in (ds, persistent):
        batch = next(iter(make_loader(dataset, batch_size=2, shuffle=False)))
        assert tuple(batch["image"].shape) == (4, 1, 24, 24, 8)  # 2 cases x 2 patches
    assert any((tmp_path / "c").iterdir())  # persistent cache written
    with pytest.raises(ValueError, match="cache_dir"):
        make_dataset(items, t, cache="persistent")


def test_valid_convolution_plans_mirror_pad(tmp_path):
    cells = generate_dataset("cells", tmp_path / "cells", cases=1, seed=0, size="small", test_cases=0)
    item = load_datalist(cells)[0]
    valid = plan_dataset(cells, spatial_dims=2, network="unet2015")  # output must cover the planned tile
    assert valid.build_network().output_shape(valid.patch_size)[0] >= valid.median_shape[0]
    same = Plan(**{**valid.to_dict(), "network": {"name": "unet2015", "padding": "same"}})
    zero_fraction = {}
    for name, plan in (("valid", valid), ("same", same)):
        t = train_transforms(plan, augment=False)
        t.set_random_state(0)
        zero_fraction[name] = float((t(item)[0]["image"] == 0).float().mean())
    assert zero_fraction["valid"] < 0.01 < 0.5 < zero_fraction["same"]
