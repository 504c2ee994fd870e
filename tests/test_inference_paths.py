"""One inference path: ``python -m monai.bundle run inferring`` (bundles/ct/inference.json) and
``medunet segment`` give voxel-identical labels with identical affines for one checkpoint and an OBLIQUE
CT phantom; the plan that goes with a checkpoint has one resolver; one input lister."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.data import Plan
from medunet.data.phantoms import generate_case
from medunet.io import save_checkpoint, write_nifti

REPO = Path(__file__).resolve().parents[1]

#: a random-init network small enough for a 2-core CPU (nothing is trained)
TINY = {"patch_size": [16, 16, 16],
        "network": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "filters": [4, 8, 16]}}


def tiny_plan(bundle: str = "ct") -> Plan:
    """The bundle's shipped plan with a tiny network."""
    data = Plan.load(REPO / "bundles" / bundle / "configs" / "plan.json").to_dict()
    data["patch_size"] = TINY["patch_size"]
    data["network"] = {**data["network"], **TINY["network"]}
    return Plan.from_dict(data)


def oblique_ct_case(folder: Path) -> Path:
    """Write the first oblique small CT phantom (rotated voxel grid) to ``folder``; returns its path."""
    for index in range(64):
        case = generate_case("ct", index, seed=0, size="small")
        if case.info["oblique"]:
            path = folder / f"ct_{index:03d}.nii.gz"
            write_nifti(case.image.astype(np.int16), case.affine, path, dtype=np.int16)
            return path
    raise AssertionError("no oblique CT phantom among the first 64 cases")


def random_checkpoint(folder: Path, plan: Plan, seed: int = 0) -> Path:
    """``folder/model.pt`` (random weights) with ``folder/plan.json`` beside it, as the trainer writes."""
    torch.manual_seed(seed)
    network = plan.build_network()
    path = save_checkpoint(network.state_dict(), folder / "model.pt")
    plan.save(folder / "plan.json")
    return path


def _run(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - t0


@pytest.fixture(scope="module")
def oblique_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    images = root / "images"
    images.mkdir()
    source = oblique_ct_case(images)
    (images / "broken.nii.gz").write_bytes(source.read_bytes()[:200])  # a truncated file: one line, go on
    ckpt = random_checkpoint(root / "models", tiny_plan())
    return root, images, source, ckpt


def test_inferring_and_segment_give_identical_labels_on_an_oblique_phantom(oblique_setup):
    root, images, source, ckpt = oblique_setup
    affine = nib.load(str(source)).affine
    assert not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3])), atol=1e-3), "phantom is not oblique"

    bundle_out, cli_out = root / "inferring", root / "segment"
    inferring, t_bundle = _run([sys.executable, "-m", "monai.bundle", "run", "inferring",
                                "--config_file", "bundles/ct/inference.json", "--ckpt_dir", str(ckpt.parent),
                                "--input_dir", str(images), "--output_dir", str(bundle_out), "--device", "cpu"])
    assert inferring.returncode == 0, inferring.stdout[-3000:] + inferring.stderr[-3000:]
    segment, t_cli = _run([sys.executable, "-m", "medunet.cli", "segment", "-i", str(images), "-o", str(cli_out),
                           "--bundle", "bundles/ct", "--checkpoint", str(ckpt), "--device", "cpu", "--no-progress"])
    assert segment.returncode == 3, segment.stdout[-3000:] + segment.stderr[-3000:]  # partial: broken.nii.gz
    print(f"\n[one path] inferring {t_bundle:.1f} s, medunet segment {t_cli:.1f} s (subprocess wall, 1 thread)")

    # the broken file: one line naming it, and the batch went on
    bad_lines = [ln for ln in inferring.stderr.splitlines() if "broken.nii.gz" in ln]
    assert len(bad_lines) == 1 and bad_lines[0].startswith("inferring: failed:"), inferring.stderr[-2000:]

    name = source.name.replace(".nii.gz", "_seg.nii.gz")
    assert sorted(p.name for p in bundle_out.iterdir()) == sorted(p.name for p in cli_out.iterdir()) == [name]
    a, b = nib.load(str(bundle_out / name)), nib.load(str(cli_out / name))
    label_a, label_b = np.asarray(a.dataobj), np.asarray(b.dataobj)
    assert label_a.dtype == label_b.dtype == np.uint8
    np.testing.assert_array_equal(label_a, label_b)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.header.get_sform(coded=True)[1] == b.header.get_sform(coded=True)[1]
    assert label_a.shape == nib.load(str(source)).shape
    np.testing.assert_allclose(a.affine, affine, atol=1e-5)
    assert len(np.unique(label_a)) > 1, "a constant label would make this comparison trivial"


