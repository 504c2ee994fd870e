"""Inference speed: medunet's Predictor against MONAI's sliding_window_inference, on CPU, one process.

A CT phantom (~256×256×160 voxels after resampling) is segmented by the ``bundles/ct`` network with
weights trained on CT phantoms (trained here by the ``bundles/ct`` bundle itself — 64×64×32 patches, a
third of them centred on an organ — for ``--train-seconds`` = 28 min on ``--train-cases`` = 32 phantoms by default, when
``--workdir`` holds no checkpoint for this plan yet; ``--retrain`` forces it):

* baseline: MONAI's ``SlidingWindowInferer`` at the model-zoo settings (roi 96³, overlap 0.5,
  gaussian, sw_batch_size 4);
* medunet: :class:`medunet.inference.Predictor` in several configurations: first MONAI's own tiling
  (``placement="monai"`` at MONAI's settings, float32), whose probabilities must equal the baseline's to
  max |dP| <= 1e-4 (the exactness row); our default windows at float32 and at bfloat16 (tiling and
  precision apart); the ONNX Runtime and OpenVINO backends when their packages are installed; the
  channels_last and body-crop variants; and the defaults, last.

Both go through the same preprocessing (training's reorientation/resampling/normalisation) and the same
way back to the input grid, so only the windowing differs. For each it prints wall time, set-up time
(weights; an engine's conversion), peak RSS increase, label agreement with the baseline (Dice over
classes), the largest probability difference from it, Dice against the ground truth, and the network's
achieved GFLOP/s against a conv3d roofline measured here. The last line is
``speedup_vs_monai=X.XX agreement_dice=Y.YYY monai_self_agreement=Z.ZZZ`` for the default Predictor
configuration (Z: the mean over the shifted-grid rows).

Usage: ``.venv/bin/python scripts/bench_inference.py [--workdir DIR] [--train-seconds 1680] [--retrain]
[--continue-training] [--train-only] [--quick] [--reference-shifts 24 13] [--rss-volume 512 512 300]
[--image CT --label GT --checkpoint MODEL [--calibration-dir DIR]]`` (``--quick``: the rows above but the
fixed-window float32 ones, one shifted grid). The bundle run is cached in ``--workdir/bundle_run_<train cases>`` and
reused while its ``models/plan.json`` fits the bench's plan. ``--image/--label/--checkpoint``: the same
rows on another CT (a real patient) with weights trained there, e.g. a ``bundles/ct`` run on
``sarcoma_ct``.

Memory row (first, in its own processes): ``medunet segment --bundle bundles/ct`` on a stored int16 CT
phantom of ``--rss-volume`` voxels, its peak RSS (and that of the same command on a 32×32×16 volume: the
fixed cost of Python, torch and the model) against 2 × (input as float32 + uint8 label + model).

Reference rows: the baseline is also run with its window grid shifted (``--reference-shifts``), and its
agreement with itself is printed (``monai_self_agreement``). Any tiling other than the baseline's own
moves the window borders the same way, so this is the agreement that a different tiling can be
expected to reach with a given network: it is close to 1 only for a network whose labels do not
depend on where the window borders fall.
Timings on a shared machine vary with the load: the ratio (same process, back to back) is what counts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from medunet.data import Plan
from medunet.data.phantoms import generate_case
from medunet.engines import trained_seconds
from medunet.engines.phantom_bench import phantom_dir, run_dir, train_bench_network, trained_run
from medunet.inference import PlanGrid, Predictor
from medunet.inference.benchmark import (
    PeakRSS,
    ShiftedGridInferer,
    child_peak_rss,
    conv3d_roofline,
    empty_model_cache,
    forward_flops,
)
from medunet.inference.bundle import resolve_plan
from medunet.inference.predictor import cpu_has_native_bf16
from medunet.io import ImageData, read_image, write_nifti
from medunet.metrics import label_agreement as dice
from medunet.metrics import voxel_agreement as micro_dice

REPO = Path(__file__).resolve().parents[1]
BUNDLE_PLAN = REPO / "bundles" / "ct" / "configs" / "plan.json"
PHANTOM_SHAPE = (256, 256, 64)  # stored grid; resampled to ~256×256×160
RESAMPLED_Z = 160
BENCH_CASE = 1000  # phantom index of the benchmark volume (training uses 0…n-1)


# --------------------------------------------------------------------------------------------------
def bench_plan(spacing) -> Plan:
    """The bundle's plan (network, labels, normalisation) with a spacing giving ~256×256×160 voxels."""
    plan = Plan.load(BUNDLE_PLAN)
    data = plan.to_dict()
    data["target_spacing"] = [float(spacing[0]), float(spacing[1]),
                              float(spacing[2]) * PHANTOM_SHAPE[2] / RESAMPLED_Z]
    # training patch: 64×64×32 voxels (about 48 mm a side on this grid), enough context to tell kidney
    # from spleen in a CPU training budget; inference windows keep its 2:2:1 proportions at any size
    data["patch_size"] = [64, 64, 32]
    return Plan.from_dict(data)


