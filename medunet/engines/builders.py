"""Small builders the bundle configs reference: metric post-processing and a tqdm progress bar."""

from __future__ import annotations

from ignite.engine import Engine
from monai.transforms import AsDiscreted, Compose

from medunet.engines.handlers import _output_loss, is_rank0

__all__ = ["segmentation_postprocessing", "Progress"]


def segmentation_postprocessing(plan, keys: tuple[str, str] = ("pred", "label")) -> Compose:
    """Per-case post-processing before metrics: ``pred`` logits ``(K, *S)`` → one-hot argmax ``(K, *S)``,
    ``label`` map ``(1, *S)`` → one-hot ``(K, *S)``, ``K = plan.out_channels``."""
    k = int(plan.out_channels)
    return Compose([AsDiscreted(keys=list(keys), argmax=[True, False], to_onehot=[k, k])])


class Progress:
    """tqdm progress bar (Ignite's ``ProgressBar``) showing the running loss; silent on ranks > 0."""

    def __init__(self, persist: bool = False, enabled: bool = True):
        self.persist = persist
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if not (self.enabled and is_rank0()):
            return
        from ignite.handlers import ProgressBar

        ProgressBar(persist=self.persist).attach(
            engine, output_transform=lambda out: {"loss": _output_loss(out) or 0.0})
