#!/usr/bin/env python
"""Plan, train, evaluate and report on MSD Hippocampus (or any small-crop MSD dataset) within a time budget.

    python scripts/hippocampus_train.py --data-dir ../shared/data/hippocampus --output-dir runs/hippo

Steps:
1. plan with :func:`medunet.data.planning.plan_dataset` (spacing, normalisation, labels), then apply
   the recipe's network/patch/batch (``--network-options``, ``--patch``, ``--batch``);
2. preprocess every case once (the inference pipeline's ``val_transforms``) and keep it in memory;
   hold out every ``--val-every``-th case (numeric order) for validation;
3. train with :func:`medunet.engines.recipes.train_recipe` (bf16 autocast, Dice+CE with deep
   supervision, AdamW/SGD with poly LR over the time budget), validating every ``--eval-interval`` s;
   with ``--workers N`` in N data-parallel processes that each take batch/N samples per step
   (:mod:`medunet.engines.parallel`; default 1);
4. evaluate the FINAL weights (no checkpoint picking on the validation split) with mirroring TTA:
   per-class Dice and HD95, and write the report (``report/``), the Dice-vs-time curve
   (``curve.png``, ``history.csv``) and ``results.md``;
5. save ``models/model.pt`` (raw state_dict) with ``models/plan.json`` beside it — what
   ``medunet segment --bundle bundles/mri --checkpoint OUTPUT/models/model.pt`` loads.

The last line printed is ``checkpoint=PATH``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads of a
# 2-thread torch process were measured 3x slower than passive ones (set before torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"

#: the recipe's network on top of the planner's layout: deep supervision on the two coarser decoder levels,
#: residual blocks (+0.002 mean Dice over plain blocks, within the split's noise: bundles/mri/docs/README.md)
DEFAULT_NETWORK_OPTIONS = {"deep_supervision": True, "deep_supr_num": 2, "res_block": True}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="MSD-layout dataset folder (read-only)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--time-budget", type=float, default=1680.0,
                   help="training wall seconds incl. periodic eval (default 28 min: the whole command stays under 30)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what --time-budget counts: wall seconds or process CPU seconds (for a shared machine)")
    p.add_argument("--max-iterations", type=int, default=None)
    p.add_argument("--eval-interval", type=float, default=120.0, help="seconds between validation points (0: end only)")
    p.add_argument("--patch", type=int, nargs="+", default=None,
                   help="training patch (default: the median crop rounded up to a network-valid size, 40x56x40)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the planner's)")
    p.add_argument("--network-options", default=None,
                   help="JSON merged into the plan's network options, e.g. '{\"filters\": [16,32,64,128]}'")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=3e-5)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--no-bf16", action="store_true", help="train in float32")
    p.add_argument("--augment", choices=("full", "flips", "none"), default="full")
    p.add_argument("--mirror-axes", type=int, nargs="*", default=[0],
                   help="axes mirrored by the training augmentation, saved in the plan as the axes TTA mirrors "
                        "(default: 0 = left-right, as the crops hold left and right hippocampi)")
    p.add_argument("--val-every", type=int, default=5, help="every n-th case is held out")
    p.add_argument("--cases", type=int, default=None, help="use only the first N cases (smoke tests)")
    p.add_argument("--no-tta", action="store_true", help="final evaluation without mirroring TTA")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per training process (default: the cores divided among --workers)")
    p.add_argument("--workers", default="1",
                   help="data-parallel training processes, each with batch/workers samples per step and "
                        "gradients averaged (gloo, loopback only); 'auto': 2 when there are >= 2 cores and "
                        "the batch is even, else 1. Two 1-thread workers train 1.25x more steps per second "
                        "than one 2-thread process on 2 cores, but on Hippocampus the extra steps did not "
                        "raise Dice (bundles/mri/docs/README.md), so the default stays 1")
    p.add_argument("--device", default="cpu",
                   help="where training and evaluation run: cpu, cuda[:i] or auto (CUDA when available); "
                        "--workers applies to the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate-only", action="store_true",
                   help="re-run the final evaluation and report of the run in --output-dir (no training)")
    return p.parse_args(argv)


def build_plan(args, log):
    from medunet.data.planning import plan_dataset

    plan = plan_dataset(args.data_dir)
    network = dict(plan.network)
    network.update(DEFAULT_NETWORK_OPTIONS)
    if args.network_options:
        network.update(json.loads(args.network_options))
    plan.network = network
    net = plan.build_network()
    # the recipe's patch covers the median crop (the CPU planner shrinks it to bound the cost per step)
    plan.patch_size = [int(v) for v in args.patch] if args.patch else list(plan.median_shape or plan.patch_size)
    if args.batch:
        plan.batch_size = int(args.batch)
    # the axes training mirrors are the axes test-time augmentation (Predictor, `medunet segment --tta`) mirrors
    if args.augment == "none":
        plan.mirror_axes = []
    elif args.mirror_axes is not None:
        plan.mirror_axes = sorted(set(args.mirror_axes))
    plan.patch_size = list(net.valid_input_shape(plan.patch_size, mode="up"))
    log(f"plan: {plan.network} patch={plan.patch_size} batch={plan.batch_size} "
        f"mirror_axes={plan.mirror_axes} spacing={plan.target_spacing} norm={plan.normalization}")
    return plan


def main(argv=None) -> int:
    args = parse_args(argv)
    from medunet.data.cached import cache_cases, every_nth_split
    from medunet.data.datalist import load_datalist
    from medunet.engines.recipes import RecipeConfig, summarize_rows
    from medunet.io import atomic_write_text, save_checkpoint
    from medunet.networks import count_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    if args.evaluate_only:
        return reevaluate(args, out, log, lines)
    t_start, cpu_start = time.perf_counter(), cpu_seconds()
    log(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}")
    plan = build_plan(args, log)

    items = load_datalist(args.data_dir)
    if args.cases:
        items = items[: args.cases]
    train_items, val_items = every_nth_split(items, args.val_every)
    failures: list[str] = []
    on_error = lambda e: (failures.append(str(e)), log(f"skipped: {e}"))  # noqa: E731
    train_cases = cache_cases(train_items, plan, on_error=on_error)
    val_cases = cache_cases(val_items, plan, on_error=on_error)
    if not train_cases or not val_cases:
        raise SystemExit(f"{args.data_dir}: need readable training and validation cases "
                         f"(got {len(train_cases)} / {len(val_cases)})")
    t_prep = time.perf_counter() - t_start
    log(f"cached {len(train_cases)} training + {len(val_cases)} validation cases in {t_prep:.1f}s")

    config = RecipeConfig(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                          warmup_iterations=args.warmup, max_iterations=args.max_iterations,
                          time_budget_s=args.time_budget, clock=args.clock, eval_interval_s=args.eval_interval,
                          bf16=not args.no_bf16, seed=args.seed)
    args.device = resolve_device(args.device)
    workers = resolve_workers(args.workers, plan.batch_size) if args.device == "cpu" else 1
    torch.manual_seed(args.seed)
    network = plan.build_network()
    log(f"network: {plan.network['name']} {count_parameters(network) / 1e6:.2f}M parameters on "
        f"{device_name(args.device)}; "
        f"{workers} training process(es) x {plan.batch_size // workers} sample(s) per step")
    if workers == 1:
        history = train_worker(0, 1, args, plan, config, train_cases, val_cases, network, log)
    else:
        from medunet.engines.parallel import spawn_cpu_workers
        from medunet.io import load_checkpoint

        handoff = out / "models" / "_trained.pt"
        spawn_cpu_workers(_spawned_worker, workers, args=(args, plan, config, train_cases, val_cases, str(handoff)),
                          threads_per_worker=args.threads)
        trained = load_checkpoint(handoff)
        network.load_state_dict(trained["state_dict"])
        history = trained["history"]
        lines.extend(trained["log"])
        handoff.unlink()
    t_train = history[-1]["elapsed_s"]

    # final weights (no selection on the validation split), evaluated the way `medunet segment` predicts
    t_eval0 = time.perf_counter()
    rows = predictor_rows(network, plan, val_items, tta=not args.no_tta, log=log, device=args.device)
    final = summarize_rows(rows)
    t_eval = time.perf_counter() - t_eval0

    models = out / "models"
    ckpt = save_checkpoint({k: v.detach().cpu() for k, v in network.state_dict().items()}, models / "model.pt")
    plan.save(models / "plan.json")
    plan.save(out / "plan.json")

    write_outputs(out, plan, history, rows, final, args, config, {
        "prep_s": t_prep, "train_s": t_train, "eval_s": t_eval,
        "total_s": time.perf_counter() - t_start, "cpu_s": cpu_seconds() - cpu_start,
        "iterations": history[-1]["iteration"], "n_train": len(train_cases), "n_val": len(val_cases),
        "skipped": failures, "load_avg_end": os.getloadavg()[0],
    }, log)
    atomic_write_text(out / "log.txt", "\n".join(lines) + "\n")
    print(f"checkpoint={ckpt}")
    return 0


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the ``--workers`` processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def resolve_device(value: str) -> str:
    """``--device``: 'auto' → 'cuda' when CUDA is available, else 'cpu'; a CUDA device must exist."""
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {value}: CUDA is not available on this machine")
    if value != "cpu" and not value.startswith("cuda"):
        raise SystemExit(f"--device: expected cpu, cuda[:i] or auto, got {value!r}")
    return value


def device_name(device: str) -> str:
    """What a resolved ``--device`` is, for the log and results.json: 'CPU' or the GPU's name."""
    return "CPU" if device == "cpu" else torch.cuda.get_device_name(torch.device(device))


