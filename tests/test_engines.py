"""Engines: automatic resume (bit-identical to an uninterrupted run on CPU), checkpoint contents, early
stopping, losses for valid-convolution networks, bundle location, tracking URI defaults."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from bundle_helpers import BUNDLES, one_thread, read_history, run_bundle, tiny_overrides
from ignite.engine import Engine, Events

from medunet.engines import (
    CheckpointManager,
    CroppedLoss,
    WeightMapLoss,
    center_crop_to,
    default_tracking_uri,
    flatten_params,
    locate_bundle,
    resolve_plan,
)

pytestmark = pytest.mark.usefixtures("one_thread")
assert one_thread


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory) -> Path:
    from medunet.data.phantoms import generate_dataset

    return generate_dataset("ct", tmp_path_factory.mktemp("ct") / "data", cases=4, size="small", seed=0)


def _latest(out: Path) -> dict:
    return torch.load(out / "eval" / "checkpoint_latest.pt", weights_only=True)


def test_resume_reproduces_uninterrupted_run(ct_data, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_bundle("ct", **tiny_overrides("ct", ct_data, straight, max_epochs=2))
    run_bundle("ct", stop_after_epoch=1, **tiny_overrides("ct", ct_data, interrupted, max_epochs=2))
    first = _latest(interrupted)
    assert first["trainer"]["epoch"] == 1
    run_bundle("ct", **tiny_overrides("ct", ct_data, interrupted, max_epochs=2))  # restart: resumes at epoch 2

    a, b = _latest(straight), _latest(interrupted)
    assert a["trainer"] == b["trainer"] and a["trainer"]["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["scheduler"] == b["scheduler"]
    assert a["best"] == b["best"]
    hist_a, hist_b = read_history(straight / "eval"), read_history(interrupted / "eval")
    assert [r["epoch"] for r in hist_b] == ["1", "2"]
    for row in hist_a + hist_b:
        row.pop("elapsed_s")  # the wall clock; everything else must match
    assert hist_a == hist_b  # same losses, learning rates and per-class validation Dice, epoch by epoch

    # contract with inference / MONAI Label: best model is a raw state_dict with the plan beside it
    best = torch.load(interrupted / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in best.values()) and "model" not in best
    assert (interrupted / "models" / "plan.json").exists() and (interrupted / "eval" / "plan.json").exists()
    assert set(a) >= {"model", "optimizer", "scheduler", "trainer", "plan", "best"}
    assert a["plan"]["patch_size"] == [16, 16, 16]
    assert (straight / "eval" / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftovers = [p for p in (interrupted).rglob(".*.tmp*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"

    # a finished run restarted with the same max_epochs trains nothing more
    run_bundle("ct", **tiny_overrides("ct", ct_data, interrupted, max_epochs=2))
    again = _latest(interrupted)
    assert again["trainer"]["epoch"] == 2
    assert all(torch.equal(again["model"][k], b["model"][k]) for k in b["model"])


class _FakeValidator:
    def __init__(self):
        self.state = type("S", (), {"epoch": 0, "metrics": {}})()


def test_early_stopping_and_best_tracking(tmp_path):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    validator = _FakeValidator()
    scores = [0.5, 0.7, 0.6, 0.65, 0.69, 0.9]
    manager = CheckpointManager(tmp_path / "models", tmp_path / "out", net, opt, validator=validator,
                                plan={"labels": {"background": 0, "x": 1}}, patience=3)
    trainer = Engine(lambda e, b: {"loss": 0.0})

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine):  # registered before the manager, like ValidationHandler in the bundles
        validator.state.epoch = engine.state.epoch
        validator.state.metrics = {"val_mean_dice": scores[engine.state.epoch - 1]}

    manager.attach(trainer)
    trainer.run([0], max_epochs=len(scores))
    assert trainer.state.epoch == 5  # epochs 3, 4, 5 did not beat 0.7
    assert manager.best["epoch"] == 2 and math.isclose(manager.best["metric"], 0.7)
    latest = torch.load(tmp_path / "out" / "checkpoint_latest.pt", weights_only=True)
    assert latest["best"]["stale"] == 3 and latest["trainer"]["epoch"] == 5
    assert (tmp_path / "models" / "plan.json").exists()


def test_cropped_loss_for_valid_convolutions():
    target = torch.arange(2 * 1 * 8 * 10, dtype=torch.float32).reshape(2, 1, 8, 10)
    cropped = center_crop_to(target, (4, 6))
    assert cropped.shape == (2, 1, 4, 6) and torch.equal(cropped, target[:, :, 2:6, 2:8])
    with pytest.raises(ValueError, match="cannot centre-crop"):
        center_crop_to(target, (9, 6))
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, pred, tgt):
            seen["shape"] = tuple(tgt.shape)
            return pred.sum() * 0

    CroppedLoss(Probe())(torch.zeros(2, 3, 4, 6), target)
    assert seen["shape"] == (2, 1, 4, 6)


def test_weight_map_loss_uses_the_weight_channel():
    logits = torch.randn(1, 2, 6, 6)
    label = torch.randint(0, 2, (1, 1, 10, 10)).float()
    ones = torch.ones_like(label)
    loss = WeightMapLoss()
    plain = loss(logits, label)
    assert torch.allclose(loss(logits, torch.cat([label, ones], 1)), plain)
    assert torch.allclose(loss(logits, torch.cat([label, 3 * ones], 1)), 3 * plain)


def test_locate_bundle(monkeypatch, tmp_path):
    monkeypatch.chdir(BUNDLES.parent)
    assert Path(locate_bundle("ct")) == BUNDLES / "ct"
    monkeypatch.chdir(BUNDLES / "mri")  # zoo habit: run from inside the bundle
    assert Path(locate_bundle("mri")) == BUNDLES / "mri"
    monkeypatch.chdir(tmp_path)  # elsewhere: the clone medunet is installed from
    assert Path(locate_bundle("cells2d")) == BUNDLES / "cells2d"
    with pytest.raises(FileNotFoundError, match="--bundle_root"):
        locate_bundle("no-such-bundle")


def test_resolve_plan_overrides_and_writes(tmp_path):
    plan = resolve_plan(BUNDLES / "ct" / "configs" / "plan.json", None, tmp_path,
                        overrides={"patch_size": [16, 16, 16], "network": {"filters": [4, 8, 16, 32]}})
    assert plan.patch_size == [16, 16, 16] and plan.network["name"] == "dynunet"
    assert plan.network["filters"] == [4, 8, 16, 32] and "strides" in plan.network
    assert (tmp_path / "plan.json").exists()
    with pytest.raises(ValueError, match="no plan file"):
        resolve_plan(tmp_path / "missing.json", None)


def test_tracking_uri_default_and_params(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == "sqlite:///" + str(tmp_path.resolve() / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5999"
    flat = flatten_params({"plan": {"network": {"name": "dynunet", "filters": [4, 8]}}, "lr": 0.01, "x y@": None})
    assert flat == {"plan.network.name": "dynunet", "plan.network.filters": "[4, 8]", "lr": "0.01", "x y_": "null"}
    assert os.environ["MLFLOW_TRACKING_URI"]


def test_final_validation_when_last_epoch_was_not_validated(tmp_path):
    net = torch.nn.Linear(2, 2)
    runs = []

    class Validator(_FakeValidator):
        def run(self, epoch):
            runs.append(epoch)
            self.state.epoch = epoch
            self.state.metrics = {"val_mean_dice": 0.1 * epoch}

    validator = Validator()
    manager = CheckpointManager(tmp_path / "models", tmp_path / "out", net, validator=validator)
    trainer = Engine(lambda e, b: {"loss": 0.0})
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), lambda e: validator.run(e.state.epoch))
    manager.attach(trainer)
    trainer.run([0], max_epochs=3)
    assert runs == [2, 3] and manager.best["epoch"] == 3
    assert torch.load(tmp_path / "out" / "checkpoint_latest.pt", weights_only=True)["best"]["epoch"] == 3
    assert (tmp_path / "models" / "model.pt").exists()


def test_resume_with_a_changed_network_names_the_checkpoint(tmp_path):
    """A run folder whose latest checkpoint came from another network (e.g. the plan switched instance
    norm to batch norm) stops with one line naming the checkpoint, not a state_dict dump."""
    from medunet.io import InputError

    old = CheckpointManager(tmp_path / "models", tmp_path / "out", torch.nn.Linear(2, 2))
    trainer = Engine(lambda e, b: {"loss": 0.0})
    old.attach(trainer)
    trainer.run([0], max_epochs=1)
    new = CheckpointManager(tmp_path / "models", tmp_path / "out", torch.nn.Sequential(torch.nn.Linear(2, 3)))
    trainer = Engine(lambda e, b: {"loss": 0.0})
    new.attach(trainer)
    with pytest.raises(InputError, match=r"checkpoint_latest\.pt: holds a different network") as info:
        trainer.run([0], max_epochs=2)
    assert "\n" not in str(info.value)


def test_cli_train_and_evaluate_a_bundle(tmp_path, capsys):
    import json

    from medunet.cli import main
    from medunet.engines import parse_overrides

    assert parse_overrides(["max_epochs=2", "run_name=abc", 'plan_overrides={"batch_size": 1}']) == {
        "max_epochs": 2, "run_name": "abc", "plan_overrides": {"batch_size": 1}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["max_epochs"])
    from bundle_helpers import TINY_PLAN

    common = ["--dataset-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "eval"),
              "--ckpt-dir", str(tmp_path / "models"), "--device", "cpu",
              "--set", f"plan_overrides={json.dumps(TINY_PLAN['cells2d'])}", "--set", "phantom_cases=4",
              "--set", "n_folds=4", "--set", "num_workers=0", "--set", "mlflow=false", "--set", "progress_bar=false"]
    assert main(["train", str(BUNDLES / "cells2d"), "--max-epochs", "1", *common]) == 0
    assert (tmp_path / "models" / "model.pt").exists()  # val_interval 5 > 1 epoch: final validation saved it
    assert main(["evaluate", str(BUNDLES / "cells2d"), *common]) == 0
    assert json.loads((tmp_path / "eval" / "evaluation" / "summary.json").read_text(encoding="utf-8"))["n_cases"] == 1
    assert main(["train", str(tmp_path)]) == 1
    assert "not a bundle" in capsys.readouterr().err


def _capture_engine_warnings(monkeypatch) -> list[str]:
    import logging

    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("medunet.engines")
    monkeypatch.setattr(logger, "level", logging.WARNING)
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, handler])
    return lines


def test_split_datalist_skips_bad_cases_one_line_each(ct_data, tmp_path, monkeypatch):
    """A truncated image and a label with an undeclared value: each named on one warning line, the
    folds made from the other cases; ``check=False`` keeps them; no usable case at all refuses."""
    import shutil

    import nibabel as nib
    import numpy as np

    from medunet.engines import split_datalist

    data = Path(shutil.copytree(ct_data, tmp_path / "data"))
    images = sorted((data / "imagesTr").glob("*.nii.gz"))
    images[0].write_bytes(images[0].read_bytes()[:300])
    label = data / "labelsTr" / images[1].name
    nii = nib.load(label)
    values = np.asarray(nii.dataobj).astype(np.uint8)
    values[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(values, nii.affine), label)
    lines = _capture_engine_warnings(monkeypatch)
    split = split_datalist(data, n_folds=2)
    used = {Path(item["image"]).name for part in split.values() for item in part}
    assert used == {p.name for p in images[2:]}
    assert any(str(images[0]) in ln and "skipping" in ln for ln in lines), lines
    assert any(str(label) in ln and "9" in ln and "label-values" in ln for ln in lines), lines
    assert sum(len(part) for part in split_datalist(data, n_folds=2, check=False).values()) == len(images)
    for image in images[2:]:
        image.write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 4 training case"):
        split_datalist(data, n_folds=2)


def test_undefined_reference_names_the_config_file(tmp_path):
    """MONAI's "referring item `@x` is not defined" becomes one line: config file, the id, the suggestion."""
    from monai.bundle import ConfigParser

    from medunet.engines.workflow import explain_config_error

    other = tmp_path / "evaluate.json"
    other.write_text('{"x": 1}')
    config = tmp_path / "train.json"
    config.write_text('{"network_def": 1, "network": "$@netwrok_def + 1"}')
    parser = ConfigParser()
    parser.read_config([str(other), str(config)])
    with pytest.raises(ValueError) as info:
        parser.get_parsed_content("network")
    err = explain_config_error(info.value, [other, config])
    assert str(err) == f"{config}: reference '@netwrok_def' is not defined in the config; did you mean '@network_def'?"
    assert len(str(err).splitlines()) == 1
    assert explain_config_error(ValueError("something else"), [config]) is None


