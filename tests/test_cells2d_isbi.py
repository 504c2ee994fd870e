"""cells2d on 2D data it plans itself: the real ISBI 2012 EM slices (a few-iteration run on 3 of them,
skipped without ../shared), planning errors as one line, output tiles that reach the image border in
training, and overlap-tile inference on a 512×512 slice equal to one pass over the whole slice."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import BUNDLES, REPO_ROOT, one_thread, run_bundle, tiny_overrides

ISBI = REPO_ROOT.parent / "shared" / "data" / "isbi2012_em"
needs_isbi = pytest.mark.skipif(not (ISBI / "dataset.json").is_file(),
                                reason=f"the ISBI 2012 EM slices are not at {ISBI} (../shared/data/isbi2012_em)")
pytestmark = pytest.mark.usefixtures("one_thread")
assert one_thread
#: depth 4 and valid convolutions as the recipe, 4…64 features so that a step takes a fraction of a second
TINY_FEATURES = [4, 8, 16, 32, 64]


def _three_slices(root: Path) -> Path:
    """An MSD folder of links to 3 real slices (nothing of the shared data is copied)."""
    meta = json.loads((ISBI / "dataset.json").read_text(encoding="utf-8"))
    items = meta["training"][:3]
    for item in items:
        for key in ("image", "label"):
            link = root / item[key]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((ISBI / item[key]).resolve())
    (root / "dataset.json").write_text(json.dumps({**meta, "training": items, "numTraining": len(items)}))
    return root


@needs_isbi
def test_few_iterations_on_three_real_slices(tmp_path):
    """--replan on the real 2D slices plans a 2D valid-convolution unet2015, trains, validates and is
    evaluated with Dice, pixel error and Rand error."""
    data = _three_slices(tmp_path / "isbi3")
    run = tmp_path / "run"
    overrides = tiny_overrides("cells2d", data, run, replan=True, network_features=TINY_FEATURES, n_folds=3,
                               plan_overrides={}, epoch_length=2, cpu_bf16=False)
    run_bundle("cells2d", **overrides)
    plan = json.loads((run / "models" / "plan.json").read_text(encoding="utf-8"))
    assert plan["spatial_dims"] == 2 and plan["labels"] == {"membrane": 0, "cell": 1}
    assert plan["network"]["name"] == "unet2015" and plan["network"]["padding"] == "valid"
    assert plan["network"]["features"] == TINY_FEATURES and plan["batch_size"] == 1
    history = list(csv.DictReader(open(run / "eval" / "history.csv")))
    assert len(history) == 1 and 0.0 <= float(history[0]["val_mean_dice"]) <= 1.0

    run_bundle("cells2d", names=("train", "evaluate"), **overrides)
    summary = json.loads((run / "eval" / "evaluation" / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_cases"] == 1 and not summary["failed"]
    for name in ("pixel_error", "rand_error", "warping_error"):
        assert 0.0 <= summary["case_metrics"][name]["mean"] <= 1.0
    header = (run / "eval" / "evaluation" / "metrics.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "pixel_error" in header and "rand_error" in header and "dice_cell" in header


def test_planning_error_is_one_line(tmp_path):
    """A plan the data cannot have (3D on 2D images) ends ``python -m monai.bundle run`` with one line
    naming the dataset, not a traceback; the 2D bundle plans 2D images in 2D by itself."""
    from medunet.data.phantoms import generate_dataset
    from medunet.engines import resolve_plan

    data = tmp_path / "cells"
    generate_dataset("cells", data, cases=3, seed=0, size="small", fmt="png")
    plan = resolve_plan(tmp_path / "none.json", data, replan=True, planner={"network": "unet2015"})
    assert plan.spatial_dims == 2
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(BUNDLES / "cells2d" / "train.json"), "--dataset_dir", str(data), "--replan", "True",
           "--planner", '{"network": "unet2015", "spatial_dims": 3}', "--output_dir", str(tmp_path / "eval"),
           "--ckpt_dir", str(tmp_path / "models"), "--mlflow", "False", "--logging_file", "False"]
    env = {k: v for k, v in os.environ.items() if k != "MEDUNET_DEBUG"}
    res = subprocess.run(cmd, cwd=REPO_ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode == 1 and "Traceback" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if str(data) in ln and "3D" in ln]
    assert len(lines) == 1 and lines[0].startswith("ERROR:"), text[-3000:]
    assert not (tmp_path / "models" / "model.pt").exists()


def test_training_tiles_reach_the_image_border(tmp_path):
    """With valid convolutions the output tile (input minus the margin) must be able to land on the
    image's border pixels, with a zero weight map in the mirrored band around the image."""
    from medunet.data import Plan
    from medunet.data.transforms import train_transforms

    side = 32
    ramp = (np.arange(side)[:, None] * 1000 + np.arange(side)[None, :]).astype(np.float32)
    label = (np.arange(side)[:, None] % 8 < 6).astype(np.uint8) * np.ones((1, side), np.uint8)
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(ramp, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    plan = Plan(labels={"background": 0, "cell": 1}, spatial_dims=2, modality="microscopy", target_spacing=None,
                normalization={"scheme": "none"}, patch_size=[52, 52], batch_size=1,
                network={"name": "unet2015", "features": [4, 8, 16], "padding": "valid", "dropout": 0.0})
    out = plan.build_network().output_shape(plan.patch_size)[0]
    margin = (plan.patch_size[0] - out) // 2
    pipeline = train_transforms(plan, augment=False, weight_map=True)
    pipeline.set_random_state(seed=0)
    starts = set()
    for _ in range(60):
        sample = pipeline({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")})[0]
        window = (0, slice(margin, margin + out), slice(margin, margin + out))
        assert bool((sample["weight"][window] > 0).all())  # the output tile lies on real pixels
        assert float(sample["weight"].min()) == 0.0  # ... and the band around the image weighs nothing
        first = int(sample["image"][window][0, 0])
        starts.add((first // 1000, first % 1000))
    rows = {r for r, _ in starts}
    assert 0 in rows and side - out in rows, sorted(starts)  # top and bottom rows of the image reached


def test_overlap_tile_equals_one_pass_on_a_512_slice():
    """Overlap-tile (mirrored borders, tiles aligned to the pooling period) gives what one pass over the
    whole mirrored 512×512 slice gives."""
    from medunet import networks
    from medunet.inference import build_inferer

    torch.manual_seed(0)
    net = networks.create("unet2015", spatial_dims=2, in_channels=1, out_channels=2, features=TINY_FEATURES,
                          padding="valid", dropout=0.0).eval()
    image = torch.randn(1, 1, 512, 512)
    if (ISBI / "imagesTr" / "em_00.png").is_file():
        from PIL import Image

        pixels = np.asarray(Image.open(ISBI / "imagesTr" / "em_00.png"), dtype=np.float32)
        image = torch.as_tensor((pixels - pixels.mean()) / pixels.std())[None, None]
    reach = [512 + 2 * m for m in net.input_margin((572, 572))]  # an input tile whose output is the slice
    whole, tiled = build_inferer(net, roi_size=reach), build_inferer(net, roi_size=(204, 204))
    with torch.no_grad():
        one_pass, tiles = whole(image, net), tiled(image, net)
    assert whole.last_stats["windows"] == 1 and tiled.last_stats["windows"] > 4
    assert one_pass.shape == tiles.shape == (1, 2, 512, 512)
    torch.testing.assert_close(tiles, one_pass, atol=1e-4, rtol=1e-4)


def test_a_time_budget_is_not_cut_short_by_the_epoch_default():
    """Without a time budget the bundle trains 100 epochs; with one the clock alone ends the run."""
    from monai.bundle import ConfigParser

    def max_epochs(**overrides):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / "cells2d" / "configs" / "train.json"))
        parser.update(overrides)
        return parser.get_parsed_content("max_epochs")

    assert max_epochs() == 100
    assert max_epochs(time_budget=1680) >= 10**6
    assert max_epochs(time_budget=60, max_epochs=3) == 3