def phantom_case(args, workdir: Path, log) -> tuple[Path, ImageData, np.ndarray, Plan]:
    """The benchmark phantom, and weights trained for its plan (cached in ``workdir``; trained when
    missing): ``(checkpoint, image, ground truth, plan)``."""
    case = generate_case("ct", BENCH_CASE, seed=0, size=PHANTOM_SHAPE)
    plan = bench_plan(case.info["spacing"])
    cached = None if args.retrain else trained_run(workdir, plan, args.train_cases)
    run = run_dir(workdir, args.train_cases)
    if cached is not None and args.continue_training:
        log(f"continuing the training of {cached} ({trained_seconds(run / 'eval'):.0f} s so far) for "
            f"{args.train_seconds:.0f}s")
        ckpt = train_bench_network(REPO / "bundles" / "ct", plan, workdir, args.train_seconds, args.train_cases,
                                   PHANTOM_SHAPE, log, resume=True)
    elif cached is not None:
        ckpt = cached
        log(f"using trained weights {ckpt} ({trained_seconds(run / 'eval'):.0f} s of training)")
    else:
        log(f"no trained run for this plan in {workdir}: training the bundles/ct network for "
            f"{args.train_seconds:.0f}s")
        ckpt = train_bench_network(REPO / "bundles" / "ct", plan, workdir, args.train_seconds, args.train_cases,
                                   PHANTOM_SHAPE, log)
    path = workdir / "bench_ct.nii.gz"
    write_nifti(case.image, case.affine, path, dtype=np.int16)
    image = ImageData(array=np.asarray(case.image, dtype=np.float32), affine=np.asarray(case.affine), path=str(path))
    log(f"benchmark volume: phantom {BENCH_CASE}, {case.info['axcodes']}{', oblique' if case.info['oblique'] else ''}")
    return ckpt, image, np.asarray(case.label), resolve_plan(None, ckpt)


def memory_row(shape: tuple[int, ...], workdir: Path, checkpoint: Path, log) -> None:
    """Peak RSS of ``medunet segment`` (its own process, the user's command) on a stored CT phantom of
    ``shape`` with the shipped bundles/ct plan, against 2 × (input + output + model). The same command
    on a 32×32×16 volume gives the fixed cost (Python, torch, the model), printed beside it."""
    from medunet.inference.bundle import resolve_plan as plan_of

    bundle = REPO / "bundles" / "ct"
    weights = ["--checkpoint", str(checkpoint)] if checkpoint.is_file() else []
    plan = plan_of(bundle, checkpoint if checkpoint.is_file() else None)
    model_mib = sum(p.numel() * p.element_size() for p in plan.build_network().parameters()) / 2**20
    paths = {}
    for name, size in (("tiny", (32, 32, 16)), ("large", shape)):
        paths[name] = workdir / f"memory_{'x'.join(map(str, size))}.nii.gz"
        if not paths[name].exists():
            case = generate_case("ct", BENCH_CASE + 1, seed=0, size=size)
            write_nifti(case.image, case.affine, paths[name], dtype=np.int16)
    peaks = {}
    for name, path in paths.items():
        out = workdir / f"memory_out_{name}"
        command = [sys.executable, "-m", "medunet.cli", "segment", "-i", str(path), "-o", str(out), "--bundle",
                   str(bundle), *weights, "--overwrite", "--no-progress"]
        peaks[name] = child_peak_rss(command)
    voxels = int(np.prod(shape))
    stored_mib, float_mib, out_mib = voxels * 2 / 2**20, voxels * 4 / 2**20, voxels / 2**20
    bound = 2 * (float_mib + out_mib + model_mib)
    increase = peaks["large"][0] - peaks["tiny"][0]
    log(f"memory: `medunet segment --bundle bundles/ct` on a stored {'x'.join(map(str, shape))} int16 CT "
        f"({stored_mib:.0f} MiB stored, {float_mib:.0f} MiB as float32; label {out_mib:.0f} MiB; model "
        f"{model_mib:.1f} MiB; weights {'given' if weights else 'untrained: same memory'})")
    log(f"memory: peak RSS {peaks['large'][0]:.0f} MiB in {peaks['large'][1]:.1f} s; on 32x32x16 "
        f"{peaks['tiny'][0]:.0f} MiB (Python, torch, model); increase {increase:.0f} MiB vs 2 x (input float32 + "
        f"output + model) = {bound:.0f} MiB -> {'within' if increase <= bound else 'OVER'} "
        f"(whole process {'within' if peaks['large'][0] <= bound else 'over'} it)")