def test_inferring_fails_in_one_line_when_no_input_succeeds(oblique_setup, tmp_path):
    root, _, _, ckpt = oblique_setup
    proc, _ = _run([sys.executable, "-m", "monai.bundle", "run", "inferring",
                    "--config_file", "bundles/ct/inference.json", "--ckpt_dir", str(ckpt.parent),
                    "--input_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out"),
                    "--device", "cpu"])
    assert proc.returncode != 0
    assert f"{tmp_path / 'missing'}: no input was segmented" in proc.stderr


def test_one_plan_resolver(tmp_path):
    from medunet.engines.workflow import trained_plan_file
    from medunet.inference import resolve_plan, trained_plan_path

    plan = tiny_plan()
    bundle = REPO / "bundles" / "ct"
    shipped = Plan.load(bundle / "configs" / "plan.json")
    # no checkpoint yet: the bundle's plan (the label server builds its random-init network so)
    assert resolve_plan(bundle, tmp_path / "models" / "model.pt").to_dict() == shipped.to_dict()
    assert trained_plan_file(tmp_path / "models", "default.json") == "default.json"
    # plan.json beside the weights wins over the bundle's
    ckpt = random_checkpoint(tmp_path / "models", plan)
    assert resolve_plan(bundle, ckpt).to_dict() == plan.to_dict()
    assert trained_plan_path(ckpt, bundle) == tmp_path / "models" / "plan.json"
    assert trained_plan_file(tmp_path / "models", "default.json") == str(tmp_path / "models" / "plan.json")
    # a plan inside the checkpoint wins over everything
    embedded = save_checkpoint({"model": {}, "plan": shipped.to_dict()}, tmp_path / "models" / "model.pt")
    assert resolve_plan(bundle, embedded).to_dict() == shipped.to_dict()


def test_one_input_lister(tmp_path):
    from medunet.engines.workflow import list_images
    from medunet.inference import collect_inputs

    for name in ("b.nii.gz", "a.nii", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("no image")  # listed: reading it names it and its extension
    (tmp_path / ".DS_Store").write_text("hidden")  # left out (segment reports it as ignored)
    assert [Path(d["image"]) for d in list_images(tmp_path)] == collect_inputs(tmp_path)
    assert [p.name for p in collect_inputs(tmp_path)] == ["a.nii", "b.nii.gz", "c.png", "notes.txt"]


#: the train.json ids evaluate.json may use (the rest of train.json is the training path's to change)
TRAIN_IDS_FOR_EVALUATION = {"bundle_root", "bundle_name", "ckpt_dir", "output_dir", "plan_file", "plan", "datalist",
                            "device", "mlflow", "tracking_uri", "experiment_name", "fold", "tracked_params", "seed"}


@pytest.mark.parametrize("bundle", ["ct", "mri", "cells2d"])
def test_inference_and_evaluate_configs_are_thin_callers_of_the_predictor(bundle):
    import json
    import re

    configs = REPO / "bundles" / bundle / "configs"
    infer = json.loads((configs / "inference.json").read_text(encoding="utf-8"))
    for key in ("bundle_root", "ckpt_dir", "input_dir", "output_dir", "device", "tta", "network_def", "predictor",
                "inferring"):
        assert key in infer, f"{bundle}/inference.json lacks {key!r}"
    assert "Predictor" in json.dumps(infer["predictor"])
    evaluate_text = (configs / "evaluate.json").read_text(encoding="utf-8")
    for text in ((configs / "inference.json").read_text(encoding="utf-8"), evaluate_text):
        assert not re.search(r"Invertd|SaveImaged|SupervisedEvaluator|CheckpointLoader", text)
    evaluate = json.loads(evaluate_text)
    used = set(re.findall(r"@([A-Za-z_][A-Za-z0-9_#]*)", evaluate_text))
    assert used - set(evaluate) <= TRAIN_IDS_FOR_EVALUATION, used - set(evaluate) - TRAIN_IDS_FOR_EVALUATION
    assert "EvaluationRun" in json.dumps(evaluate["evaluation"]) and "tta" in evaluate
