"""Distributed training: ``multi_gpu_train.json`` under ``torchrun --nproc_per_node 2`` on CPU (gloo).
Both ranks train on their half of the data (DistributedSampler); only rank 0 writes checkpoints and
logs to MLflow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch
from bundle_helpers import REPO_ROOT, config_files, tiny_overrides


def test_torchrun_two_cpu_processes(tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides("cells2d", tmp_path / "data", run, phantom_cases=6, n_folds=3, mlflow=True)
    configs = config_files("cells2d", "train", "multi_gpu_train")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(configs)]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=500)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    # both ranks took part, each on its own half of the 4 training cases (batch 1: 2 iterations each)
    lines = re.findall(r"medunet ddp: rank (\d)/2 \((\w+)\) trained (\d+) iterations on (\d+) of (\d+)", output)
    assert sorted(r[0] for r in lines) == ["0", "1"], output[-4000:]
    assert all(backend == "gloo" and it == "2" and mine == "2" and total == "4" for _, backend, it, mine, total in lines)
    assert output.count("generating 6 cells phantoms") == 1  # rank 0 generated, rank 1 waited

    # one checkpoint set, written once, by rank 0
    assert sorted(p.name for p in (run / "models").iterdir()) == ["model.pt", "plan.json"]
    latest = torch.load(run / "eval" / "checkpoint_latest.pt", weights_only=True)
    assert latest["trainer"]["epoch"] == 1
    assert not any(k.startswith("module.") for k in latest["model"])  # saved unwrapped from DDP
    assert not list(run.rglob(".*.tmp*"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + str(run / "eval" / "mlflow.db"))
    exp = client.get_experiment_by_name("medunet-cells2d")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