# --------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/medunet/bench_inference"))
    ap.add_argument("--train-seconds", type=float, default=1680.0,
                    help="training time budget when no trained checkpoint is cached (default 28 min)")
    ap.add_argument("--train-cases", type=int, default=32,
                    help="training phantoms (default 32; one more is the bundle's validation case)")
    ap.add_argument("--retrain", action="store_true", help="train again even when a checkpoint is cached")
    ap.add_argument("--continue-training", action="store_true",
                    help="train the cached weights for another --train-seconds (a fresh warm-up + poly cycle)")
    ap.add_argument("--train-only", action="store_true", help="train (if needed), then stop")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--quick", action="store_true", help="skip the fixed-window float32 rows; one shifted-grid reference")
    ap.add_argument("--reference-shifts", type=int, nargs="*", default=None,
                    help="also run the baseline with its window grid shifted by these voxel counts and report its "
                         "agreement with itself (default: 24 13; with --quick: 24; the flag with no value: skip)")
    ap.add_argument("--image", help="bench on this CT (e.g. a real patient) instead of the phantom; needs "
                                    "--label (its ground truth) and --checkpoint (weights with plan.json beside)")
    ap.add_argument("--label", help="ground-truth label of --image")
    ap.add_argument("--checkpoint", help="weights for --image (no training then)")
    ap.add_argument("--calibration-dir", help="int8 calibration images (default: the bench's training phantoms)")
    ap.add_argument("--rss-volume", type=int, nargs="*", default=[512, 512, 300],
                    help="memory row: `medunet segment` on a stored CT phantom of this shape (default 512 512 "
                         "300; the flag with no value: skip)")
    ap.add_argument("--rss-checkpoint", default=str(REPO / "demo_output" / "ct" / "models" / "model.pt"),
                    help="weights for the memory row (default: `make demo`'s bundles/ct weights; missing: the "
                         "untrained bundles/ct network, which uses the same memory)")
    ap.add_argument("--roi-first-checkpoint", default=str(REPO / "demo_output" / "ct" / "models" / "model.pt"),
                    help="low-resolution model of the ROI-first row (default: `make demo`'s bundles/ct weights, "
                         "3 mm; missing or empty: no such row)")
    ap.add_argument("--only", nargs="+", metavar="TEXT",
                    help="run only the rows whose name contains one of these (besides the MONAI baseline)")
    args = ap.parse_args()
    if bool(args.image) != bool(args.label) or bool(args.image) != bool(args.checkpoint):
        ap.error("--image, --label and --checkpoint go together")
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"load: {os.getloadavg()} | cores {os.cpu_count()} | torch threads {torch.get_num_threads()} | "
        f"torch {torch.__version__}")
    if args.rss_volume:
        memory_row(tuple(args.rss_volume), workdir, Path(args.rss_checkpoint), log)
    if args.image:
        ckpt = Path(args.checkpoint)
        image_data = read_image(args.image)
        truth = np.asarray(read_image(args.label).array).astype(np.int64)
        plan = resolve_plan(None, ckpt)
        log(f"benchmark volume: {args.image} with weights {ckpt}")
    else:
        ckpt, image_data, truth, plan = phantom_case(args, workdir, log)
    if args.train_only:
        return
    calibration_dir = Path(args.calibration_dir) if args.calibration_dir else phantom_dir(workdir, args.train_cases) / "imagesTr"
    classes = range(1, plan.out_channels)
    names = [plan.label_names.get(c, str(c)) for c in classes]

    def make(**kw) -> Predictor:
        kw.setdefault("backend", "torch")  # rows name their engine; the defaults row asks for "auto"
        if kw.get("roi_first") == "first":  # the cheap first pass: its own Predictor, built in the setup time
            kw["roi_first"] = Predictor.from_bundle(None, args.roi_first_checkpoint, device="cpu")
        return Predictor.from_bundle(None, ckpt, device="cpu", **kw)

    def monai_baseline(shift: int = 0) -> Predictor:
        predictor = make(cpu_bf16=False)
        inferer = SlidingWindowInferer(roi_size=(96, 96, 96), sw_batch_size=4, overlap=0.5, mode="gaussian")
        predictor.inferer = ShiftedGridInferer(inferer, shift) if shift else inferer
        return predictor

    fp32 = {"cpu_bf16": False}
    native = cpu_has_native_bf16()
    default_name = (f"medunet segment defaults (auto window, backend auto: "
                    f"{'openvino' if importlib.util.find_spec('openvino') else 'torch'}, "
                    f"{'bfloat16' if native else 'float32: no native bf16'})")
    configs = {f"{default_name[:-1]}, first use of the weights: conversion included)": {"backend": "auto", "cold": True},
               default_name: {"backend": "auto"}}
    exact = {"MONAI-exact tiling (placement=monai, 96^3, 0.5, fp32, sw4)":
             {"roi_size": (96, 96, 96), "overlap": 0.5, "sw_batch_size": 4, "placement": "monai", **fp32}}
    precision = {"torch at float32 (auto window)": fp32}
    if native:
        precision["torch at bfloat16 (auto window)"] = {"cpu_bf16": True}
    backends = {}
    for backend, packages in (("onnxruntime", ("onnxruntime", "onnxscript")), ("openvino", ("openvino",))):
        missing = [m for m in packages if importlib.util.find_spec(m) is None]
        if missing:
            log(f"backend {backend}: skipped ({', '.join(missing)} not installed)")
            continue
        backends[f"defaults, {backend}, float32"] = {"backend": backend, **fp32}
        if backend == "openvino" and native:
            backends["defaults, openvino, bfloat16"] = {"backend": backend, "cpu_bf16": True}
    backends["defaults, torch.compile (inductor; setup: one warm-up prediction)"] = {"backend": "torch-compile"}
    int8_name = None
    if "defaults, openvino, float32" in backends and importlib.util.find_spec("nncf") is None:
        log("int8: skipped (nncf not installed)")
    elif "defaults, openvino, float32" in backends and not calibration_dir.is_dir():
        log(f"int8: skipped (no calibration images: {calibration_dir}; give --calibration-dir)")
    elif "defaults, openvino, float32" in backends:
        int8_name = f"defaults, openvino int8 (NNCF, {'bf16' if native else 'fp32'} rest)"
        backends[int8_name] = {"backend": "openvino", "cpu_bf16": native}
    extras = {"defaults + channels_last_3d": {"channels_last": True},
              "defaults + body crop (HU > -500, 4x grid, +16 vox)": {"body_crop": True}}
    roi_ckpt = Path(args.roi_first_checkpoint) if args.roi_first_checkpoint else None
    if roi_ckpt is not None and roi_ckpt.is_file():
        first_plan = resolve_plan(None, roi_ckpt)
        if first_plan.out_channels == plan.out_channels:
            mm = "x".join(f"{v:g}" for v in first_plan.target_spacing)
            extras[f"defaults (backend auto) + ROI-first ({mm} mm model's box, +10 mm)"] = {
                "backend": "auto", "roi_first": "first"}
        else:
            log(f"ROI-first: skipped ({roi_ckpt} predicts {first_plan.out_channels} classes, the bench model "
                f"{plan.out_channels})")
    elif roi_ckpt is not None:
        log(f"ROI-first: skipped (no low-resolution model {roi_ckpt}; `make demo` trains one)")
    if args.quick:
        configs = {**exact, **precision, **backends, **extras, **configs}
    else:
        configs = {
            **exact,
            "roi=96^3, overlap 0.25, float32": {"roi_size": (96, 96, 96), "overlap": 0.25, **fp32},
            "roi=128x128x64, overlap 0.25, float32": {"roi_size": (128, 128, 64), "overlap": 0.25, **fp32},
            "whole volume, one pass, float32": {"roi_size": (512, 512, 512), **fp32},
            "roi=128x128x64, float32, channels_last": {"roi_size": (128, 128, 64), "channels_last": True, **fp32},
            **precision,
            **backends,
            **extras,
            **configs,
        }
    if args.only:
        configs = {k: v for k, v in configs.items() if any(o.lower() in k.lower() for o in args.only)}
    grid = PlanGrid.for_image(image_data.affine, truth.shape, plan.orientation, plan.target_spacing)
    spacing = tuple(round(float(v), 3) for v in np.linalg.norm(np.asarray(image_data.affine)[:3, :3], axis=0))
    log(f"benchmark volume: stored {truth.shape} at {spacing} mm -> plan grid {grid.plan_shape} at "
        f"{tuple(round(float(v), 3) for v in plan.target_spacing)} mm")
    roof32, roof16 = conv3d_roofline(), conv3d_roofline(torch.bfloat16)
    log(f"conv3d roofline (32->32 ch, 3^3, 64^3): float32 {roof32:.1f} GFLOP/s, bfloat16 {roof16:.1f} GFLOP/s")

    def run(name: str, factory, reference: dict | None = None) -> dict:
        """Build a Predictor (``setup_s``: weights, and an engine's conversion) and predict the volume;
        the peak RSS increase covers both."""
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            predictor = factory()
            setup = time.perf_counter() - t0
            pred = predictor.predict_image(image_data)
        stats = pred.stats
        inner, shift = getattr(predictor.inferer, "inner", predictor.inferer), getattr(predictor.inferer, "shift", 0)
        if isinstance(inner, SlidingWindowInferer):
            shape = [s + shift for s in grid.plan_shape]
            n = int(np.prod([max(1, int(np.ceil((s - 96) / 48)) + 1) for s in shape]))
            flops = forward_flops(predictor.network, (96, 96, 96)) * n
        else:
            flops = forward_flops(predictor.network, stats["tile_in"]) * stats["computed"]
            n = stats["windows"]
        net_s = stats["network_s"]
        log(f"    voxels per class {[int((pred.label == c).sum()) for c in classes]}, ground truth "
            f"{[int((truth == c).sum()) for c in classes]}")
        row = {"name": name, "seconds": pred.seconds, "network_s": net_s, "setup_s": setup, "rss_mib": rss.increase,
               "rss_peak_mib": rss.peak, "windows": n, "gflops": flops / 1e9, "label": pred.label,
               "probabilities": pred.probabilities, "gt_dice": dice(pred.label, truth, classes),
               "gt_dice_per_class": [dice(pred.label, truth, [c]) for c in classes]}
        if reference is not None:
            row["agreement"] = dice(pred.label, reference["label"], classes)
            row["agreement_voxels"] = micro_dice(pred.label, reference["label"])
            row["max_dp"] = float(np.abs(pred.probabilities - reference["probabilities"]).max())
            per_class = [dice(pred.label, reference["label"], [c]) for c in classes]
            counts = [int((pred.label == c).sum()) for c in classes]
            log(f"    agreement per class {[round(v, 3) for v in per_class]} (voxels {counts}), "
                f"voxel-weighted {row['agreement_voxels']:.4f}, max |dP| vs MONAI {row['max_dp']:.2e}")
        log(f"  {name:<48} {pred.seconds:7.2f}s (pre {stats['preprocess_s']:.1f}s, windows {net_s:.1f}s, back "
            f"{stats['restore_s']:.1f}s; setup {setup:.1f}s)  +{rss.increase:5.0f} MiB (peak {rss.peak:.0f})  "
            f"{n:3d} windows  {flops / 1e9 / net_s:5.1f} GFLOP/s  GT Dice {row['gt_dice']:.4f}"
            + (f"  agreement {row['agreement']:.4f}" if reference is not None else ""))
        del predictor
        return row

    log("running (wall time, setup, peak RSS increase over setup + prediction, windows, achieved GFLOP/s, "
        "Dice vs ground truth):")
    base = run("MONAI sliding_window_inference (96^3, 0.5, sw4)", monai_baseline)
    shifts = args.reference_shifts if args.reference_shifts is not None else ([24] if args.quick else [24, 13])
    references = [run(f"MONAI baseline, window grid shifted {shift} vox",
                      lambda shift=shift: monai_baseline(shift), base) for shift in shifts]
    rows = []
    def int8_predictor(**kw) -> Predictor:
        """Quantise (NNCF) with windows of the training phantoms, then load the int8 file."""
        from medunet.inference.export import calibration_from_images, export_model

        fp = make(cpu_bf16=False)
        images = sorted(calibration_dir.glob("*.nii.gz"))[:4]
        result = export_model(fp.network, "openvino", workdir / "model_int8.xml", plan.patch_size, plan.in_channels,
                              tolerance=1.0, calibration=calibration_from_images(fp, images))
        log(f"    int8: calibrated on {len(images)} images of {calibration_dir}; label change on calibration windows "
            f"{result['label_change']:.3%}, max |logit difference| {result['max_abs_diff']:.3g}")
        return make(model_file=result["files"][-1], **kw)

    def warmed(**kw) -> Predictor:
        """A Predictor whose compiled code exists: one prediction of the volume first (counted as setup)."""
        predictor = make(**kw)
        predictor.predict_image(image_data, probabilities=False)
        return predictor

    for name, kw in configs.items():
        kw = dict(kw)
        cold = kw.pop("cold", False)
        factory = (lambda kw=kw: int8_predictor(**kw)) if name == int8_name else (lambda kw=kw: make(**kw))
        if kw.get("backend") == "torch-compile":
            factory = lambda kw=kw: warmed(**kw)  # noqa: E731
        with empty_model_cache() if cold else contextlib.nullcontext():
            row = run(name, factory, base)
        row["speedup"] = base["seconds"] / row["seconds"]
        rows.append(row)
    log("")
    log(f"{'configuration':<60} {'total s':>7} {'speedup':>7} {'windows s':>9} {'speedup':>7} {'setup s':>7} "
        f"{'+RSS MiB':>8} {'agree':>6} {'GT Dice':>7} {'dDice':>7} {'max|dP|':>8}")

    def line(r: dict, speedup: str, net_speedup: str) -> str:
        return (f"{r['name']:<60} {r['seconds']:7.2f} {speedup:>7} {r['network_s']:9.2f} {net_speedup:>7} "
                f"{r['setup_s']:7.1f} {r['rss_mib']:8.0f} {r.get('agreement', 1.0):6.3f} {r['gt_dice']:7.4f} "
                f"{r['gt_dice'] - base['gt_dice']:+7.4f} {r.get('max_dp', 0.0):8.1e}")

    log(line(base, "1.00", "1.00"))
    for r in rows:
        log(line(r, f"{r['speedup']:.2f}", f"{base['network_s'] / r['network_s']:.2f}"))
    for r in references:
        log(line(r, "-", "-"))
    log("(speedup: end to end, same preprocessing and way back for both, setup not counted; windows: the network")
    log(" part only; +RSS: peak resident memory increase over setup and prediction, each row after the previous")
    log(" ones, so rows that reuse freed memory read low; max|dP|: largest probability difference from MONAI;")
    log(" the shifted-grid rows are the baseline against itself: the agreement a different tiling can expect)")
    final = rows[-1]
    self_agreement = float(np.mean([r["agreement"] for r in references])) if references else float("nan")
    exact_row = next((r for r in rows if r["name"].startswith("MONAI-exact")), None)
    summary = {k: v for k, v in final.items() if k not in ("label", "probabilities")}
    (workdir / "last_result.json").write_text(json.dumps(
        {"baseline_s": base["seconds"], "baseline_gt_dice": base["gt_dice"], **summary,
         "monai_exact_max_abs_diff": exact_row["max_dp"] if exact_row else None,
         "rows": [{k: v for k, v in r.items() if k not in ("label", "probabilities")} for r in rows + references],
         "monai_self_agreement": {r["name"]: r["agreement"] for r in references}, "load": os.getloadavg()},
        indent=2, default=float))
    log(f"load after: {os.getloadavg()}")
    for r in rows[:-1]:
        log(f"{r['name']}: speedup_vs_monai={r['speedup']:.2f} agreement_dice={r['agreement']:.3f} "
            f"gt_dice_delta={r['gt_dice'] - base['gt_dice']:+.4f} max_abs_dp={r['max_dp']:.2e}")
    for r in references:
        log(f"{r['name']}: monai_self_agreement={r['agreement']:.3f} gt_dice_delta={r['gt_dice'] - base['gt_dice']:+.4f}")
    if exact_row is not None:
        log(f"exactness: {exact_row['name']}: max |dP| vs MONAI = {exact_row['max_dp']:.2e} "
            f"({'within' if exact_row['max_dp'] <= 1e-4 else 'OVER'} 1e-4)")
    log(f"defaults: gt_dice_delta={final['gt_dice'] - base['gt_dice']:+.4f} (baseline GT Dice {base['gt_dice']:.4f})")
    for r in (base, final):
        per_class = ", ".join(f"{n} {v:.4f}" for n, v in zip(names, r["gt_dice_per_class"]))
        log(f"GT Dice per class, {r['name']}: {per_class} (lowest {min(r['gt_dice_per_class']):.4f})")
    print(f"speedup_vs_monai={final['speedup']:.2f} agreement_dice={final['agreement']:.3f} "
          f"monai_self_agreement={self_agreement:.3f}")


if __name__ == "__main__":
    main()
