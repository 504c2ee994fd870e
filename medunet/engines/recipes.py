"""A compute-lean training recipe for small-crop 3D datasets on CPU (e.g. MSD Hippocampus in 30 min).

What makes it fast: batches come from tensors in memory (:class:`medunet.data.cached.PatchSampler`), the
forward/backward pass runs under bfloat16 autocast (about 2× faster than float32 on AVX-512-BF16 CPUs),
and the learning rate follows nnU-Net's poly schedule over a *budget* — a number of iterations, a
wall-clock time, or both (whichever runs out first), so a time-limited run still anneals to zero.

Pieces:

* :func:`poly_lr` — nnU-Net's ``lr0 · (1 − progress)^0.9`` with a short linear warm-up.
* :class:`DeepSupervisionDiceCE` — Dice+CE on the main output and on DynUNet's deep-supervision heads.
* :func:`whole_volume_logits` / :func:`evaluate_cases` — pad a whole case to a network-valid size,
  predict (optionally with mirroring TTA), crop back, and score Dice/HD95 per class.
* :func:`train_recipe` — the loop, logging loss and periodic validation Dice against wall/CPU time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceCELoss

from medunet.engines.parallel import all_gather_list, world
from medunet.inference.tta import predict_probabilities
from medunet.metrics.segmentation import case_metrics

__all__ = [
    "RecipeConfig", "poly_lr", "DeepSupervisionDiceCE", "whole_volume_logits", "evaluate_cases",
    "summarize_rows", "train_recipe", "build_optimizer", "float32_norms", "evaluate_cases_sharded",
]

#: consecutive skipped (non-finite) steps after which training is declared diverged
_MAX_BAD_STEPS = 20

_NORMS = (torch.nn.modules.instancenorm._InstanceNorm, torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm,
          torch.nn.LayerNorm)


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


@dataclass
class RecipeConfig:
    """Optimisation settings of :func:`train_recipe`.

    Attributes:
        optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov, momentum 0.99, as nnU-Net).
        lr: peak learning rate (after warm-up).
        weight_decay: AdamW decoupled decay / SGD L2 (nnU-Net: 3e-5).
        poly_power: exponent of the poly decay.
        warmup_iterations: linear warm-up from ``lr/10``.
        max_iterations: stop after this many iterations (``None``: time only).
        time_budget_s: stop after this much time of training + periodic evaluation (``None``:
            iterations only). The LR schedule follows whichever budget is closer to being used up.
        clock: what ``time_budget_s`` counts — ``"wall"`` seconds, or ``"cpu"`` seconds of this process
            (all threads). A CPU budget makes runs comparable on a machine shared with other jobs.
        eval_interval_s: run the periodic validation every this many seconds of ``clock`` (0: only at
            the end).
        bf16: bfloat16 autocast for forward/backward (weights and optimizer stay float32).
        grad_clip: max gradient norm (nnU-Net: 12).
        seed: torch seed for the network's initialisation and dropout.
    """

    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    warmup_iterations: int = 50
    max_iterations: int | None = None
    time_budget_s: float | None = 1500.0
    clock: str = "wall"
    eval_interval_s: float = 120.0
    bf16: bool = True
    grad_clip: float = 12.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_iterations is None and self.time_budget_s is None:
            raise ValueError("RecipeConfig needs max_iterations or time_budget_s (or both)")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {self.clock!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")

    def to_dict(self) -> dict:
        return asdict(self)


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


class DeepSupervisionDiceCE(torch.nn.Module):
    """Dice + cross-entropy on a network's output, with deep supervision when there are several heads.

    Accepts logits ``(B, K, *S)``, a list of them, or DynUNet's training output ``(B, 1 + N, K, *S)``
    (heads already upsampled to ``S``). Heads are weighted 1, 1/2, 1/4, … (normalised), as nnU-Net.
    Target: ``(B, 1, *S)`` class values.
    """

    def __init__(self, batch_dice: bool = True) -> None:
        super().__init__()
        base = DiceCELoss(to_onehot_y=True, softmax=True, batch=batch_dice, smooth_nr=1e-5, smooth_dr=1e-5)
        self.loss = DeepSupervisionLoss(base, weight_mode="exp")

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, torch.Tensor) and logits.dim() == target.dim() + 1:
            logits = list(torch.unbind(logits, dim=1))
        if isinstance(logits, torch.Tensor):
            logits = [logits]
        return self.loss([t.float() for t in logits], target)


def _pad_to(x: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, list[slice]]:
    """Zero-pad ``(B, C, *S)`` symmetrically to ``shape``; returns the padded tensor and the crop back."""
    pads, crop = [], [slice(None), slice(None)]
    for s, t in zip(x.shape[2:], shape):
        before = (t - s) // 2
        pads.append((before, t - s - before))
        crop.append(slice(before, before + s))
    flat = [v for pair in reversed(pads) for v in pair]
    return (F.pad(x, flat) if any(flat) else x), crop


def whole_volume_logits(network: torch.nn.Module, image: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Logits of a whole case in one pass: ``(B, C, *S)`` → ``(B, K, *S)``.

    The input is zero-padded (zero = the normalised mean) up to the network's next valid size
    (``network.valid_input_shape(S, "up")`` when the network offers it) and the output cropped back.
    """
    shape = tuple(image.shape[2:])
    valid = tuple(network.valid_input_shape(shape, mode="up")) if hasattr(network, "valid_input_shape") else shape
    padded, crop = _pad_to(image, valid)
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = network(padded)
    return out.float()[tuple(crop)]


