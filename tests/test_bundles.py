"""Bundles: layout (one copy of each config, MONAI + MONAI Label paths), metadata schema, network in/out,
and for every bundle at a tiny size: train → evaluate → TorchScript export → inference. The ct bundle is
trained with the user's exact command line (subprocess) on phantoms generated on the fly, with MLflow on
(default SQLite store under the output dir)."""

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
from bundle_helpers import (
    BUNDLE_NAMES,
    BUNDLES,
    REPO_ROOT,
    SCHEMA,
    config_files,
    one_thread,
    run_bundle,
    tiny_overrides,
)

pytestmark = pytest.mark.usefixtures("one_thread")
assert one_thread

CONFIGS = ("train", "evaluate", "inference", "multi_gpu_train")


def test_every_folder_under_bundles_is_a_bundle():
    folders = sorted(p.name for p in BUNDLES.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert folders == sorted(BUNDLE_NAMES)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_bundle_layout(bundle):
    root = BUNDLES / bundle
    for name in [f"{c}.json" for c in CONFIGS] + ["metadata.json", "logging.conf"]:
        real = root / "configs" / name
        assert real.is_file() and not real.is_symlink(), real
        user_path = root / name  # the user's path (bundles/ct/train.json) is a relative link, not a copy
        assert user_path.is_symlink() and os.readlink(user_path) == f"configs/{name}", user_path
        assert user_path.resolve() == real.resolve()
    assert (root / "LICENSE").is_file() and (root / "configs" / "plan.json").is_file()
    readme = (root / "docs" / "README.md").read_text(encoding="utf-8")
    assert "| " in readme and "Dice" in readme, "docs/README.md needs a results table"
    meta = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["name"] == bundle and meta["version"] in meta["changelog"]
    train = json.loads((root / "configs" / "train.json").read_text(encoding="utf-8"))
    for key in ("bundle_root", "dataset_dir", "output_dir", "max_epochs", "val_interval", "learning_rate", "device",
                "amp", "num_workers", "plan_file", "training", "run", "network_def", "network"):
        assert key in train, f"{bundle}/train.json lacks top-level {key!r}"
    # ids MONAI Label's BundleTrainTask overrides
    assert {"dataset", "handlers", "trainer"} <= set(train["train"]) and "data" in train["train"]["dataset"]
    assert train["train"]["trainer"]["max_epochs"] == "@max_epochs"
    assert "data" in train["validate"]["dataset"]
    infer = json.loads((root / "configs" / "inference.json").read_text(encoding="utf-8"))
    for key in ("bundle_root", "device", "network_def", "output_dir"):
        assert key in infer, f"{bundle}/inference.json lacks {key!r}"
    tracked = subprocess.run(["git", "ls-files", "-s", f"bundles/{bundle}/train.json"], cwd=REPO_ROOT,
                             capture_output=True, text=True).stdout
    if tracked:  # committed: git stores the link itself (mode 120000), so clones keep one copy
        assert tracked.startswith("120000")


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_verify_metadata(bundle):
    from monai.bundle import verify_metadata

    if not SCHEMA.is_file():
        pytest.skip(f"MONAI's bundle metadata schema is not at {SCHEMA} (it lives in the shared data, "
                    "outside the repository): metadata.json not checked against it")
    meta = str(BUNDLES / bundle / "configs" / "metadata.json")
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))  # raises on any schema violation


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_verify_net_in_out(bundle):
    from monai.bundle import verify_net_in_out

    meta = str(BUNDLES / bundle / "configs" / "metadata.json")
    verify_net_in_out("network_def", meta_file=meta, config_file=config_files(bundle, "inference")[0])


def _train_ct_with_user_command(run: Path) -> None:
    overrides = tiny_overrides("ct", run / "data", run, mlflow=True)
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundles/ct/train.json"]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "does not exist: generating 4 ct phantoms there" in proc.stdout + proc.stderr


def _check_default_mlflow_store(run: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + str(run / "eval" / "mlflow.db"))
    exp = client.get_experiment_by_name("medunet-ct")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.params["max_epochs"] == "1" and r.data.params["plan.patch_size"] == "[16, 16, 16]"
    assert "val_mean_dice" in r.data.metrics and "val_dice_liver" in r.data.metrics
    assert len(client.get_metric_history(r.info.run_id, "train_loss")) >= 1
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"model.pt", "plan.json", "training_curve.png", "train.json"} <= artifacts
    assert (run / "eval" / "mlartifacts").is_dir()  # artifacts under the output dir, not the CWD


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_train_evaluate_export_infer(bundle, tmp_path):
    run = tmp_path / bundle
    if bundle == "ct":
        _train_ct_with_user_command(run)
        _check_default_mlflow_store(run)
    else:
        run_bundle(bundle, **tiny_overrides(bundle, run / "data", run))
    models, out = run / "models", run / "eval"
    assert (models / "model.pt").exists() and (models / "plan.json").exists()
    history = list(csv.DictReader(open(out / "history.csv")))
    assert len(history) == 1 and 0.0 <= float(history[0]["val_mean_dice"]) <= 1.0

    # evaluate.json on top of train.json: per-case CSV, summary, overlays
    run_bundle(bundle, names=("train", "evaluate"), **tiny_overrides(bundle, run / "data", run))
    summary = json.loads((out / "evaluation" / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_cases"] == 1
    # validation scores in plan space, evaluation on the original files' grid: close, not equal
    assert summary["mean_dice"] == pytest.approx(float(history[0]["val_mean_dice"]), abs=0.15)
    rows = list(csv.DictReader(open(out / "evaluation" / "metrics.csv")))
    assert len(rows) == 1 and {"dice", "hd95", "surface_dice"} <= {k.split("_")[0] if not k.startswith("surface")
                                                                  else "surface_dice" for k in rows[0]}
    assert any(p.name.startswith("best_") for p in (out / "evaluation" / "overlays").iterdir())

    # TorchScript export of the trained checkpoint gives the same output
    from monai.bundle import ckpt_export

    from medunet.data import Plan
    from medunet.io import load_weights

    ts_path = run / "model.ts"
    meta = str(BUNDLES / bundle / "configs" / "metadata.json")
    plan = Plan.load(models / "plan.json")
    net = load_weights(plan.build_network(), models / "model.pt").eval()
    x = torch.randn(1, 1, *net.valid_input_shape(plan.patch_size))
    # DynUNet with deep-supervision heads does not script (its forward writes into an Optional list), so
    # it is exported by tracing in eval mode, where it returns the main output only
    trace = bool(plan.network.get("deep_supervision"))
    ckpt_export("network_def", filepath=str(ts_path), ckpt_file=str(models / "model.pt"), meta_file=meta,
                config_file=config_files(bundle, "inference")[0], ckpt_dir=str(models), use_trace=trace,
                input_shape=list(x.shape) if trace else None)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(ts_path))(x), net(x), atol=1e-5)

    # inference.json: labels on the input's own grid
    seg_dir = run / "seg"
    run_bundle(bundle, names=("inference",), ckpt_dir=str(models), input_dir=str(run / "data" / "imagesTs"),
               output_dir=str(seg_dir))
    inputs = sorted((run / "data" / "imagesTs").iterdir())
    outputs = sorted(seg_dir.iterdir())
    assert len(outputs) == len(inputs) >= 1
    src, seg = nib.load(inputs[0]), nib.load(outputs[0])
    assert seg.shape[:len(src.shape)] == src.shape and np.allclose(seg.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj))) <= set(range(plan.out_channels))