def resolve_workers(value: str, batch_size: int) -> int:
    """``--workers``: 'auto' or a count that divides the batch."""
    from medunet.engines.parallel import default_workers

    if str(value) == "auto":
        return default_workers(batch_size)
    try:
        n = int(value)
    except ValueError:
        raise SystemExit(f"--workers: expected 'auto' or a number, got {value!r}") from None
    if n < 1 or batch_size % n:
        raise SystemExit(f"--workers {n}: must be >= 1 and divide the batch size ({batch_size})")
    return n


def train_worker(rank: int, world_size: int, args, plan, config, train_cases, val_cases, network, log) -> list[dict]:
    """Train ``network`` in place on this rank's share of each batch; returns the history (all ranks)."""
    from medunet.data.cached import AugmentConfig, PatchSampler
    from medunet.engines.recipes import (
        DeepSupervisionDiceCE,
        evaluate_cases_sharded,
        summarize_rows,
        train_recipe,
    )

    augment = {"full": AugmentConfig(), "flips": AugmentConfig.none(), "none": AugmentConfig.none()}[args.augment]
    augment.mirror_axes = tuple(plan.mirror_axes) if plan.mirror_axes is not None else tuple(range(plan.spatial_dims))
    # every rank draws its own patches: seeds differ per rank (rank 0 keeps the single-process seed)
    sampler = PatchSampler(train_cases, plan.patch_size, plan.batch_size // world_size, augment=augment,
                           seed=args.seed + 100_003 * rank)
    n_classes, names = plan.out_channels, plan.label_names

    def periodic_eval(net) -> dict:
        summary = summarize_rows(evaluate_cases_sharded(net, val_cases, n_classes, bf16=config.bf16))
        return {"dice": summary["mean_dice"],
                **{f"dice_{names[c]}": m["dice"] for c, m in summary["classes"].items()}}

    return train_recipe(network, sampler, DeepSupervisionDiceCE(), config, evaluate=periodic_eval,
                        log=log if rank == 0 else None, device=args.device)


