"""Ignite handlers for medunet training: checkpoints with automatic resume, early stopping, per-epoch
seeding and a training history (CSV + curve PNG).

Attach order matters for handlers that share an event; in the bundles' ``train#handlers`` list they come
as ``[LrScheduleHandler, ValidationHandler, HistoryLogger, CheckpointManager, MLflowTracker, StatsHandler]``
so that at the end of an epoch validation runs first, then the history row, then the checkpoints (which
may stop training early), then MLflow. At ``STARTED`` the :class:`CheckpointManager` restores the
latest checkpoint before anything else reads the epoch counter.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from medunet.io import InputError, atomic_write_bytes, atomic_write_text, load_checkpoint, save_checkpoint

__all__ = ["is_rank0", "CheckpointManager", "EpochSeeder", "HistoryLogger", "unwrap", "plot_history"]

logger = logging.getLogger("medunet.engines")

LATEST_NAME = "checkpoint_latest.pt"
BEST_NAME = "model.pt"


def is_rank0() -> bool:
    """True outside ``torch.distributed`` or on rank 0: the only process that logs and writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside a ``DistributedDataParallel``/``DataParallel`` wrapper."""
    return getattr(network, "module", network)


def _plan_dict(plan) -> dict | None:
    if plan is None:
        return None
    return plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)


def trained_seconds(output_dir: str | os.PathLike) -> float:
    """Seconds a bundle run in ``output_dir`` has trained: the budget clock of its
    ``checkpoint_latest.pt`` (0 when there is none yet)."""
    latest = Path(output_dir) / LATEST_NAME
    if not latest.is_file():
        return 0.0
    return float(load_checkpoint(latest).get("budget", {}).get("elapsed_s", 0.0))


class CheckpointManager:
    """Best model, latest training state, automatic resume and early stopping.

    * model: ``ckpt_dir/model.pt`` is written as a raw ``state_dict`` (MONAI bundle / MONAI Label
      convention) with ``ckpt_dir/plan.json`` beside it — with ``save_model="best"`` whenever the
      validator's ``key_metric`` improves, with ``"last"`` after every validation, so that it ends as the
      final weights (nnU-Net's ``checkpoint_final``: no model selection on the validation split);
    * latest: after every epoch, ``output_dir/checkpoint_latest.pt`` holds
      ``{"model", "optimizer", "scheduler", "scaler", "trainer", "best", "plan"}`` — tensors and plain
      Python values only, so ``torch.load(weights_only=True)`` reads it;
    * resume: at ``STARTED``, if that file exists (and ``resume``), every state is restored (with the
      :class:`~medunet.engines.training.TrainingBudget` clock when ``budget`` is given) and training
      continues at the next epoch; ``max_epochs`` keeps the value of the new run, so a finished run can
      be extended by restarting it with a larger ``max_epochs``;
    * early stopping: with ``patience > 0``, training stops after ``patience`` validations without an
      improvement of the key metric;
    * final validation: when the last trained epoch was not a validation epoch (``max_epochs`` not a
      multiple of ``val_interval``), the validator runs once more at the end, so every run that trained
      leaves a best model.

    All files are written atomically, and only by rank 0.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler=None,
        validator: Engine | None = None,
        plan=None,
        key_metric: str = "val_mean_dice",
        resume: bool = True,
        patience: int = 0,
        budget=None,
        save_model: str = "best",
    ):
        if save_model not in ("best", "last"):
            raise ValueError(f"save_model must be 'best' or 'last', got {save_model!r}")
        self.ckpt_dir = Path(ckpt_dir)
        self.output_dir = Path(output_dir)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.validator = validator
        self.plan = _plan_dict(plan)
        self.key_metric = key_metric
        self.resume = bool(resume)
        self.patience = int(patience or 0)
        self.budget = budget
        self.save_model = save_model
        self.best = {"metric": -math.inf, "epoch": 0, "stale": 0}
        self.resumed_from: int | None = None

    @property
    def latest_path(self) -> Path:
        return self.output_dir / LATEST_NAME

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / BEST_NAME

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.restore)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.final_validation)

    # -- resume -----------------------------------------------------------------------------------
    def restore(self, engine: Engine) -> None:
        """Load ``checkpoint_latest.pt`` into the network, optimizer, scheduler and engine (if present)."""
        if not self.resume or not self.latest_path.exists():
            return
        state = load_checkpoint(self.latest_path, map_location="cpu")
        try:
            unwrap(self.network).load_state_dict(state["model"])
        except RuntimeError as e:  # layers renamed or reshaped: the plan's network changed since
            first = str(e).strip().splitlines()[-1].strip()
            raise InputError(self.latest_path, "holds a different network than the one configured now (the "
                             "plan changed since it was written); resume False or another output_dir starts "
                             f"afresh ({first[:160]})") from None
        if self.optimizer is not None and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("scheduler"):
            self.lr_scheduler.load_state_dict(state["scheduler"])
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if self.budget is not None:
            self.budget.load_state_dict(state.get("budget", {}))
        trainer_state = state.get("trainer", {})
        engine.state.epoch = int(trainer_state.get("epoch", 0))
        engine.state.iteration = int(trainer_state.get("iteration", 0))
        self.best = {**self.best, **state.get("best", {})}
        self.resumed_from = engine.state.epoch
        logger.info("resumed from %s at epoch %d (best %s=%.4f at epoch %d)", self.latest_path,
                    engine.state.epoch, self.key_metric, self.best["metric"], self.best["epoch"])
        if engine.state.max_epochs is not None and engine.state.epoch >= engine.state.max_epochs:
            logger.info("run already finished %d of max_epochs=%d; raise max_epochs to train further",
                        engine.state.epoch, engine.state.max_epochs)

    # -- saving -----------------------------------------------------------------------------------
    def _validated_this_epoch(self, engine: Engine) -> float | None:
        v = self.validator
        if v is None or v.state is None or v.state.epoch != engine.state.epoch:
            return None
        value = v.state.metrics.get(self.key_metric)
        return None if value is None else float(value)

    def final_validation(self, engine: Engine) -> None:
        v = self.validator
        trained = self.resumed_from is None or engine.state.epoch > self.resumed_from
        if v is None or not trained or engine.state.epoch == 0 or self._validated_this_epoch(engine) is not None:
            return
        if not hasattr(v, "run"):
            return
        logger.info("epoch %d: final validation (the last epoch was not a validation epoch)", engine.state.epoch)
        v.run(engine.state.epoch)
        self._record(engine)
        self.save_latest(engine)

    def epoch_completed(self, engine: Engine) -> None:
        self._record(engine)
        self.save_latest(engine)
        if self.patience > 0 and self.best["stale"] >= self.patience:
            logger.info("early stopping at epoch %d: no %s improvement in %d validations (best %.4f at %d)",
                        engine.state.epoch, self.key_metric, self.best["stale"], self.best["metric"],
                        self.best["epoch"])
            engine.terminate()

    def _record(self, engine: Engine) -> None:
        """Update the best-model bookkeeping (and ``model.pt``) from this epoch's validation, if any."""
        value = self._validated_this_epoch(engine)
        if value is not None:
            improved = value > self.best["metric"] or self.best["epoch"] == 0
            if improved:
                self.best.update(metric=value, epoch=engine.state.epoch, stale=0)
            else:
                self.best["stale"] += 1
            if improved or self.save_model == "last":
                self.save_best()
            if improved:
                logger.info("epoch %d: new best %s=%.4f%s", engine.state.epoch, self.key_metric, value,
                            f" -> {self.best_path}" if self.save_model == "best" else "")
            if self.save_model == "last":
                logger.info("epoch %d: %s=%.4f, weights -> %s", engine.state.epoch, self.key_metric, value,
                            self.best_path)

    def save_best(self) -> None:
        if not is_rank0():
            return
        save_checkpoint(unwrap(self.network).state_dict(), self.best_path)
        if self.plan is not None:
            import json

            atomic_write_text(self.ckpt_dir / "plan.json", json.dumps(self.plan, indent=2) + "\n")

    def save_latest(self, engine: Engine) -> None:
        if not is_rank0():
            return
        scaler = getattr(engine, "scaler", None)
        state = {
            "model": unwrap(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else {},
            "scaler": scaler.state_dict() if scaler is not None else {},
            "trainer": {"epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration),
                        "max_epochs": int(engine.state.max_epochs or 0),
                        "epoch_length": int(engine.state.epoch_length or 0)},
            "best": {k: float(v) if k == "metric" else int(v) for k, v in self.best.items()},
            "budget": self.budget.state_dict() if self.budget is not None else {},
            "plan": self.plan or {},
        }
        save_checkpoint(state, self.latest_path)


class EpochSeeder:
    """Re-seed every random source at the start of each epoch from ``seed + epoch``.

    Epoch ``e`` then draws the same patches, augmentations and shuffling whether the run went straight
    through or was resumed at ``e``, which is what makes resumed runs reproduce uninterrupted ones on
    CPU. ``transforms`` are objects with ``set_random_state`` (a MONAI ``Compose`` or dataset transform).
    Under ``torch.distributed`` each rank gets its own stream (the rank is mixed into the seed).
    """

    def __init__(self, seed: int = 0, transforms=()):
        self.seed = int(seed)
        self.transforms = [t for t in (transforms if isinstance(transforms, list | tuple) else [transforms]) if t]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.utils import set_determinism

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = (self.seed + int(engine.state.epoch) + 100_003 * rank) % (2**32)
        set_determinism(seed=seed)
        for t in self.transforms:
            t.set_random_state(seed=seed)


class HistoryLogger:
    """Per-epoch history in ``output_dir/history.csv`` and a training-curve PNG beside it.

    Columns: ``epoch``, ``iteration``, ``train_loss`` (mean over the epoch's iterations), ``elapsed_s``
    (training + validation wall seconds, with a :class:`~medunet.engines.training.TrainingBudget`), ``lr``
    and every scalar metric of the validator at that epoch (blank on epochs without validation). On resume, rows after the
    restored epoch are dropped, so the file always describes one consistent run.
    """

    def __init__(self, output_dir: str | os.PathLike, validator: Engine | None = None,
                 optimizer: torch.optim.Optimizer | None = None, curve_name: str = "training_curve.png"):
        self.output_dir = Path(output_dir)
        self.validator = validator
        self.optimizer = optimizer
        self.curve_path = self.output_dir / curve_name
        self.csv_path = self.output_dir / "history.csv"
        self.rows: list[dict] = []
        self._losses: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine: Engine) -> None:
        self.rows, self._loaded = [], False

    def _epoch_started(self, engine: Engine) -> None:
        # read the earlier rows here, not at STARTED: by now a resume has set the epoch counter
        if not self._loaded:
            self._loaded = True
            done = engine.state.epoch - 1
            if self.csv_path.exists() and done > 0:
                with open(self.csv_path, newline="") as fh:
                    self.rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= done]
        self._losses.clear()

    def _iteration(self, engine: Engine) -> None:
        loss = _output_loss(engine.state.output)
        if loss is not None:
            self._losses.append(loss)

    def _epoch(self, engine: Engine) -> None:
        row: dict = {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                     "train_loss": sum(self._losses) / len(self._losses) if self._losses else ""}
        elapsed = getattr(engine.state, "train_elapsed_s", None)
        if elapsed is not None:  # the TrainingBudget clock: training + validation wall seconds
            row["elapsed_s"] = round(float(elapsed), 2)
        if self.optimizer is not None:
            row["lr"] = self.optimizer.param_groups[0]["lr"]
        v = self.validator
        if v is not None and v.state is not None and v.state.epoch == engine.state.epoch:
            row.update({k: float(x) for k, x in v.state.metrics.items() if _is_number(x)})
        self.rows.append(row)
        if is_rank0():
            self.write()

    def write(self) -> None:
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.csv_path, buf.getvalue())
        atomic_write_bytes(self.curve_path, plot_history(self.rows))


