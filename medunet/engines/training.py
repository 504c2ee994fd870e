"""The parts of the bundles' trainer that make it fast and accurate on a CPU: one training step with mixed
precision, and a budget in epochs or wall-clock seconds that drives the learning rate, validation and
stopping.

* :class:`TrainStep` — the ``iteration_update`` of MONAI's ``SupervisedTrainer``: bfloat16 autocast on CPUs
  with native bf16 (float16 AMP with a ``GradScaler`` on CUDA), normalisation layers in float32, gradient
  clipping, and non-finite steps skipped instead of applied.
* :class:`TrainingBudget` — an Ignite handler: nnU-Net's warm-up + poly learning rate over whichever budget
  runs out first (``max_epochs × epoch_length`` iterations, or ``time_budget`` seconds of training and
  validation, counted across resumes), validation every ``val_interval`` epochs and at the end, and the
  stop. Under ``torch.distributed`` the ranks agree on the clock after every step (its mean), so they
  change the learning rate, validate and stop together.
* :func:`poly_lr`, :func:`float32_norms`.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from medunet.engines.handlers import unwrap

__all__ = ["poly_lr", "float32_norms", "TrainStep", "TrainingBudget", "cpu_bf16_supported"]

logger = logging.getLogger("medunet.engines")

_NORMS = (torch.nn.modules.instancenorm._InstanceNorm, torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm,
          torch.nn.LayerNorm)


def cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX-512-BF16 or AMX); detected, never assumed."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def poly_lr(base_lr: float, progress: float, power: float = 0.9, iteration: int | None = None,
            warmup_iterations: int = 0) -> float:
    """nnU-Net's poly schedule: ``base_lr · (1 − progress)^power``, ``progress`` ∈ [0, 1].

    During the first ``warmup_iterations`` the rate ramps linearly from ``base_lr/10``.
    """
    progress = min(max(float(progress), 0.0), 1.0)
    lr = base_lr * (1.0 - progress) ** power
    if iteration is not None and warmup_iterations > 0 and iteration < warmup_iterations:
        lr *= 0.1 + 0.9 * iteration / warmup_iterations
    return lr


def _to_float(module, args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def float32_norms(network: torch.nn.Module) -> torch.nn.Module:
    """Make every normalisation layer compute in float32 under bf16 autocast (in place; returns it).

    CPU autocast leaves instance norm in the input's dtype, so after a bf16 convolution its mean and
    variance would be taken in bfloat16 — imprecise on small feature maps and a source of NaNs. A
    forward pre-hook casts the input to float32 (the following convolution casts back). Weights and
    ``state_dict`` are unchanged. Idempotent.
    """
    for m in network.modules():
        if isinstance(m, _NORMS) and not getattr(m, "_medunet_float32", False):
            m.register_forward_pre_hook(_to_float)
            m._medunet_float32 = True
    return network


class TrainStep:
    """One training iteration for MONAI's ``SupervisedTrainer(iteration_update=TrainStep())``.

    ``batch → prepare_batch → forward under autocast → loss in float32 → backward → clip → step``.

    Precision: on CUDA with the trainer's ``amp`` on, float16 autocast with the trainer's ``GradScaler``;
    on a CPU, bfloat16 autocast when ``cpu_bf16`` (``"auto"``: the CPU runs bf16 natively, ~2× faster
    there) with normalisation layers in float32 (:func:`float32_norms`); float32 otherwise. Weights and
    the optimizer stay float32.

    A step whose loss or gradient norm is not finite is skipped (as AMP's ``GradScaler`` does; oneDNN's
    bf16 conv3d backward occasionally returns non-finite gradients on 2×2×2 feature maps). After
    ``max_bad_steps`` such steps in a row training stops with ``FloatingPointError``. Under DDP the
    gradients, and so the decision, are the same on every rank.

    Returns ``{"image", "label", "loss"}`` as ``engine.state.output`` (``loss`` a 0-d tensor).

    Args:
        cpu_bf16: ``"auto"``, True or False.
        grad_clip: max gradient norm (nnU-Net: 12; ``None``/0: no clipping).
        max_bad_steps: consecutive skipped steps that mean divergence.
    """

    def __init__(self, cpu_bf16: bool | str = "auto", grad_clip: float | None = 12.0, max_bad_steps: int = 20):
        self.cpu_bf16 = cpu_bf16_supported() if cpu_bf16 == "auto" else bool(cpu_bf16)
        self.grad_clip = float(grad_clip) if grad_clip else math.inf
        self.max_bad_steps = int(max_bad_steps)
        self.bad_in_a_row = 0
        self.skipped = 0
        self._prepared: set[int] = set()

    def autocast_dtype(self, engine: Engine) -> torch.dtype | None:
        """The autocast dtype this step uses for ``engine`` (``None``: float32)."""
        device = torch.device(engine.state.device) if getattr(engine.state, "device", None) else torch.device("cpu")
        if device.type == "cuda":
            return torch.float16 if getattr(engine, "amp", False) else None
        return torch.bfloat16 if self.cpu_bf16 else None

    def __call__(self, engine: Engine, batchdata) -> dict:
        if batchdata is None:
            raise ValueError("TrainStep: no batch data for this iteration")
        device = engine.state.device
        batch = engine.prepare_batch(batchdata, device, engine.non_blocking, **getattr(engine, "to_kwargs", {}))
        inputs, targets = batch[0], batch[1]
        network = engine.network
        dtype = self.autocast_dtype(engine)
        if dtype == torch.bfloat16 and id(network) not in self._prepared:
            float32_norms(unwrap(network))
            self._prepared.add(id(network))
        network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        device_type = torch.device(device).type if device is not None else "cpu"
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            pred = engine.inferer(inputs, network)
        loss = engine.loss_function(pred, targets).mean()
        scaler = getattr(engine, "scaler", None) if dtype == torch.float16 else None
        params = [p for p in network.parameters() if p.requires_grad]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(engine.optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            scaler.step(engine.optimizer)  # skips the step itself on inf/NaN gradients
            scaler.update()
        else:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            if bool(torch.isfinite(loss.detach())) and bool(torch.isfinite(grad_norm)):
                engine.optimizer.step()
                self.bad_in_a_row = 0
            else:
                self.skipped += 1
                self.bad_in_a_row += 1
                if self.bad_in_a_row >= self.max_bad_steps:
                    raise FloatingPointError(
                        f"training diverged at iteration {engine.state.iteration}: {self.bad_in_a_row} steps in a row "
                        f"with a non-finite loss or gradient (loss {float(loss.detach())}); lower learning_rate")
        engine.state.skipped_steps = self.skipped
        return {"image": inputs, "label": targets, "loss": loss.detach()}


class TrainingBudget:
    """Learning rate, validation and stopping of an Ignite trainer, driven by a budget.

    The budget is ``max_epochs × epoch_length`` iterations (the trainer's), ``time_budget`` seconds, or
    both — whichever runs out first. ``progress`` ∈ [0, 1] is the larger of the used fractions, and the
    learning rate before every step is ``poly_lr(learning_rate, progress, power, iteration, warmup)``,
    so a time-limited run still anneals to zero at its end.

    The clock counts the wall seconds of training and validation from the first epoch on (planning and
    caching before the trainer starts are not in it), and continues across resumes: a
    :class:`~medunet.engines.CheckpointManager` given this handler saves and restores
    :meth:`state_dict`. Under ``torch.distributed`` every rank uses the ranks' mean clock.

    Validation: ``validator.run(epoch)`` after every ``val_interval``-th epoch and after the last one
    (the epoch in which the budget ran out ends at that step). Attach this handler before
    ``HistoryLogger``/``CheckpointManager`` so that they see the validation of the epoch.

    ``engine.state.train_elapsed_s`` holds the clock, ``engine.state.budget_progress`` the progress.

    Args:
        optimizer: its ``lr`` is set before every step.
        learning_rate: peak rate after warm-up.
        time_budget: seconds, or ``None`` (epochs only).
        warmup_iterations: linear warm-up from ``learning_rate/10``.
        power: poly exponent.
        validator: an evaluator with ``run(epoch)``, or ``None``.
        val_interval: validate every N epochs (0: only at the end).
        sampler: a :class:`~medunet.data.cached.SampleStream` (or anything with ``start_step``), told
            the iteration to continue from at every epoch start.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, learning_rate: float, time_budget: float | None = None,
                 warmup_iterations: int = 50, power: float = 0.9, validator=None, val_interval: int = 1,
                 sampler=None) -> None:
        if time_budget is not None and float(time_budget) <= 0:
            raise ValueError(f"time_budget must be > 0 seconds or None, got {time_budget}")
        self.optimizer = optimizer
        self.learning_rate = float(learning_rate)
        self.time_budget = float(time_budget) if time_budget is not None else None
        self.warmup_iterations = int(warmup_iterations)
        self.power = float(power)
        self.validator = validator
        self.val_interval = int(val_interval or 0)
        self.sampler = sampler
        self.elapsed_before = 0.0  # clock at the start of this process's run (restored on resume)
        self.elapsed = 0.0
        self._t0: float | None = None
        self._clock_buffer: torch.Tensor | None = None
        self.finished = False

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"elapsed_s": float(self.elapsed), "finished": bool(self.finished),
                "time_budget": float(self.time_budget or 0.0)}

    def load_state_dict(self, state: dict) -> None:
        self.elapsed_before = self.elapsed = float(state.get("elapsed_s", 0.0))
        # a finished run stays finished unless the new budget is larger
        self.finished = bool(state.get("finished", False)) and self._clock_used_up(self.elapsed)

    # -- progress ----------------------------------------------------------------------------------
    def _clock_used_up(self, elapsed: float) -> bool:
        return self.time_budget is not None and elapsed >= self.time_budget

    def progress(self, engine: Engine, iteration: int | None = None) -> float:
        """Fraction of the budget used after ``iteration`` steps (default: the engine's count)."""
        parts = [0.0]
        s = engine.state
        done = s.iteration if iteration is None else iteration
        if s.max_epochs and s.epoch_length:
            parts.append(done / (s.max_epochs * s.epoch_length))
        if self.time_budget is not None:
            parts.append(self.elapsed / self.time_budget)
        return min(max(parts), 1.0)

    def _agreed_clock(self) -> float:
        local = self.elapsed_before + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # one buffer for the whole run: a tensor made per step could be freed last by gloo's worker
            # thread, which then needs the GIL; at process exit, while the main thread tears the group
            # down holding the GIL, that deadlocks (seen under torchrun)
            if self._clock_buffer is None:
                self._clock_buffer = torch.zeros(1, dtype=torch.float64)
            self._clock_buffer.fill_(local)
            dist.all_reduce(self._clock_buffer)
            return float(self._clock_buffer[0]) / dist.get_world_size()
        return local

    # -- events ------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._set_lr)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine: Engine) -> None:
        if self._t0 is None:  # first epoch of this process (a resume has restored the counters by now)
            self._t0 = time.perf_counter()
            if self.finished or self._clock_used_up(self.elapsed_before):
                logger.info("training budget already used (%.0f s of %s s): nothing to train", self.elapsed_before,
                            self.time_budget)
                self.finished = True
                engine.state.epoch -= 1  # this epoch never ran: leave the counters as the checkpoint had them
                engine.terminate()
                return
        if self.sampler is not None:
            self.sampler.start_step = int(engine.state.iteration)
        engine.state.train_elapsed_s = self.elapsed

    def _set_lr(self, engine: Engine) -> None:
        done = engine.state.iteration - 1  # ignite counts the step that is about to run
        lr = poly_lr(self.learning_rate, self.progress(engine, done), self.power, done, self.warmup_iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _iteration_completed(self, engine: Engine) -> None:
        self.elapsed = self._agreed_clock()
        engine.state.train_elapsed_s = self.elapsed
        engine.state.budget_progress = self.progress(engine)
        if engine.state.budget_progress >= 1.0 and not self.finished:
            self.finished = True
            # end this epoch here (its EPOCH_COMPLETED handlers validate, log and checkpoint) and no more
            engine.state.max_epochs = engine.state.epoch
            engine.terminate_epoch()

    def _epoch_completed(self, engine: Engine) -> None:
        s = engine.state
        if s.max_epochs is not None and s.epoch >= s.max_epochs:
            self.finished = True
        last = self.finished
        due = self.val_interval > 0 and s.epoch % self.val_interval == 0
        if self.validator is not None and (due or last):
            self.validator.run(s.epoch)
            self.elapsed = self._agreed_clock()  # validation time counts against the budget
            s.train_elapsed_s = self.elapsed
            if self._clock_used_up(self.elapsed) and not self.finished:
                self.finished = True
                s.max_epochs = s.epoch
