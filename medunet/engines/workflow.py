"""What a bundle config calls before building engines: find the bundle, make sure there is data, decide
the plan, split the datalist, and prepare batches.

Configs stay declarative; each step here is a plain function that tests can call directly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import torch

from medunet.data.plan import Plan
from medunet.engines.handlers import is_rank0

__all__ = [
    "locate_bundle", "prepare_dataset", "resolve_plan", "trained_plan_file", "split_datalist",
    "prepare_batch_with_weights", "list_images", "PHANTOM_KINDS", "parse_overrides", "run_bundle_workflow",
    "screen_datalist", "BundleConfigError", "explain_config_error", "one_line_errors",
]

logger = logging.getLogger("medunet.engines")

#: bundle name → phantom kind generated when ``dataset_dir`` does not exist
PHANTOM_KINDS = {"ct": "ct", "mri": "mri", "cells2d": "cells"}


def locate_bundle(name: str) -> str:
    """The folder of bundle ``name`` when the config does not set ``bundle_root``.

    MONAI bundle configs cannot see their own path, so this looks, in order, at: the current directory
    when it is that bundle (``configs/metadata.json`` whose ``name`` is ``name``: the zoo's "run from the
    bundle folder" habit), ``./bundles/<name>`` (running from a medunet clone, as in
    ``python -m monai.bundle run training --config_file bundles/ct/train.json``), and the ``bundles/``
    folder of the clone medunet is installed from. Override with ``--bundle_root DIR`` otherwise.
    """
    cwd = Path.cwd()
    meta = cwd / "configs" / "metadata.json"
    if meta.is_file():
        try:
            if json.loads(meta.read_text(encoding="utf-8")).get("name") == name:
                return str(cwd)
        except json.JSONDecodeError:
            pass
    for candidate in (cwd / "bundles" / name, Path(__file__).resolve().parents[2] / "bundles" / name):
        if (candidate / "configs" / "metadata.json").is_file():
            return str(candidate)
    raise FileNotFoundError(f"bundle {name!r} not found from {cwd}; pass --bundle_root /path/to/bundles/{name}")


def prepare_dataset(dataset_dir: str | os.PathLike, kind: str, cases: int = 12, size: str = "small",
                    seed: int = 0) -> str:
    """Return ``dataset_dir``; when it does not exist, generate ``cases`` phantoms of ``kind`` there first.

    Only rank 0 generates; other ranks wait at a barrier under ``torch.distributed``.
    """
    path = Path(dataset_dir)
    if not path.exists() and is_rank0():
        from medunet.data.phantoms import generate_dataset

        msg = f"dataset_dir {path} does not exist: generating {cases} {kind} phantoms there (size {size!r})"
        logger.warning(msg)  # (without logging set up, Python's last-resort handler prints it)
        generate_dataset(kind, path, cases=int(cases), seed=int(seed), size=size)
    # every rank, whether or not the folder existed when it looked: a rank that saw rank 0's finished
    # folder and skipped the barrier would leave rank 0 waiting in it while it starts training (a hang)
    _barrier()
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: dataset_dir is not a folder")
    return str(path)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def resolve_plan(plan_file: str | os.PathLike, dataset_dir: str | os.PathLike | None = None,
                 output_dir: str | os.PathLike | None = None, replan: bool = False,
                 overrides: dict | None = None, defaults: dict | None = None, patch: str = "plan",
                 planner: dict | None = None) -> Plan:
    """The plan a run uses, written to ``output_dir/plan.json``.

    ``replan`` (or a missing ``plan_file``) plans from ``dataset_dir`` with
    :func:`medunet.data.planning.plan_dataset` in the data's own dimensionality (dataset.json's
    ``tensorImageSize``, else the images'), with ``planner`` as its keyword arguments (the bundle's
    network, e.g. ``{"network": "unet2015", "network_options": {...}, "max_batch_size": 1}``);
    otherwise ``plan_file`` is read. A dataset that cannot be planned raises
    :class:`~medunet.io.InputError` naming ``dataset_dir`` (one line). Then, in this order:

    * ``defaults``: the bundle's own choices on top of the planner's (e.g. ``{"network": {"res_block":
      true, "deep_supervision": true}, "mirror_axes": [0]}``); deep supervision is fitted to the
      network's depth (``deep_supr_num`` at most levels − 2; off for networks too shallow for it);
    * ``patch``: ``"plan"`` keeps the planned patch; ``"median"`` trains on the median image shape,
      rounded up to a size the network accepts (small-crop datasets such as MSD Hippocampus, where
      the whole crop fits in one patch and the CPU planner's smaller patch loses context);
    * ``overrides``: the user's, replacing top-level plan fields (e.g. ``{"patch_size": [32, 32, 32]}``).

    A ``network`` entry of ``defaults``/``overrides`` is merged into the plan's network options.
    """
    plan_path = Path(plan_file) if plan_file else None
    if replan or plan_path is None or not plan_path.exists():
        if dataset_dir is None:
            raise ValueError("resolve_plan: no plan file and no dataset to plan from")
        from medunet.data.planning import plan_dataset
        from medunet.io import InputError

        why = "replan requested" if replan else f"no plan file at {plan_path}"
        logger.info("planning from %s (%s)", dataset_dir, why)
        options = {"spatial_dims": None, **(planner or {})}
        try:
            plan = plan_dataset(dataset_dir, **options)
        except InputError:
            raise
        except (ValueError, OSError) as e:  # NoUsableCases, a plan the data cannot have, unreadable folder
            raise InputError(dataset_dir, f"cannot plan this dataset: {e}") from e
    else:
        plan = Plan.load(plan_path)
    if defaults:
        plan = _apply_plan_fields(plan, defaults)
    if patch not in ("plan", "median"):
        raise ValueError(f"patch must be 'plan' or 'median', got {patch!r}")
    if patch == "median" and plan.median_shape:
        net = _fit_deep_supervision(plan).build_network()
        median = [int(v) for v in plan.median_shape]
        fitted = net.valid_input_shape(median, mode="up") if hasattr(net, "valid_input_shape") else median
        plan.patch_size = [int(v) for v in fitted]
    if overrides:
        plan = _apply_plan_fields(plan, overrides)
    plan = _fit_deep_supervision(plan)
    if output_dir is not None and is_rank0():
        plan.save(Path(output_dir) / "plan.json")
    return plan


def _apply_plan_fields(plan: Plan, fields: dict) -> Plan:
    data = plan.to_dict()
    for key, value in dict(fields).items():
        if key == "network" and isinstance(value, dict) and value.get("name", data["network"]["name"]) == \
                data["network"]["name"]:
            data["network"] = {**data["network"], **value}
        else:
            data[key] = value
    return Plan.from_dict(data)


def _fit_deep_supervision(plan: Plan) -> Plan:
    """DynUNet needs ``deep_supr_num`` < its number of upsampling levels: lower it, or switch deep
    supervision off, when the planned network is too shallow for the requested heads."""
    net = dict(plan.network)
    if net.get("name") != "dynunet" or not net.get("deep_supervision"):
        return plan
    levels = len(net.get("strides") or [])
    allowed = max(levels - 2, 0)
    if allowed < 1:
        net["deep_supervision"] = False
        net.pop("deep_supr_num", None)
    else:
        net["deep_supr_num"] = min(int(net.get("deep_supr_num", 1)), allowed)
    plan.network = net
    return plan


def trained_plan_file(ckpt_dir: str | os.PathLike, default: str | os.PathLike) -> str:
    """The plan file of the weights in ``ckpt_dir`` (:func:`medunet.inference.trained_plan_path`:
    ``ckpt_dir/plan.json``), else ``default``."""
    from medunet.inference.bundle import trained_plan_path

    trained = trained_plan_path(Path(ckpt_dir) / "model.pt")
    return str(trained if trained is not None else default)


def split_datalist(dataset_dir: str | os.PathLike, n_folds: int = 5, fold: int = 0, seed: int = 0,
                   check: bool = True, split: str = "kfold") -> dict:
    """``{"train": [...], "val": [...]}`` of ``{"image", "label"}`` dicts: fold ``fold`` of a split of the
    dataset's training cases (MSD layout or a datalist JSON) — ``split="kfold"``: a seeded k-fold split
    (:func:`medunet.data.datalist.kfold_split`); ``"every_nth"``: every ``n_folds``-th case in listing
    order is held out (:func:`medunet.data.datalist.every_nth_split`; no seed).

    With ``check`` (the default) bad cases are dropped first, one warning line per problem
    (:func:`screen_datalist`), so the folds are made from the usable cases; ``check=False`` skips the
    pre-flight read of every file (large datasets already verified with ``medunet check-dataset``).
    """
    from medunet.data.datalist import every_nth_split, kfold_split, load_datalist

    items = load_datalist(dataset_dir)
    if check:
        items = screen_datalist(items, dataset_dir)
    if len(items) < 2:
        raise ValueError(f"{dataset_dir}: need at least 2 labelled cases to hold one out for validation")
    n_folds = max(2, min(int(n_folds), len(items)))
    if split == "every_nth":
        train, val = every_nth_split(items, n_folds, int(fold))
    elif split == "kfold":
        train, val = kfold_split(items, n_folds, int(fold), seed=int(seed))
    else:
        raise ValueError(f"split must be 'kfold' or 'every_nth', got {split!r}")
    return {"train": list(train), "val": list(val)}


def _item_paths(item: dict) -> list[Path]:
    paths = []
    for key in ("image", "label"):
        value = item.get(key)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (str, os.PathLike)):
                paths.append(Path(v))
    return paths


def _problems_by_file(items: list[dict], dataset_dir: str | os.PathLike) -> dict[Path, list[str]]:
    """Resolved path → one-line error messages, for every file of ``items`` that fails the per-case checks.

    A dataset folder goes through :func:`medunet.data.check.check_dataset` (readability, finite voxels,
    spacing, label shape/geometry vs the image, label values declared in dataset.json, ...); for a
    datalist JSON each file is at least read with :func:`medunet.io.read_image`.
    """
    found: dict[Path, list[str]] = {}
    if Path(dataset_dir).is_dir():
        from medunet.data.check import check_dataset

        for problem in check_dataset(dataset_dir).errors:
            found.setdefault(Path(problem.path).resolve(), []).append(f"{problem.path}: {problem.message} [{problem.kind}]")
        return found
    from medunet.io import InputError, read_image

    for path in {p for item in items for p in _item_paths(item)}:
        try:
            read_image(path)
        except InputError as e:
            found.setdefault(path.resolve(), []).append(str(e))
        except Exception as e:  # any reader failure still names the file
            found.setdefault(path.resolve(), []).append(f"{path}: {type(e).__name__}: {e}")
    return found


def screen_datalist(items: list[dict], dataset_dir: str | os.PathLike) -> list[dict]:
    """The cases of ``items`` whose image(s) and label pass the pre-flight checks.

    Every problem of a dropped case is logged as one warning line naming the file and the problem
    (``skipping training case <image>: <file>: <problem> [<kind>]``); training goes on with the rest, as
    ``medunet plan`` does. When no case is left, ``ValueError`` lists every bad file, one per line.
    """
    problems = _problems_by_file(items, dataset_dir)
    good, lines = [], []
    for item in items:
        messages = [m for p in _item_paths(item) for m in problems.get(p.resolve(), [])]
        if not messages:
            good.append(item)
            continue
        lines += messages
        if is_rank0():
            for message in messages:
                logger.warning("skipping training case %s: %s", item.get("image"), message)
    if lines and not good:
        raise ValueError(f"{dataset_dir}: none of the {len(items)} training case(s) is usable "
                         f"({len(lines)} problem(s), each logged above as one line: " + "; ".join(lines[:3])
                         + ("; ..." if len(lines) > 3 else "") + ")")
    if lines and is_rank0():
        logger.warning("%s: training on %d of %d cases (%d skipped, see above; `medunet check-dataset %s` "
                       "lists every problem)", dataset_dir, len(good), len(items), len(items) - len(good), dataset_dir)
    return good


def list_images(input_dir: str | os.PathLike) -> list[dict]:
    """``[{"image": path}, ...]`` for what ``medunet segment`` would read from ``input_dir``
    (:func:`medunet.inference.collect_inputs`: its NIfTI/PNG/TIFF files, else DICOM series folders)."""
    from medunet.inference.predictor import collect_inputs

    return [{"image": str(p)} for p in collect_inputs(input_dir)]


def prepare_batch_with_weights(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """MONAI ``prepare_batch`` for the seed's recipe: ``(image, cat([label, weight], dim=1))``.

    The loss (:class:`medunet.engines.losses.WeightMapLoss`) splits the target again; batches without a
    ``"weight"`` entry pass the label alone.
    """
    image = batchdata["image"].to(device=device, non_blocking=non_blocking, **kwargs)
    label = batchdata["label"]
    if "weight" in batchdata:
        label = torch.cat([torch.as_tensor(label), torch.as_tensor(batchdata["weight"]).to(label.dtype)], dim=1)
    return image, label.to(device=device, non_blocking=non_blocking, **kwargs)


#: what ``medunet train``/``medunet evaluate`` run: (run id, config files merged in order)
BUNDLE_WORKFLOWS = {"train": ("training", ["train.json"]), "evaluate": ("evaluating", ["train.json", "evaluate.json"])}


def parse_overrides(pairs) -> dict:
    """``["max_epochs=5", "plan_overrides={\\"batch_size\\": 1}"]`` → ``{"max_epochs": 5, ...}`` (JSON values,
    plain strings otherwise)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = str(pair).partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_bundle_workflow(bundle_dir: str | os.PathLike, workflow: str = "train", overrides: dict | None = None):
    """Run a bundle's training (``train``) or evaluation (``evaluate``) in this process, like
    ``python -m monai.bundle run training --config_file <bundle>/configs/train.json`` with ``bundle_root``
    set to ``bundle_dir``."""
    from monai.bundle import run

    root = Path(bundle_dir).resolve()
    configs_dir = root / "configs"
    if not (configs_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{root}: not a bundle (no configs/metadata.json)")
    run_id, names = BUNDLE_WORKFLOWS[workflow]
    logging_file = configs_dir / "logging.conf"
    config_files = [configs_dir / n for n in names]
    try:
        return run(run_id, config_file=[str(c) for c in config_files],
                   logging_file=str(logging_file) if logging_file.exists() else False,
                   **{"bundle_root": str(root), **(overrides or {})})
    except Exception as e:
        from medunet.data.datasets import find_input_error

        better = explain_config_error(e, config_files, overrides) or find_input_error(e)
        if better is None or better is e:
            raise
        raise better from e


class BundleConfigError(ValueError):
    """A bundle config refers to an id it does not define; ``str()`` names the config file."""


_UNDEFINED_REF = re.compile(r"referring item `@([^`]+)` is not defined")
_DID_YOU_MEAN = re.compile(r"did you mean '([^']+)'")


def explain_config_error(exc: BaseException, config_files, overrides: dict | None = None) -> BundleConfigError | None:
    """Turn MONAI's "referring item `@x` is not defined" into one line naming the config file(s) that
    use ``@x`` and MONAI's "did you mean" suggestion (found on the exception chain); ``None`` for other
    errors."""
    m = _UNDEFINED_REF.search(str(exc))
    if m is None:
        return None
    ref = m.group(1)
    hint = None
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and hint is None:
        seen.add(id(e))
        if (h := _DID_YOU_MEAN.search(str(e))) is not None:
            hint = h.group(1)
        e = e.__cause__ or e.__context__
    use = re.compile(r"@" + re.escape(ref) + r"(?![A-Za-z0-9_#])")
    where = []
    for path in config_files:
        try:
            if use.search(Path(path).read_text(encoding="utf-8")):
                where.append(str(path))
        except OSError:
            continue
    if not where and any(use.search(json.dumps(v)) for v in (overrides or {}).values()):
        where.append("the --set overrides")
    if not where:
        where = [str(p) for p in config_files]
    suggestion = f"; did you mean '@{hint}'?" if hint else ""
    return BundleConfigError(f"{', '.join(where)}: reference '@{ref}' is not defined in the config{suggestion}")


def one_line_errors(debug_env: str = "MEDUNET_DEBUG") -> None:
    """Make bad input end a ``python -m monai.bundle run ...`` process with one line, not a traceback.

    Installs a ``sys.excepthook`` (once; bundle configs call this in ``initialize``): an uncaught
    exception with a :class:`~medunet.io.InputError` on its chain (MONAI wraps what a config expression
    raises in ``RuntimeError("Failed to evaluate ...")``) prints ``ERROR: <path>: <reason>`` on stderr;
    the exit status stays 1. Any other exception, or any exception when the environment variable
    ``debug_env`` is set, shows Python's traceback as usual.
    """
    previous = sys.excepthook
    if getattr(previous, "_medunet_one_line", False):
        return

    def hook(kind, exc, tb):
        from medunet.data.datasets import find_input_error

        found = None if os.environ.get(debug_env) else find_input_error(exc)
        if found is None:
            previous(kind, exc, tb)
            return
        print(f"ERROR: {found}", file=sys.stderr, flush=True)

    hook._medunet_one_line = True
    sys.excepthook = hook
