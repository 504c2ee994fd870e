"""Shared helpers for the engine/bundle/MLflow/DDP tests: tiny overrides and in-process bundle runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = REPO_ROOT / "bundles"
SCHEMA = REPO_ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
BUNDLE_NAMES = ("ct", "mri", "cells2d")
PHANTOM_KIND = {"ct": "ct", "mri": "mri", "cells2d": "cells"}

#: plan overrides that make every bundle train in seconds on 2 shared CPU cores
TINY_PLAN = {
    "ct": {"patch_size": [16, 16, 16], "batch_size": 2,
           "network": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "filters": [4, 8, 16]}},
    "mri": {"patch_size": [16, 16, 16], "batch_size": 2,
            "network": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "filters": [4, 8, 16]}},
    # valid convolutions: 52 -> 12 with two poolings; overlap-tile inference covers the whole image
    "cells2d": {"patch_size": [52, 52], "batch_size": 1,
                "network": {"features": [4, 8, 16], "padding": "valid", "dropout": 0.0}},
}


def tiny_overrides(bundle: str, dataset_dir, out: Path, **extra) -> dict:
    """Overrides for a 1–2 epoch run of ``bundle`` writing everything under ``out``."""
    values = {
        "dataset_dir": str(dataset_dir),
        "output_dir": str(out / "eval"),
        "ckpt_dir": str(out / "models"),
        "plan_overrides": TINY_PLAN[bundle],
        "max_epochs": 1,
        "val_interval": 1,
        "num_workers": 0,
        "progress_bar": False,
        "mlflow": False,
        "phantom_cases": 4,
        "phantom_size": "small",
        "n_folds": 4,
    }
    if bundle != "cells2d":  # patch-sampling bundles: an epoch is a number of steps, not a pass over the data
        values["epoch_length"] = 4
    values.update(extra)
    return values


def config_files(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / f"{n}.json") for n in names]


@pytest.fixture(autouse=False)
def one_thread():
    """One intra-op thread: on the shared 2-core CI box, 2 OpenMP threads per process make tiny convs ~100x
    slower (spin-waiting against other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_bundle(bundle: str, names=("train",), run_id: str = "run", stop_after_epoch: int | None = None,
               **overrides):
    """Run a bundle in-process like ``python -m monai.bundle run`` (initialize → run → finalize).

    ``stop_after_epoch`` simulates an interruption: the trainer is terminated at the end of that epoch
    (after the bundle's own handlers, i.e. after the checkpoints were written).
    """
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=config_files(bundle, *names), meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"),
                        logging_file=False, run_id=run_id, workflow_type=None, **overrides)
    logging.getLogger("medunet").setLevel(logging.WARNING)
    wf.initialize()
    if stop_after_epoch is not None:
        trainer = wf.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after_epoch), lambda e: e.terminate())
    wf.run()
    wf.finalize()
    return wf


def read_history(output_dir: Path) -> list[dict]:
    import csv

    with open(Path(output_dir) / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path