def test_bundle_time_budget_on_phantoms_stops_anneals_and_keeps_the_final_weights(ct_data, tmp_path):
    run = tmp_path / "run"
    run_bundle("ct", **tiny_overrides("ct", ct_data, run, max_epochs=1000, epoch_length=3, time_budget=4.0))
    rows = read_history(run / "eval")
    assert len(rows) < 1000 and float(rows[-1]["elapsed_s"]) >= 4.0
    assert float(rows[-1]["lr"]) < 0.2 * 0.003  # the poly schedule followed the clock to (nearly) zero
    assert rows[-1]["val_mean_dice"] != ""  # the epoch the budget ended was validated
    latest = _latest(run)
    assert latest["budget"]["finished"] and latest["budget"]["elapsed_s"] >= 4.0
    final = torch.load(run / "models" / "model.pt", weights_only=True)  # save_model "last": the final weights
    assert all(torch.equal(final[k], latest["model"][k]) for k in final)
    # started again with the same budget: nothing more is trained
    run_bundle("ct", **tiny_overrides("ct", ct_data, run, max_epochs=1000, epoch_length=3, time_budget=4.0))
    assert _latest(run)["trainer"] == latest["trainer"]


def test_resolve_plan_bundle_defaults_median_patch_and_deep_supervision_depth(tmp_path):
    from medunet.data import Plan

    plan = Plan(labels={"background": 0, "a": 1}, patch_size=[16, 16, 16], median_shape=[35, 50, 36],
                network={"name": "dynunet", "kernel_size": [[3, 3, 3]] * 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
                         "filters": [4, 8, 16, 32]})
    plan.save(tmp_path / "plan.json")
    defaults = {"network": {"res_block": True, "deep_supervision": True, "deep_supr_num": 5}, "mirror_axes": [0]}
    out = resolve_plan(tmp_path / "plan.json", defaults=defaults, patch="median")
    assert out.patch_size == [40, 56, 40]  # the median shape rounded up to a multiple of 8 (3 poolings)
    assert out.network["res_block"] and out.network["deep_supr_num"] == 2 and out.mirror_axes == [0]
    # a user's override wins over the bundle's defaults
    user = resolve_plan(tmp_path / "plan.json", defaults=defaults, patch="median",
                        overrides={"patch_size": [24, 24, 24], "network": {"res_block": False}})
    assert user.patch_size == [24, 24, 24] and user.network["res_block"] is False
    shallow = Plan(labels={"background": 0, "a": 1}, patch_size=[8, 8, 8],
                   network={"name": "dynunet", "kernel_size": [[3, 3, 3]] * 3,
                            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "filters": [4, 8, 16]})
    shallow.save(tmp_path / "shallow.json")
    fitted = resolve_plan(tmp_path / "shallow.json", defaults=defaults)
    assert fitted.network["deep_supervision"] is True and fitted.network["deep_supr_num"] == 1
    assert fitted.build_network().train()(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 2, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="patch"):
        resolve_plan(tmp_path / "plan.json", patch="whole")


def test_split_datalist_every_nth_holds_out_every_fifth_case(ct_data):
    from medunet.engines import split_datalist

    split = split_datalist(ct_data, n_folds=2, split="every_nth", check=False)
    names = [Path(i["image"]).name for i in split["val"]]
    assert len(split["val"]) == 2 and len(split["train"]) == 2
    assert names == sorted(names)
    with pytest.raises(ValueError, match="split"):
        split_datalist(ct_data, split="random", check=False)


def test_cli_train_passes_the_time_budget(monkeypatch, tmp_path):
    import medunet.engines.workflow as workflow
    from medunet.cli import main

    seen = {}
    monkeypatch.setattr(workflow, "run_bundle_workflow", lambda bundle, wf, overrides: seen.update(overrides))
    assert main(["train", str(BUNDLES / "mri"), "--time-budget", "90", "--max-epochs", "3"]) == 0
    assert seen["time_budget"] == 90.0 and seen["max_epochs"] == 3
