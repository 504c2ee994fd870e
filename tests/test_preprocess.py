"""One preprocessing: :func:`medunet.data.preprocess.preprocess_case` (what the Predictor runs) equals
``medunet.data.transforms.val_transforms`` (image and label) on CT phantoms — oblique ones included —
and MRI phantoms, and the Predictor's ``preprocess`` is that function."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medunet.data import Plan
from medunet.data.phantoms import generate_case
from medunet.data.preprocess import preprocess_case, preprocess_tensor
from medunet.io import read_image, write_nifti

REPO = Path(__file__).resolve().parents[1]


def _write_case(kind: str, index: int, folder: Path) -> dict:
    case = generate_case(kind, index, seed=0, size="small")
    image, label = folder / f"{kind}_{index}.nii.gz", folder / f"{kind}_{index}_label.nii.gz"
    write_nifti(case.image.astype(np.float32), case.affine, image, dtype=np.float32)
    write_nifti(case.label.astype(np.uint8), case.affine, label, dtype=np.uint8)
    return {"image": str(image), "label": str(label), "oblique": bool(case.info.get("oblique"))}


@pytest.mark.parametrize("kind,bundle", [("ct", "ct"), ("mri", "mri")])
def test_preprocess_case_equals_val_transforms(kind, bundle, tmp_path):
    from medunet.data.transforms import val_transforms

    plan = Plan.load(REPO / "bundles" / bundle / "configs" / "plan.json")
    items = [_write_case(kind, i, tmp_path) for i in range(6)]
    if kind == "ct":
        assert any(i["oblique"] for i in items), "the CT cases should include an oblique grid"
    pipeline = val_transforms(plan)
    for item in items:
        ref = pipeline({"image": item["image"], "label": item["label"]})
        ours = preprocess_case(read_image(item["image"]), plan, read_image(item["label"]))
        assert tuple(ours.image.shape) == tuple(ref["image"].shape), item["image"]
        np.testing.assert_allclose(ours.grid.plan_affine, np.asarray(ref["image"].affine), atol=1e-6)
        torch.testing.assert_close(ours.image, ref["image"].as_tensor(), atol=2e-4, rtol=1e-4)
        assert torch.equal(ours.label, ref["label"].as_tensor()), item["label"]


def test_predictor_preprocess_is_the_data_function(tmp_path):
    from medunet.inference import Predictor

    plan = Plan.load(REPO / "bundles" / "ct" / "configs" / "plan.json")
    item = _write_case("ct", 0, tmp_path)
    image = read_image(item["image"])
    x = torch.from_numpy(image.array)[None]
    ours, grid, box = Predictor(plan.build_network(), plan, device="cpu").preprocess(x, image.affine)
    ref, ref_grid, ref_box = preprocess_tensor(x, image.affine, plan)
    assert torch.equal(ours, ref) and box == ref_box
    np.testing.assert_array_equal(grid.plan_affine, ref_grid.plan_affine)
