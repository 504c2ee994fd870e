"""The pieces every caller of a trained model shares: which plan goes with a checkpoint, and a batch
segmentation that reports each bad file in one line and goes on.

``medunet segment``, the bundles' ``inference.json`` (``python -m monai.bundle run inferring``) and
``evaluate.json``, and the MONAI Label app all call these, so they all predict the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from medunet.data.plan import Plan
from medunet.io import InputError, load_checkpoint
from medunet.io.errors import printable

if TYPE_CHECKING:  # (predictor.py imports this module)
    from medunet.inference.predictor import Predictor, SegmentResult

__all__ = ["trained_plan_path", "resolve_plan", "segment_inputs", "run_inferring"]

PathLike = str | os.PathLike


def trained_plan_path(checkpoint: PathLike | None = None, bundle: PathLike | None = None) -> Path | None:
    """The plan file that goes with ``checkpoint``: ``plan.json`` beside it (what medunet's trainers
    write next to ``model.pt``), else ``<bundle>/plan.json``, else ``<bundle>/configs/plan.json``;
    ``None`` when there is none. The checkpoint itself need not exist (an untrained bundle)."""
    candidates = []
    if checkpoint is not None:
        candidates.append(Path(checkpoint).parent / "plan.json")
    if bundle is not None:
        candidates += [Path(bundle) / "plan.json", Path(bundle) / "configs" / "plan.json"]
    return next((c for c in candidates if c.is_file()), None)


def resolve_plan(bundle: PathLike | None = None, checkpoint: PathLike | None = None) -> Plan:
    """The plan a checkpoint was trained with — the one answer to "which plan goes with these weights".

    Order: the checkpoint's own ``"plan"`` entry (when the file exists), then
    :func:`trained_plan_path` (``plan.json`` beside the checkpoint, then the bundle's).

    Raises:
        InputError: naming the checkpoint (or bundle) when no plan is found or the entry is invalid.
    """
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.is_file():
        entry = load_checkpoint(ckpt).get("plan")
        if isinstance(entry, dict):
            try:
                return Plan.from_dict(entry)
            except (TypeError, ValueError) as e:
                raise InputError(ckpt, f"invalid 'plan' entry ({e})") from None
    path = trained_plan_path(ckpt, bundle)
    if path is not None:
        return Plan.load(path)
    where = bundle if bundle is not None else ckpt
    raise InputError(where, "no plan found (checkpoint 'plan' entry, plan.json beside it, or <bundle>/plan.json)")


def segment_inputs(
    predictor: Predictor,
    inputs: PathLike | Iterable[PathLike],
    output_dir: PathLike,
    overwrite: bool = False,
    save_probabilities: bool = False,
    uncertainty: bool | str = False,
    prefix: str = "medunet segment",
    stream: TextIO | None = None,
    formats: Sequence[str] | str = ("nifti",),
    shard: tuple[int, int] = (0, 1),
    prefetch: bool = False,
) -> list[SegmentResult]:
    """:meth:`Predictor.segment` with one line per failed or skipped input on stderr and the summary
    table on stdout (what ``medunet segment`` and ``inferring`` print); ``shard``, ``prefetch``: see there.

    Writes ``<output_dir>/<id>_seg.nii.gz`` (``.png`` for 2D image inputs) per input, atomically, and
    for DICOM inputs ``<id>_seg.dcm`` / ``<id>_rtstruct.dcm`` as ``formats`` asks.
    """
    from tqdm.auto import tqdm

    from medunet.inference.predictor import summary_table

    def report(result: SegmentResult) -> None:
        if not result.ok:
            line = result.message if result.status in ("skipped", "ignored") else f"{result.status}: {result.message}"
            tqdm.write(printable(f"{prefix}: {line}"), file=stream or sys.stderr)

    results = predictor.segment(inputs, output_dir, overwrite=overwrite, save_probabilities=save_probabilities,
                                uncertainty=uncertainty, report=report, formats=formats, shard=shard,
                                prefetch=prefetch)
    print(summary_table(results), flush=True)
    return results


def run_inferring(predictor: Predictor, input_dir: PathLike | Iterable[PathLike], output_dir: PathLike,
                  overwrite: bool = True) -> list[SegmentResult]:
    """The bundles' ``inferring`` run: :func:`segment_inputs` over ``input_dir`` into ``output_dir``.

    A bad file costs one line and the batch goes on; only when no input succeeded does it raise, so
    ``python -m monai.bundle run inferring`` exits non-zero.

    Raises:
        RuntimeError: one line naming ``input_dir`` when every input failed (or there was none).
    """
    results = segment_inputs(predictor, input_dir, output_dir, overwrite=overwrite, prefix="inferring")
    n_failed = sum(r.failed for r in results)
    if not any(r.done for r in results):
        raise RuntimeError(f"{input_dir}: no input was segmented ({n_failed} of {len(results)} failed, see above)")
    return results