@torch.no_grad()
def evaluate_cases(
    network: torch.nn.Module,
    cases: Sequence,
    num_classes: int,
    tta: bool = False,
    mirror_axes: Sequence[int] | None = None,
    bf16: bool = False,
    metrics: Sequence[str] = ("dice",),
    keep_predictions: bool = False,
) -> list[dict]:
    """Predict each cached case whole and score it.

    Args:
        network: in any mode; evaluation runs in ``eval()`` and restores the previous mode. Cases are
            moved to the network's device and predictions back to the CPU.
        cases: :class:`medunet.data.cached.CachedCase` s (1 mm isotropic or not: HD95 uses each case's
            spacing when it has one, else voxels).
        num_classes: ``K``, background included.
        tta: average softmax over all mirrored copies (``mirror_axes``, default all).
        metrics: names for :func:`medunet.metrics.segmentation.case_metrics` (``"dice"``, ``"hd95"``…).
        keep_predictions: also return each predicted label map ``(*S)`` (uint8) under ``"pred"``.

    Returns:
        one dict per case: ``{"case": id, "metrics": {class: {metric: value}}, "mean_dice": x[, "pred"]}``.
    """
    was_training = network.training
    network.eval()
    first = next(network.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    rows = []
    try:
        for case in cases:
            x = case.image.unsqueeze(0).to(device)
            probs, _ = predict_probabilities(lambda t: whole_volume_logits(network, t, bf16=bf16), x, tta=tta,
                                             mirror_axes=mirror_axes)
            pred = probs[0].argmax(0).to(torch.uint8).cpu()
            spacing = getattr(case, "spacing", None)
            per_class = case_metrics(pred, case.label[0], num_classes, spacing=spacing, metrics=metrics)
            dices = [v["dice"] for v in per_class.values() if math.isfinite(v.get("dice", math.nan))]
            row = {"case": case.case_id, "metrics": per_class,
                   "mean_dice": float(np.mean(dices)) if dices else math.nan}
            if keep_predictions:
                row["pred"] = pred
            rows.append(row)
    finally:
        network.train(was_training)
    return rows


def evaluate_cases_sharded(network: torch.nn.Module, cases: Sequence, num_classes: int, **kwargs) -> list[dict]:
    """:func:`evaluate_cases` with the cases split over the ranks of a process group, rows gathered.

    Rank ``r`` of ``W`` scores ``cases[r::W]``; every rank returns all rows (in rank order, not the
    input order). Without a process group it is :func:`evaluate_cases`. Call it on every rank.
    """
    rank, size = world()
    return all_gather_list(evaluate_cases(network, list(cases)[rank::size], num_classes, **kwargs))


def summarize_rows(rows: Sequence[dict]) -> dict:
    """Mean of every per-class metric over cases (NaNs left out), plus the mean foreground Dice.

    Returns:
        ``{"mean_dice": x, "classes": {class: {metric: mean}}}``.
    """
    classes: dict = {}
    for row in rows:
        for c, values in row["metrics"].items():
            for name, v in values.items():
                classes.setdefault(c, {}).setdefault(name, []).append(v)
    means = {c: {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in m.items()}
             for c, m in classes.items()}
    dice = [m["dice"] for m in means.values() if "dice" in m]
    return {"mean_dice": float(np.mean(dice)) if dice else math.nan, "classes": means}


def build_optimizer(network: torch.nn.Module, config: RecipeConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.99 (nnU-Net's), at ``config.lr``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(network.parameters(), lr=config.lr, momentum=0.99, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train_recipe(
    network: torch.nn.Module,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: torch.nn.Module,
    config: RecipeConfig,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    log: Callable[[str], None] | None = print,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """Train ``network`` until the iteration or time budget is used up.

    Args:
        network: trained in place (``train()`` mode).
        next_batch: returns ``(image (B, C, *P), label (B, 1, *P))``, e.g. a
            :class:`~medunet.data.cached.PatchSampler`.
        loss_fn: ``loss_fn(output, label)``, e.g. :class:`DeepSupervisionDiceCE`.
        config: :class:`RecipeConfig`.
        evaluate: called with the network every ``config.eval_interval_s`` seconds and once at the end;
            returns a dict of numbers (e.g. ``{"dice": …}``) that goes into the history.
        log: receives one line per evaluation (``None``: silent).
        device: where the network and batches go.

    Distributed: when a ``torch.distributed`` process group is up (e.g. under
    :func:`medunet.engines.parallel.spawn_cpu_workers`), every rank calls this with its own
    ``next_batch``; the network is wrapped in ``DistributedDataParallel`` (gradients averaged), and the
    ranks agree after every step on the clock and the loss (their means), so they change the learning
    rate, skip a step, evaluate and stop at the same iterations. ``evaluate`` runs on every rank (shard
    the validation cases there and gather, e.g. :func:`evaluate_cases_sharded`).

    Returns:
        history: one dict per evaluation point with ``iteration``, ``elapsed_s`` (wall, training +
        evaluation), ``train_s`` (wall in training steps only), ``cpu_s`` (process CPU time),
        ``loss`` (mean since the previous point), ``lr``, ``skipped_steps`` (updates skipped for
        non-finite loss/gradients so far) and whatever ``evaluate`` returned.

    Raises:
        FloatingPointError: after 20 consecutive steps with a non-finite loss or gradient.
    """
    torch.manual_seed(config.seed)
    device = torch.device(device)
    network.to(device).train()
    if config.bf16:
        float32_norms(network)
    _, world_size = world()
    model = network
    if world_size > 1:
        # averages gradients over the ranks (and starts every rank from rank 0's weights)
        model = torch.nn.parallel.DistributedDataParallel(network)
    optimizer = build_optimizer(network, config)
    history: list[dict] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    train_s, last_eval, iteration, losses, skipped, bad_in_a_row = 0.0, 0.0, 0, [], 0, 0
    clock = 0.0  # budget used so far, in config.clock seconds (the ranks' mean when distributed)

    def used() -> float:
        return time.perf_counter() - t0 if config.clock == "wall" else time.process_time() - cpu0

    def progress() -> float:
        parts = []
        if config.max_iterations:
            parts.append(iteration / config.max_iterations)
        if config.time_budget_s:
            parts.append(clock / config.time_budget_s)
        return max(parts)

    def agree(value: float) -> tuple[float, float]:
        """(clock, loss) as all ranks see them: the means over ranks (a non-finite loss anywhere stays so)."""
        if world_size == 1:
            return used(), value
        shared = torch.tensor([used(), value], dtype=torch.float64)
        torch.distributed.all_reduce(shared)
        return float(shared[0]) / world_size, float(shared[1]) / world_size

    def checkpoint(final: bool) -> None:
        nonlocal last_eval, losses, clock
        point = {"iteration": iteration, "elapsed_s": time.perf_counter() - t0, "train_s": train_s,
                 "cpu_s": time.process_time() - cpu0, "loss": float(np.mean(losses)) if losses else math.nan,
                 "lr": optimizer.param_groups[0]["lr"], "skipped_steps": skipped, "final": final}
        if evaluate is not None:
            point.update(evaluate(network))
            network.train()
        history.append(point)
        losses = []
        clock = agree(0.0)[0]
        last_eval = clock
        if log is not None:
            extra = " ".join(f"{k}={v:.4f}" for k, v in point.items()
                             if isinstance(v, float) and k not in ("elapsed_s", "train_s", "cpu_s", "loss", "lr"))
            log(f"it={iteration} wall={point['elapsed_s']:.0f}s cpu={point['cpu_s']:.0f}s "
                f"loss={point['loss']:.4f} lr={point['lr']:.2e} {extra}".rstrip())

    while progress() < 1.0:
        step_start = time.perf_counter()
        lr = poly_lr(config.lr, progress(), config.poly_power, iteration, config.warmup_iterations)
        for group in optimizer.param_groups:
            group["lr"] = lr
        image, label = next_batch()
        image, label = image.to(device), label.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            output = model(image)
        loss = loss_fn(output, label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip or math.inf)
        clock, value = agree(float(loss.detach()))
        if math.isfinite(value) and bool(torch.isfinite(grad_norm)):
            optimizer.step()
            losses.append(value)
            bad_in_a_row = 0
        else:
            # skip the update, as AMP's GradScaler does: oneDNN's bf16 conv3d backward occasionally returns
            # non-finite gradients on tiny (2×2×2) feature maps; a persistent failure is a real divergence
            skipped += 1
            bad_in_a_row += 1
            if bad_in_a_row >= _MAX_BAD_STEPS:
                raise FloatingPointError(f"training diverged at iteration {iteration}: {bad_in_a_row} steps in a row "
                                         f"with non-finite loss/gradients (loss {value}); lower the lr")
        iteration += 1
        train_s += time.perf_counter() - step_start
        if config.eval_interval_s and clock - last_eval >= config.eval_interval_s and progress() < 1.0:
            checkpoint(final=False)
    checkpoint(final=True)
    return history
