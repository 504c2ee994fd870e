"""MLflow tracking for medunet trainers and evaluators (on by default).

Every training or evaluation run becomes one MLflow run with: the bundle's top-level config values and the
plan as params, the loss per iteration, the validation metrics (per class) per epoch, and artifacts
(configs, plan, best checkpoint, training curve; for evaluation the per-case CSV, summary and overlays).

Where it goes: ``tracking_uri`` if given, else ``$MLFLOW_TRACKING_URI``, else a SQLite file
``<output_dir>/mlflow.db`` with artifacts in ``<output_dir>/mlartifacts`` (MLflow 3 refuses plain file
stores). A resumed training run continues the same MLflow run (its id is kept in
``<output_dir>/mlflow_run.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ignite.engine import Engine, Events

from medunet.engines.handlers import _is_number, _output_loss, is_rank0
from medunet.io import atomic_write_text

__all__ = ["MLflowTracker", "default_tracking_uri", "flatten_params"]

logger = logging.getLogger("medunet.engines")

_PARAM_MAX = 6000
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def default_tracking_uri(output_dir: str | os.PathLike) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<abs output_dir>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(Path(output_dir).resolve() / "mlflow.db")


def flatten_params(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts → ``{"a.b": "value"}`` with MLflow-safe keys and values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in (params or {}).items():
        name = _KEY_BAD.sub("_", f"{prefix}{key}")
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_PARAM_MAX]
    return out


class MLflowTracker:
    """Log an Ignite trainer (and its validator) or a standalone evaluator to MLflow.

    Args:
        output_dir: run folder; holds the default SQLite store and ``mlflow_run.json``.
        tracking_uri: MLflow URI (``http://host:port``, ``sqlite:///…``); default :func:`default_tracking_uri`.
        experiment_name: created when missing.
        run_name: display name of the run.
        params: logged as params (nested dicts are flattened with ``.``).
        plan: a :class:`~medunet.data.plan.Plan` or dict, logged under ``plan.*`` and as ``plan.json``.
        artifacts: files or folders logged when the engine completes (missing ones are skipped).
        validator: the evaluator whose epoch metrics are logged with the trainer's epoch as step.
        enabled: ``False`` turns the tracker into a no-op (also automatically on ranks > 0).
        log_every: log the training loss every N iterations.
        tags: MLflow tags of the run.
        resume_run: continue the run recorded in ``mlflow_run.json`` when the engine resumes (training);
            ``False`` for evaluation runs, which neither read nor write that file.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        tracking_uri: str | None = None,
        experiment_name: str = "medunet",
        run_name: str | None = None,
        params: dict | None = None,
        plan=None,
        artifacts: Iterable[str | os.PathLike] = (),
        validator: Engine | None = None,
        enabled: bool = True,
        log_every: int = 1,
        tags: dict | None = None,
        resume_run: bool = True,
    ):
        self.output_dir = Path(output_dir)
        self.tracking_uri = tracking_uri or default_tracking_uri(output_dir)
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.params = dict(params or {})
        self.plan = plan.to_dict() if hasattr(plan, "to_dict") else plan
        self.artifacts = [Path(a) for a in (artifacts or []) if a]
        self.validator = validator
        self.enabled = bool(enabled)
        self.log_every = max(1, int(log_every))
        self.tags = dict(tags or {})
        self.resume_run = bool(resume_run)
        self.client = None
        self.run_id: str | None = None
        self._pending: list = []

    @property
    def active(self) -> bool:
        return self.enabled and is_rank0()

    # -- wiring -----------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        if not self.active:
            return
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self.complete)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)
        if self.validator is not None and self.validator is not engine:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._validated)

    def _client(self):
        if self.client is None:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.tracking_uri)
        return self.client

    def _experiment_id(self) -> str:
        client = self._client()
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:"):
            location = (self.output_dir.resolve() / "mlartifacts").as_uri()
        return client.create_experiment(self.experiment_name, artifact_location=location)

    # -- events -----------------------------------------------------------------------------------
    def start(self, engine: Engine) -> None:
        client = self._client()
        marker = self.output_dir / "mlflow_run.json"
        resumed = self.resume_run and engine.state.epoch > 0 and marker.exists()
        if resumed:
            try:
                saved = json.loads(marker.read_text(encoding="utf-8"))
                if saved.get("tracking_uri") == self.tracking_uri:
                    client.get_run(saved["run_id"])
                    self.run_id = saved["run_id"]
                    client.update_run(self.run_id, status="RUNNING")
                    logger.info("MLflow: continuing run %s", self.run_id)
            except Exception as e:  # a deleted run or another store: start a new one
                logger.warning("MLflow: cannot continue the previous run (%s); starting a new one", e)
                self.run_id = None
        if self.run_id is None:
            tags = {"medunet.resumed_at_epoch": str(engine.state.epoch), **self.tags} if resumed else self.tags
            run = client.create_run(self._experiment_id(), run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            self.log_params({**self.params, **({"plan": self.plan} if self.plan else {})})
            if self.resume_run:
                atomic_write_text(marker, json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri}))
        logger.info("MLflow run %s at %s (experiment %r)", self.run_id, self.tracking_uri, self.experiment_name)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = list(flatten_params(params).items())
        for i in range(0, len(flat), 100):
            self._client().log_batch(self.run_id, params=[Param(k, v) for k, v in flat[i:i + 100]])

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_KEY_BAD.sub("_", k), float(v), now, int(step)) for k, v in metrics.items()
                 if _is_number(v) and math.isfinite(float(v))]
        if items and self.run_id:
            self._client().log_batch(self.run_id, metrics=items)

    def _iteration(self, engine: Engine) -> None:
        if engine.state.iteration % self.log_every and engine.state.iteration != 1:
            return  # every log_every-th step, and the first (so that a short run has a loss point too)
        loss = _output_loss(engine.state.output)
        if loss is not None:
            self.log_metrics({"train_loss": loss}, step=engine.state.iteration)

    def _epoch(self, engine: Engine) -> None:
        extra = {}
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None:
            extra["lr"] = optimizer.param_groups[0]["lr"]
        if getattr(engine.state, "train_elapsed_s", None) is not None:  # the TrainingBudget clock
            extra["train_elapsed_s"] = engine.state.train_elapsed_s
        self.log_metrics({**engine.state.metrics, **extra}, step=engine.state.epoch)

    def _validated(self, validator: Engine) -> None:
        self.log_metrics(validator.state.metrics, step=validator.state.epoch)

    def complete(self, engine: Engine) -> None:
        if self.run_id is None:
            return
        if self.plan:
            self._client().log_dict(self.run_id, self.plan, "plan.json")
        for path in self.artifacts:
            self.log_artifact(path)
        self._client().set_terminated(self.run_id, status="FINISHED")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not path.exists():
            logger.info("MLflow: artifact %s not present, skipped", path)
            return
        if path.is_dir():
            self._client().log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self._client().log_artifact(self.run_id, str(path), artifact_path)

    def _failed(self, engine: Engine, e: Exception) -> None:
        if self.run_id is not None:
            try:
                self._client().set_terminated(self.run_id, status="FAILED")
            except Exception:  # never hide the real error behind a tracking error
                logger.exception("MLflow: could not mark the run failed")
        raise e
