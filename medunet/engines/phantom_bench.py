"""Training the CT benchmark network (``scripts/bench_inference.py``): the ``bundles/ct`` bundle on
realistic-size CT phantoms, cached in a work folder per number of training phantoms.

The bundle is the one trainer; this module only lays out the phantoms and the run folder, adds the
bench's plan fields, and finds a cached run whose plan fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from medunet.data import Plan
from medunet.engines.handlers import trained_seconds
from medunet.engines.workflow import run_bundle_workflow

__all__ = ["train_bench_network", "phantom_dir", "run_dir", "bench_overrides", "trained_run"]


def train_bench_network(bundle: str | Path, plan: Plan, workdir: Path, seconds: float, cases: int,
                        phantom_shape: Sequence[int], log: Callable[[str], None] = print,
                        resume: bool = False) -> Path:
    """Train the ``bundle`` (``bundles/ct``) network on ``cases`` CT phantoms of ``phantom_shape`` through
    the bundle for ``seconds`` of wall time with the bench ``plan``'s spacing, patch and batch; returns
    the bundle's ``models/model.pt`` (``plan.json`` beside it).

    The bundle run lives in :func:`run_dir` (one per number of training phantoms). ``resume``
    (``--continue-training``): the bundle resumes that run with its time budget raised by ``seconds``
    (its learning rate follows the longer budget from where the clock stands). The plan's
    largest-component classes are the planner's, from the fingerprint of the training phantoms' labels.
    """
    from medunet.data.phantoms import generate_dataset
    from medunet.data.planning import fingerprint_dataset, single_object_classes

    data = phantom_dir(workdir, cases)
    if not (data / "dataset.json").exists():
        generate_dataset("ct", data, cases=cases + 1, seed=0, size=tuple(phantom_shape))
    run = run_dir(workdir, cases)
    budget = seconds + (trained_seconds(run / 'eval') if resume else 0.0)
    single = single_object_classes(fingerprint_dataset(data), plan.labels)
    log(f"training bundles/ct on {cases} phantoms for {seconds:.0f}s (budget {budget:.0f}s in all); "
        f"largest component only: {single}")
    wf = run_bundle_workflow(Path(bundle), "train", {
        "dataset_dir": str(data), "output_dir": str(run / "eval"), "ckpt_dir": str(run / "models"),
        "plan_overrides": {**bench_overrides(plan), "largest_component": single}, "time_budget": budget,
        "n_folds": cases + 1, "resume": resume, "mlflow": False, "progress_bar": False,
    })
    del wf
    log(f"trained weights {run / 'models' / 'model.pt'}: {trained_seconds(run / 'eval'):.0f} s of training in all")
    return run / "models" / "model.pt"


def phantom_dir(workdir: Path, cases: int) -> Path:
    """The training phantoms (``cases`` for training, one more for the bundle's validation fold)."""
    return workdir / f"phantoms_{cases}"


def run_dir(workdir: Path, cases: int) -> Path:
    """The cached bundle run trained on ``cases`` phantoms."""
    return workdir / f"bundle_run_{cases}"


def bench_overrides(plan: Plan) -> dict:
    """What the bench changes in the bundle's plan (a trained run fits the bench when these match)."""
    return {k: v for k, v in plan.to_dict().items() if k in ("target_spacing", "patch_size", "batch_size")}


def trained_run(workdir: Path, plan: Plan, cases: int) -> Path | None:
    """The cached bundle run's ``models/model.pt`` when it was trained with the bench's plan, else None."""
    model = run_dir(workdir, cases) / "models" / "model.pt"
    if not model.is_file() or not (model.parent / "plan.json").is_file():
        return None
    trained = Plan.load(model.parent / "plan.json").to_dict()
    return model if all(trained.get(k) == v for k, v in bench_overrides(plan).items()) else None