def _spawned_worker(rank: int, world_size: int, args, plan, config, train_cases, val_cases, handoff: str) -> None:
    """One process of ``--workers N``: trains, and rank 0 hands weights, history and log to the parent."""
    from medunet.io import save_checkpoint

    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    torch.manual_seed(args.seed)
    network = plan.build_network()
    history = train_worker(rank, world_size, args, plan, config, train_cases, val_cases, network, log)
    if rank == 0:
        save_checkpoint({"state_dict": network.state_dict(), "history": history, "log": lines}, handoff)


def reevaluate(args, out: Path, log, lines) -> int:
    """Final evaluation + report again for a finished run (same weights, plan, history and timings)."""
    from medunet.data.cached import every_nth_split
    from medunet.data.datalist import load_datalist
    from medunet.data.plan import Plan
    from medunet.engines.recipes import RecipeConfig, summarize_rows
    from medunet.io import atomic_write_text, load_weights

    previous = json.loads((out / "results.json").read_text())
    ckpt = out / "models" / "model.pt"
    plan = Plan.load(out / "models" / "plan.json")
    network = plan.build_network()
    load_weights(network, ckpt)
    items = load_datalist(args.data_dir)
    if args.cases:
        items = items[: args.cases]
    _, val_items = every_nth_split(items, args.val_every)
    args.device = resolve_device(args.device)
    t0 = time.perf_counter()
    rows = predictor_rows(network, plan, val_items, tta=not args.no_tta, log=log, device=args.device)
    for stale in (out / "report" / "overlays").glob("*.png"):
        stale.unlink()
    timing = dict(previous["timing"])
    timing["eval_s"] = time.perf_counter() - t0
    timing["total_s"] = timing["prep_s"] + timing["train_s"] + timing["eval_s"]
    args.augment = previous.get("augment", args.augment)
    config = RecipeConfig(**previous["recipe"])
    write_outputs(out, plan, previous["history"], rows, summarize_rows(rows), args, config, timing, log)
    atomic_write_text(out / "log_evaluate.txt", "\n".join(lines) + "\n")
    print(f"checkpoint={ckpt}")
    return 0


