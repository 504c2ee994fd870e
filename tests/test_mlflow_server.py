"""MLflow with a real tracking server: a tiny bundle training and its evaluation are logged to an
``mlflow server`` started on 127.0.0.1 (free port) and checked through the MLflow client. The server is
always stopped, also when the test fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from bundle_helpers import one_thread, run_bundle, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")
assert one_thread


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{(tmp_path / 'server.log').read_text(encoding='utf-8')[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not answer /health within 120 s:\n"
                            + (tmp_path / "server.log").read_text(encoding="utf-8")[-3000:])
            time.sleep(0.5)
        yield url, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_training_and_evaluation_are_logged_to_a_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    url, server_dir = mlflow_server
    data = tmp_path / "data"
    run = tmp_path / "run"
    overrides = tiny_overrides("cells2d", data, run, mlflow=True, tracking_uri=url, max_epochs=2,
                               experiment_name="medunet-test", run_name="tiny-cells")
    run_bundle("cells2d", **overrides)
    run_bundle("cells2d", names=("train", "evaluate"), **overrides)

    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("medunet-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"tiny-cells", "evaluate-fold0"}
    train = runs["tiny-cells"]
    assert train.info.status == "FINISHED"
    params = train.data.params
    assert params["max_epochs"] == "2" and params["learning_rate"] == "0.001" and params["bundle_name"] == "cells2d"
    assert params["plan.network.name"] == "unet2015" and params["plan.patch_size"] == "[52, 52]"
    iterations = 2 * 3  # 3 training images, batch 1, 2 epochs
    # the loss every 10th step (the bundles' log_every) and the first one
    steps = sorted(m.step for m in client.get_metric_history(train.info.run_id, "train_loss"))
    assert steps == [s for s in range(1, iterations + 1) if s == 1 or s % 10 == 0]
    for key in ("val_mean_dice", "val_dice_cell", "lr"):
        assert len(client.get_metric_history(train.info.run_id, key)) == 2, key
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"model.pt", "plan.json", "training_curve.png", "history.csv", "train.json", "metadata.json"} <= artifacts
    local = Path(client.download_artifacts(train.info.run_id, "model.pt", str(tmp_path)))
    assert local.read_bytes() == (run / "models" / "model.pt").read_bytes()
    assert (server_dir / "server-artifacts").is_dir()  # stored by the server, not next to the client
    assert not (run / "eval" / "mlflow.db").exists()

    evaluation = runs["evaluate-fold0"]
    assert evaluation.info.status == "FINISHED"
    assert 0.0 <= evaluation.data.metrics["eval_mean_dice"] <= 1.0
    assert "eval_hd95_cell" in evaluation.data.metrics or "eval_dice_cell" in evaluation.data.metrics
    eval_artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"metrics.csv", "summary.json", "overlays"} <= eval_artifacts