def _is_number(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1
    return isinstance(x, int | float) and not isinstance(x, bool)


def _output_loss(output) -> float | None:
    if isinstance(output, list) and output:
        output = output[0]
    if isinstance(output, dict) and "loss" in output:
        return float(output["loss"])
    return None


def plot_history(rows: list[dict]) -> bytes:
    """PNG bytes: training loss (left axis) and validation metrics (right axis) per epoch, drawn against
    training wall time when every row has ``elapsed_s``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    # against wall time when the rows have it (a budgeted run), else against epochs
    timed = bool(rows) and all(r.get("elapsed_s") not in (None, "") for r in rows)

    def x_of(r) -> float:
        return float(r["elapsed_s"]) / 60 if timed else int(r["epoch"])

    def series(key):
        pts = [(x_of(r), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*series("train_loss"), "-o", color="tab:blue", label="train loss", markersize=3)
    ax.set_xlabel("training wall time (min)" if timed else "epoch")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    metric_keys = sorted({k for r in rows for k in r if k.startswith("val_")})
    for k in metric_keys:
        style = "-s" if k == "val_mean_dice" else "--"
        ax2.plot(*series(k), style, label=k, markersize=3, linewidth=2 if k == "val_mean_dice" else 1)
    ax2.set_ylabel("validation")
    ax2.set_ylim(0, 1.02)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=7)
    ax.set_title("medunet training curve")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