def predictor_rows(network, plan, items, tta: bool, log, device: str = "cpu") -> list[dict]:
    """Predict each validation file with :class:`medunet.inference.Predictor` (what ``medunet segment``
    runs: training-identical preprocessing, sliding window over ``plan.patch_size``, exact inverse
    geometry) and score Dice/HD95 per class against the label file, in the file's own grid."""
    from medunet.inference import Predictor
    from medunet.io import image_id, read_image
    from medunet.metrics.segmentation import case_metrics

    network.eval()
    predictor = Predictor(network, plan, device=device, tta=tta)
    rows = []
    for item in items:
        try:
            pred = predictor.predict_file(item["image"])
            label = read_image(item["label"])
        except Exception as e:  # noqa: BLE001 - report and go on with the next case
            log(f"evaluation skipped {item['image']}: {e}")
            continue
        per_class = case_metrics(pred.label, np.rint(label.array).astype(np.int64), plan.out_channels,
                                 spacing=label.spacing, metrics=("dice", "hd95"))
        dices = [v["dice"] for v in per_class.values() if math.isfinite(v["dice"])]
        rows.append({"case": image_id(item["image"]), "metrics": per_class,
                     "mean_dice": float(np.mean(dices)) if dices else math.nan,
                     "image": pred.image.array, "label": label.array, "pred": pred.label})
    return rows


def write_outputs(out, plan, history, rows, final, args, config, timing, log) -> None:
    """history.csv/json, curve.png, report/ (metrics.csv, summary.json, overlays), results.md/json."""
    from medunet.io import atomic_write_bytes, atomic_write_text
    from medunet.metrics.report import representative_slice, write_report

    names = plan.label_names
    fg = [c for c in sorted(names) if c != 0]
    # report rows in the metrics package's format
    report_rows, slices = [], {}
    for row in rows:
        r = {"case": row["case"], "mean_dice": row["mean_dice"]}
        for c, m in row["metrics"].items():
            for k, v in m.items():
                r[f"{k}_{names[c]}"] = v
        report_rows.append(r)
        img, lab, prd = (np.asarray(row[k]) for k in ("image", "label", "pred"))
        z = representative_slice(lab, prd)
        slices[row["case"]] = (img[..., z], lab[..., z], prd[..., z], z)
    summary = write_report(report_rows, names, out / "report", slices=slices, n_overlays=2)

    keys = ["iteration", "elapsed_s", "train_s", "cpu_s", "loss", "lr", "dice"] + [f"dice_{names[c]}" for c in fg]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for h in history:
        writer.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in h.items()})
    atomic_write_text(out / "history.csv", buf.getvalue())
    atomic_write_bytes(out / "curve.png", curve_png(history, [f"dice_{names[c]}" for c in fg], final))

    results = {
        "final": {"mean_dice": final["mean_dice"],
                  **{names[c]: final["classes"][c] for c in fg}},
        "timing": timing, "plan_network": plan.network, "patch_size": plan.patch_size,
        "batch_size": plan.batch_size, "recipe": config.to_dict(), "tta": not args.no_tta,
        "augment": args.augment, "data_dir": str(args.data_dir), "history": history,
        "command": " ".join([sys.executable, *sys.argv]),
        "host": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}",
        "device": device_name(args.device),
        "report": summary.get("files", []),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float) + "\n")
    table = results_table(final, names, timing)
    atomic_write_text(out / "results.md", table)
    log(table.rstrip())


def results_table(final: dict, names: dict, timing: dict) -> str:
    fg = [c for c in sorted(names) if c != 0]
    head = "| class | Dice | HD95 (mm) |\n|---|---|---|\n"
    body = "".join(f"| {names[c]} | {final['classes'][c]['dice']:.4f} | {final['classes'][c]['hd95']:.2f} |\n"
                   for c in fg)
    hd = [final["classes"][c]["hd95"] for c in fg]
    body += f"| **mean** | **{final['mean_dice']:.4f}** | {np.nanmean(hd):.2f} |\n"
    foot = (f"\n{timing['n_train']} training / {timing['n_val']} validation cases; "
            f"{timing['iterations']} iterations; training {timing['train_s'] / 60:.1f} min wall, "
            f"whole command {timing['total_s'] / 60:.1f} min wall, {timing['cpu_s'] / 60:.1f} min CPU.\n")
    return head + body + foot


def curve_png(history: list[dict], class_keys: list[str], final: dict) -> bytes:
    """Validation Dice (mean and per class) against training wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    minutes = [h["elapsed_s"] / 60 for h in history]
    ax.plot(minutes, [h.get("dice", math.nan) for h in history], "o-", label="mean Dice (no TTA)")
    for key in class_keys:
        ax.plot(minutes, [h.get(key, math.nan) for h in history], ".--", label=key.replace("dice_", ""))
    if minutes:
        ax.plot([minutes[-1]], [final["mean_dice"]], "k*", markersize=12, label=f"final + TTA {final['mean_dice']:.3f}")
    ax.axhline(0.89, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training wall time (min)")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(max(0.0, min([h.get("dice", 1.0) for h in history if math.isfinite(h.get("dice", math.nan))] + [0.8]) - 0.05), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
