"""Small builders the bundle configs reference: metric post-processing and a tqdm progress bar."""

from __future__ import annotations

from functools import partial

import torch
from ignite.engine import Engine, Events
from monai.transforms import AsDiscreted, Compose, Lambdad

from medunet.engines.handlers import _output_loss, is_rank0

__all__ = ["segmentation_postprocessing", "Progress", "shared_handler"]


def segmentation_postprocessing(plan, keys: tuple[str, str] = ("pred", "label")) -> Compose:
    """Per-case post-processing before metrics: ``pred`` logits ``(K, *S)`` → one-hot argmax ``(K, *S)``,
    ``label`` map ``(1, *S)`` → one-hot ``(K, *S)``, ``K = plan.out_channels``; then, as the Predictor
    does, only the largest connected component of each class in ``plan.largest_component``."""
    k = int(plan.out_channels)
    steps = [AsDiscreted(keys=list(keys), argmax=[True, False], to_onehot=[k, k])]
    classes = [int(c) for c in (getattr(plan, "largest_component", None) or [])]
    if classes:
        steps.append(Lambdad(keys=keys[0], func=partial(_largest_component_onehot, classes=classes)))
    return Compose(steps)


def _largest_component_onehot(onehot: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """One-hot ``(K, *S)`` with only the largest connected component of each of ``classes`` kept (the
    rest becomes background) — the Predictor's cleaning, on the metric's tensors."""
    from medunet.inference.postprocess import keep_largest_component

    label = keep_largest_component(onehot.argmax(dim=0), classes)
    out = torch.nn.functional.one_hot(label.long(), onehot.shape[0]).movedim(-1, 0)
    return out.to(device=onehot.device, dtype=onehot.dtype)


class Progress:
    """Training progress: a tqdm bar (Ignite's ``ProgressBar``, running loss) when stderr is a terminal,
    else one plain line per epoch — a redirected log gets readable lines, not thousands of carriage
    returns. Silent on ranks > 0.

    The epoch line: ``epoch 3/100: iteration 750, loss 0.4123, lr 2.91e-03, 87.2 s`` (plus the budget's
    progress when a :class:`~medunet.engines.training.TrainingBudget` runs).

    Args:
        persist: keep each epoch's bar on screen.
        enabled: False: no output at all.
        terminal: ``None``: decide from ``sys.stderr.isatty()``; True/False to force bar/lines.
    """

    def __init__(self, persist: bool = False, enabled: bool = True, terminal: bool | None = None):
        self.persist = persist
        self.enabled = enabled
        self.terminal = terminal

    def attach(self, engine: Engine) -> None:
        import sys

        if not (self.enabled and is_rank0()):
            return
        terminal = self.terminal if self.terminal is not None else bool(getattr(sys.stderr, "isatty", lambda: False)())
        if terminal:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=self.persist).attach(
                engine, output_transform=lambda out: {"loss": _output_loss(out) or 0.0})
            return
        losses: list[float] = []

        def collect(e: Engine) -> None:
            loss = _output_loss(e.state.output)
            if loss is not None:
                losses.append(loss)

        def line(e: Engine) -> None:
            s = e.state
            parts = [f"epoch {s.epoch}/{s.max_epochs}: iteration {s.iteration}"]
            if losses:
                parts.append(f"loss {sum(losses) / len(losses):.4f}")
            optimizer = getattr(e, "optimizer", None)
            if optimizer is not None:
                parts.append(f"lr {optimizer.param_groups[0]['lr']:.2e}")
            if getattr(s, "train_elapsed_s", None) is not None:
                parts.append(f"{s.train_elapsed_s:.1f} s")
            if getattr(s, "budget_progress", None) is not None:
                parts.append(f"budget {100 * s.budget_progress:.0f}%")
            print(", ".join(parts), file=sys.stderr, flush=True)
            losses.clear()

        engine.add_event_handler(Events.ITERATION_COMPLETED, collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, line)


def shared_handler(handler):
    """``handler`` itself: puts an object defined elsewhere in the config (e.g. ``@train#budget``, which
    the checkpoint handler also references) into a handler list as a ``{"_target_": ...}`` entry — the
    form MONAI Label's bundle train task expects of every entry of ``train#handlers``."""
    return handler

