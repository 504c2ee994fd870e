"""The ``medunet`` command line. Thin: parse arguments, call the package, print.

Exit status: 0 success, 1 failure, 2 usage error, 3 partial success (some files of a batch failed).
Errors are one line naming the file and the problem; ``--debug`` shows the traceback.

Each subcommand is a pair of functions below, ``_add_<name>(subparsers)`` which declares its
arguments and ``_run_<name>(args) -> int``; the package does the work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(adder: Callable[[argparse._SubParsersAction], None]):
    """Register a subcommand's argument declaration (in the order the help lists them)."""
    _COMMANDS.append(adder)
    return adder


def batch_exit_code(n_ok: int, n_failed: int) -> int:
    """0 when all succeeded, 3 when some failed, 1 when all failed (or there was nothing to do)."""
    if n_failed == 0 and n_ok > 0:
        return EXIT_OK
    return EXIT_PARTIAL if n_ok > 0 else EXIT_FAILURE


# --------------------------------------------------------------------------------------------------
# medunet networks
@command
def _add_networks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("networks", help="list registered networks, their dimensions and parameter counts")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=2)
    p.set_defaults(func=_run_networks)


def _run_networks(args: argparse.Namespace) -> int:
    from medunet import networks

    print(f"{'name':<14} {'dims':<6} {'params (2D)':>14} {'params (3D)':>14}  description")
    for name, spec in networks.available().items():
        counts = {}
        for d in (2, 3):
            if d in spec.spatial_dims:
                net = networks.create(name, spatial_dims=d, in_channels=args.in_channels,
                                      out_channels=args.out_channels)
                counts[d] = f"{networks.count_parameters(net):,}"
            else:
                counts[d] = "-"
        dims = ",".join(f"{d}D" for d in sorted(spec.spatial_dims))
        print(f"{name:<14} {dims:<6} {counts[2]:>14} {counts[3]:>14}  {spec.description}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# medunet segment
@command
def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment", help="segment NIfTI files, folders of them, DICOM series or (2D models) PNG/TIFF images",
        description="Predict label maps in each input's exact geometry (shape, affine, sform/qform). "
                    "Writes OUT/<id>_seg.nii.gz (.png for PNG/TIFF inputs); files found in a sub-folder of an "
                    "input folder (patients/p01/image.nii.gz) go to the same sub-folder of OUT "
                    "(OUT/p01/image_seg.nii.gz). Exit status 0 all ok, 3 some failed, 1 all failed.",
    )
    p.add_argument("-i", "--input", required=True, nargs="+", metavar="IN",
                   help="NIfTI file, folder of NIfTI/PNG/TIFF files, folder of patient folders (of such files "
                        "or DICOM series), or a DICOM series folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--bundle", help="bundle folder (plan.json, models/model.pt)")
    p.add_argument("--checkpoint", help="weights file (default: <bundle>/models/model.pt)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (2^dims passes)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write <id>_probabilities.nii.gz (for PNG/TIFF inputs <id>_probabilities.tiff: "
                        "float32, one page per class)")
    p.add_argument("--uncertainty", nargs="?", const="auto", choices=["auto", "entropy", "variance"],
                   help="also write <id>_uncertainty.nii.gz in [0, 1] (.tiff for PNG/TIFF inputs; entropy; "
                        "variance of TTA copies with --tta)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the largest connected component of every class (--no-largest-component: "
                        "of none; default: of the classes the plan lists, i.e. one object in every training label)")
    p.add_argument("--overlap", type=float, default=0.25, help="window overlap, 0 to <1 (default 0.25)")
    p.add_argument("--roi-size", type=int, nargs="+",
                   help="window size in voxels (default: the plan's patch scaled up to ~1M voxels)")
    p.add_argument("--cpu-bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 on the CPU (auto: when the CPU supports it natively)")
    p.add_argument("--sw-batch-size", type=int, default=1, help="windows per network call")
    p.add_argument("--body-crop", action="store_true",
                   help="CT models: predict only inside the body's bounding box (HU > -500, plus a margin); "
                        "background outside")
    p.add_argument("--roi-first", metavar="CHECKPOINT",
                   help="ROI-first: a cheap low-resolution model of the same classes (its checkpoint, plan.json "
                        "beside it) segments each image first; the model runs only inside the box of what it "
                        "found, plus --roi-margin, and background outside")
    p.add_argument("--roi-margin", type=float, default=10.0, metavar="MM",
                   help="margin around the --roi-first box, mm per side (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--prefetch", action="store_true",
                   help="read the next input while predicting this one (holds two in memory; for slow storage "
                        "or spare cores: no gain on 2 busy cores)")
    p.add_argument("--backend", choices=["auto", "torch", "torch-compile", "onnxruntime", "openvino"], default="auto",
                   help="what runs the network (default auto: on the CPU, images with 8M+ window voxels on "
                        "OpenVINO when it is installed, about 2x faster there, the rest on torch; "
                        "torch-compile: torch.compile, compiled at the first window, worth it for folders; "
                        "onnxruntime/openvino: CPU only, the network converted at start-up unless "
                        "--model-file gives an exported one)")
    p.add_argument("--model-file", help="a file from `medunet export` (.onnx, or OpenVINO .xml) for --backend")
    p.add_argument("--placement", choices=["even", "monai"], default="even",
                   help="window placement: even (default, spread evenly) or monai (MONAI's sliding_window_inference "
                        "rule: with --roi-size 96 --overlap 0.5 --cpu-bf16 off it gives MONAI's probabilities)")
    p.add_argument("--format", dest="formats", type=_formats_arg, default=("nifti",), metavar="FORMATS",
                   help="label outputs, comma-separated: nifti (default; <id>_seg.nii.gz), dicom-seg "
                        "(<id>_seg.dcm) and/or rtstruct (<id>_rtstruct.dcm); the DICOM ones need DICOM series "
                        "inputs and reference them")
    p.set_defaults(func=_run_segment)


def _formats_arg(value: str) -> tuple[str, ...]:
    from medunet.io.dicom.outputs import parse_formats

    try:
        return parse_formats(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--format ")) from None


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun_shard() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` when started by ``torchrun`` (its ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK`` and ``MASTER_ADDR`` all set), else ``(0, 1, 0)``: a stray ``WORLD_SIZE`` in a shell
    never makes a plain run do only part of its inputs."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if not all(os.environ.get(k) for k in names):
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def _all_ranks_total(n_ok: int, n_failed: int) -> tuple[int, int]:
    """Sum ``(n_ok, n_failed)`` over the torchrun ranks (a gloo group over torchrun's rendezvous
    address); every rank returns only once all have finished, so no rank's exit stops another's work."""
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))  # a rank may have hours of cases
    try:
        counts = torch.tensor([n_ok, n_failed], dtype=torch.int64)
        dist.all_reduce(counts)
        return int(counts[0]), int(counts[1])
    finally:
        dist.destroy_process_group()


def _run_segment(args: argparse.Namespace) -> int:
    """``medunet segment``; under ``torchrun`` each rank segments its share of the inputs (every
    ``WORLD_SIZE``-th, from ``RANK``) and prints its own table; the ranks then wait for each other and
    all exit with the status of the whole batch (rank 0 prints the total)."""
    import warnings

    from medunet.inference import Predictor, segment_inputs

    if not args.bundle and not args.checkpoint:
        print("medunet segment: error: give --bundle and/or --checkpoint", file=sys.stderr)
        return EXIT_USAGE
    roi = (args.roi_size[0] if len(args.roi_size) == 1 else args.roi_size) if args.roi_size else "auto"
    rank, world, local_rank = torchrun_shard()
    device = args.device
    if world > 1 and device in ("auto", "cuda") and torch_cuda_count() > 0:
        device = f"cuda:{local_rank % torch_cuda_count()}"  # torchrun: one GPU per local rank
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        cpu_bf16 = {"on": True, "off": False}.get(args.cpu_bf16, "auto")
        roi_first = None
        if args.roi_first:
            roi_first = Predictor.from_bundle(None, args.roi_first, device=device, progress=False, cpu_bf16=cpu_bf16)
        predictor = Predictor.from_bundle(
            args.bundle, args.checkpoint, device=device, tta=args.tta, overlap=args.overlap, roi_size=roi,
            roi_first=roi_first, roi_margin_mm=args.roi_margin,
            sw_batch_size=args.sw_batch_size, largest_component=args.largest_component,
            progress=not args.no_progress, cpu_bf16=cpu_bf16,
            body_crop=args.body_crop, backend=args.backend, model_file=args.model_file, placement=args.placement,
        )
    for w in caught:
        print(f"medunet segment: warning: {w.message}", file=sys.stderr)
    uncertainty = {"auto": True, None: False}.get(args.uncertainty, args.uncertainty)

    results = segment_inputs(predictor, args.input, args.output, overwrite=args.overwrite,
                             save_probabilities=args.save_probabilities, uncertainty=uncertainty,
                             formats=args.formats, shard=(rank, world), prefetch=args.prefetch,
                             prefix="medunet segment" + (f" [rank {rank}/{world}]" if world > 1 else ""))
    n_failed = sum(r.failed for r in results)  # skipped cases (all outputs exist) are done, not failed
    n_done = sum(r.done for r in results)  # ignored entries (hidden, repeated): neither
    if world > 1:
        n_done, n_failed = _all_ranks_total(n_done, n_failed)
        if rank == 0:
            print(f"all {world} ranks: {n_done}/{n_done + n_failed} succeeded", flush=True)
    return batch_exit_code(n_done, n_failed)


# --------------------------------------------------------------------------------------------------
# medunet import-dicom
@command
def _add_import_dicom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-dicom", help="DICOM CT series + RTSTRUCT or DICOM SEG → MSD dataset (imagesTr, labelsTr, dataset.json)",
        description="Turn one patient folder, or a folder of patient folders, each holding one image series and "
                    "an RTSTRUCT or DICOM SEG (found by SOP class, anywhere below the patient folder), into an MSD "
                    "dataset in the series' exact geometry. ROI i of --roi becomes label i. A bad patient costs "
                    "one line; the others go on. Exit status 0 all ok, 3 some failed, 1 all failed.")
    p.add_argument("src", help="patient folder or folder of patient folders")
    p.add_argument("dst", help="dataset folder to write (an earlier import with the same labels is extended)")
    p.add_argument("--roi", required=True, metavar="NAME[=LABEL][,NAME...]",
                   help="ROI / segment names, matched case-insensitively; NAME=LABEL names the class in dataset.json")
    p.add_argument("--name", help="dataset name in dataset.json (default: the folder's name)")
    p.set_defaults(func=_run_import_dicom)


def _run_import_dicom(args: argparse.Namespace) -> int:
    from medunet.io.dicom import import_dicom

    def report(case_id: str, error: str | None, case) -> None:
        if error:
            print(f"medunet import-dicom: failed: {error}", file=sys.stderr, flush=True)
            return
        rois = ", ".join(f"{v} {n}" for v, n in case.labels.items())
        print(f"  {case_id}  {'x'.join(map(str, case.image.spatial_shape))}  "
              f"{'x'.join(f'{s:.3g}' for s in case.image.spacing)} mm  {rois}  "
              f"({int((case.label > 0).sum())} voxels)", flush=True)
        for note in case.warnings:
            print(f"medunet import-dicom: warning: {case_id}: {note}", file=sys.stderr, flush=True)

    result = import_dicom(args.src, args.dst, args.roi, on_case=report, name=args.name)
    total = len(result.ok) + len(result.failed)
    print(f"{len(result.ok)}/{total} patient(s) imported into {result.dst}"
          + (f" ({result.dataset_json})" if result.dataset_json else ""))
    return batch_exit_code(len(result.ok), len(result.failed))


# --------------------------------------------------------------------------------------------------
# medunet export
@command
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write the network as TorchScript, ONNX or OpenVINO IR, checked against eager PyTorch",
        description="Export a trained network (batch and spatial sizes left free) and compare the exported "
                    "network's logits with eager PyTorch's on two random inputs (the training patch and a larger "
                    "window); fails, writing nothing, when they differ by more than --tolerance.")
    p.add_argument("--bundle", help="bundle folder (plan.json, models/model.pt)")
    p.add_argument("--checkpoint", help="weights file (default: <bundle>/models/model.pt)")
    p.add_argument("--format", required=True, choices=["torchscript", "onnx", "openvino"])
    p.add_argument("-o", "--output", required=True, help="output file (.pt, .onnx or .xml; added when missing)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest allowed max |exported - eager| of the logits (default 1e-3); with --int8 the largest "
                        "allowed fraction of calibration voxels whose label changes (default 0.02)")
    p.add_argument("--int8", nargs="+", metavar="IMAGE",
                   help="openvino only: quantise to int8 (NNCF), calibrated on windows of these images (NIfTI "
                        "files or DICOM series folders, preprocessed as for segmenting)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import warnings

    from medunet.inference import Predictor
    from medunet.inference.export import export_model

    if not args.bundle and not args.checkpoint:
        print("medunet export: error: give --bundle and/or --checkpoint", file=sys.stderr)
        return EXIT_USAGE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        predictor = Predictor.from_bundle(args.bundle, args.checkpoint, device="cpu", cpu_bf16=False)
    for w in caught:
        print(f"medunet export: warning: {w.message}", file=sys.stderr)
    plan = predictor.plan
    calibration = None
    if args.int8:
        if args.format != "openvino":
            print("medunet export: error: --int8 needs --format openvino", file=sys.stderr)
            return EXIT_USAGE
        from medunet.inference.export import calibration_from_images

        calibration = calibration_from_images(predictor, args.int8)
    tolerance = args.tolerance if args.tolerance is not None else (0.02 if args.int8 else 1e-3)
    result = export_model(predictor.network, args.format, args.output, plan.patch_size, plan.in_channels,
                          tolerance=tolerance, calibration=calibration)
    shapes = ", ".join("x".join(map(str, s)) for s in result["shapes"])
    check = (f"int8 changes the label of {result['label_change']:.3%} of the voxels" if args.int8 else
             f"max |exported - eager| = {result['max_abs_diff']:.2e}")
    print(f"medunet export: {args.format}{' int8' if args.int8 else ''}: {', '.join(result['files'])} "
          f"({result['export_s']:.1f} s); {check} on inputs {shapes} (max |logit difference| "
          f"{result['max_abs_diff']:.3g}, logits up to {result['max_abs_logit']:.3g}; tolerance {tolerance:g})")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# medunet label-server
@command
def _add_label_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label-server",
        help="serve medunet bundles to 3D Slicer/OHIF annotators through a MONAI Label server",
        description="Start a MONAI Label server (in the .venv-label environment, see `make label`) whose "
                    "app serves each bundle as an infer task and a train task, on a studies folder of "
                    "NIfTI volumes. Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--studies", required=True,
                   help="folder of NIfTI volumes (MONAI Label local datastore), or a DICOMweb URL "
                        "(http://host:port/dicom-web, e.g. Orthanc, as OHIF uses)")
    p.add_argument("--bundle", action="append", default=None, metavar="DIR",
                   help="bundle folder to serve (repeatable; default: every 3D bundle under bundles/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", action="append", default=None, metavar="[NAME=]FILE",
                   help="trained weights for a bundle (repeatable; NAME= needed with several bundles); "
                        "default: the bundle's models/model.pt, else random weights (untrained); weights "
                        "fine-tuned by the server are kept at a restart unless FILE is new or changed")
    p.add_argument("--workdir", default=None,
                   help="app working dir (default ~/.cache/medunet/label-server/<studies>-<hash>)")
    p.add_argument("--conf", nargs=2, action="append", default=None, metavar=("KEY", "VALUE"),
                   help="extra MONAI Label app setting, e.g. --conf skip_trainers true, --conf infer_queue 16 "
                        "(requests waiting beyond the one predicting; more get 503), --conf uncertainty_models ct")
    p.add_argument("--label-python", default=None,
                   help="Python of the MONAI Label environment (default .venv-label/bin/python)")
    p.add_argument("--dry-run", action="store_true", help="prepare the app dir, print the command, exit")
    p.set_defaults(func=_run_label_server)


def _run_label_server(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from medunet.io import InputError
    from medunet.label import launch

    remote = launch.is_remote_studies(args.studies)
    studies = args.studies if remote else Path(args.studies)
    if not remote and not studies.is_dir():
        raise InputError(studies, "studies folder not found (expected a folder of NIfTI volumes)")
    if not (1 <= args.port <= 65535):
        raise ValueError(f"--port {args.port}: not a TCP port")
    bundles = launch.find_bundles(args.bundle)
    names = [b.resolve().name for b in bundles]
    checkpoints = launch.parse_checkpoints(args.checkpoint, names)
    python = launch.find_label_python(args.label_python)
    workdir = Path(args.workdir) if args.workdir else launch.default_workdir(studies)
    setups = launch.prepare_app(workdir, bundles, checkpoints)
    for s in setups:
        origin = f" from {s.weights_from}" if s.weights_from else ""
        print(f"medunet label-server: model {s.name!r} labels {s.labels} weights: {s.weights}{origin}",
              flush=True)
        if s.untrained:
            print(f"medunet label-server: WARNING: {s.name!r} has no trained weights; its predictions come "
                  "from an UNTRAINED model (random weights). Pass --checkpoint or train it first.",
                  file=sys.stderr)
    cmd = launch.server_command(python, workdir, studies, names, args.host, args.port, dict(args.conf or []))
    if not remote and not any(f.name.endswith((".nii", ".nii.gz", ".nrrd")) for f in studies.iterdir()):
        print(f"medunet label-server: WARNING: {studies} has no NIfTI/NRRD volumes yet (add some, or upload "
              "them from the viewer)", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"medunet label-server: WARNING: binding {args.host}: the server has no authentication",
              file=sys.stderr)
    print(f"medunet label-server: app dir {workdir / 'app'}; server URL http://{args.host}:{args.port}/")
    if args.dry_run:
        print(shlex.join(cmd))
        return EXIT_OK
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(workdir / "run")  # an empty working dir: MONAI Label reads settings from ./.env
    os.execve(python, cmd, launch.server_env(workdir))
    return EXIT_FAILURE  # pragma: no cover (execve does not return)


# --------------------------------------------------------------------------------------------------
# medunet phantoms
@command
def _add_phantoms(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantoms", help="generate a synthetic CT, MRI or 2D-cell dataset in MSD layout")
    p.add_argument("--kind", required=True, choices=["ct", "mri", "cells"])
    p.add_argument("--cases", type=int, required=True, help="number of training cases")
    p.add_argument("--out", "-o", required=True, help="output folder (new, empty, or an earlier phantom set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="default",
                   help="'small' (tests), 'default' (realistic) or a shape such as 256x256x160")
    p.add_argument("--test-cases", type=int, default=None, help="test cases (default: 20%% of --cases)")
    p.add_argument("--format", dest="fmt", default="nifti", choices=["nifti", "png"],
                   help="file format (png: cells only)")
    p.set_defaults(func=_run_phantoms)


def _run_phantoms(args: argparse.Namespace) -> int:
    import time

    from medunet.data.phantoms import generate_dataset

    size = args.size
    if size not in ("small", "default"):
        try:
            size = tuple(int(v) for v in size.lower().replace(",", "x").split("x"))
        except ValueError:
            print(f"medunet phantoms: error: --size must be small, default or a shape like 256x256x160, "
                  f"got {args.size!r}", file=sys.stderr)
            return EXIT_USAGE
    times: list[float] = []

    def report(case_id: str, seconds: float) -> None:
        times.append(seconds)
        print(f"  {case_id}  {seconds:.2f} s", flush=True)

    start = time.perf_counter()
    out = generate_dataset(args.kind, args.out, cases=args.cases, seed=args.seed, size=size,
                           test_cases=args.test_cases, fmt=args.fmt, on_case=report)
    total = time.perf_counter() - start
    n_test = len(times) - args.cases
    print(f"wrote {args.cases} training + {n_test} test {args.kind} case(s) to {out} (MSD layout, "
          f"dataset.json) in {total:.1f} s, {sum(times) / max(len(times), 1):.2f} s per case")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# medunet check-dataset
@command
def _add_check_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-dataset", help="check a dataset's integrity (like nnU-Net's): one line per problem")
    p.add_argument("dataset", help="dataset folder (MSD or nnU-Net layout, or images/ + labels/)")
    p.add_argument("--strict", action="store_true", help="warnings (e.g. empty labels) also fail the check")
    p.set_defaults(func=_run_check_dataset)


def _run_check_dataset(args: argparse.Namespace) -> int:
    from medunet.data.check import check_dataset, summarize

    problems = check_dataset(args.dataset)
    for problem in problems:
        print(problem, flush=True)
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    print(summarize(args.dataset, problems))
    return EXIT_FAILURE if errors or (args.strict and warnings) else EXIT_OK


# --------------------------------------------------------------------------------------------------
# medunet plan
@command
def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="fingerprint a dataset and write an nnU-Net-style plan.json")
    p.add_argument("dataset", help="dataset folder (MSD/nnU-Net dataset.json, imagesTr/labelsTr or images/labels)")
    p.add_argument("-o", "--output", default="plan.json", help="where to write the plan (default: plan.json)")
    p.add_argument("--network", default="dynunet", help="registry name (see `medunet networks`)")
    p.add_argument("--dims", type=int, choices=(2, 3), default=3, help="2D (slice-wise) or 3D network")
    p.add_argument("--memory-budget", type=float, default=None, metavar="MB",
                   help="training-step memory budget in MB (default 2000 on CPU, 8000 with --gpu)")
    p.add_argument("--gflops-budget", type=float, default=None, metavar="GFLOP",
                   help="CPU only: compute per training step (default 40)")
    p.add_argument("--gpu", action="store_true", help="plan for a GPU (bigger filters/patches, no compute cap)")
    p.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                   help="target spacing per axis in mm, RAS order (default: the median; nnU-Net's rule for "
                        "anisotropic data)")
    p.add_argument("--intensity-cases", type=int, default=None, metavar="N",
                   help="sample intensities from at most N cases (default: all)")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from medunet.data.planning import NoUsableCases, fingerprint_dataset, format_plan, plan_dataset

    try:
        fingerprint = fingerprint_dataset(args.dataset, intensity_cases=args.intensity_cases)
    except NoUsableCases as e:  # every refused file on its own line, then main's one error line
        fingerprint, refused = None, e
    for problem in (refused.failed if fingerprint is None else fingerprint["failed"]):
        print(f"medunet plan: skipped {problem}", file=sys.stderr)
    if fingerprint is None:
        raise refused
    plan = plan_dataset(args.dataset, network=args.network, spatial_dims=args.dims,
                        memory_budget_mb=args.memory_budget, gpu=args.gpu, gflops_budget=args.gflops_budget,
                        fingerprint=fingerprint, spacing=args.spacing)
    path = plan.save(args.output)
    print(format_plan(plan))
    print(f"wrote {path}")
    return EXIT_PARTIAL if fingerprint["failed"] else EXIT_OK


# --------------------------------------------------------------------------------------------------
# medunet train / medunet evaluate: run a bundle (same as python -m monai.bundle run training|evaluating)
def _add_bundle_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder, e.g. bundles/ct (see bundles/*/docs/README.md)")
    p.add_argument("--dataset-dir", help="MSD-layout dataset (default: phantoms generated in the bundle)")
    p.add_argument("--output-dir", help="run folder: latest checkpoint, history, MLflow store, evaluation")
    p.add_argument("--ckpt-dir", help="where the best model.pt and its plan.json go (default: <bundle>/models)")
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda:0 when available)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other top-level bundle id, JSON value (repeatable), e.g. --set max_epochs=50")


@command
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a bundle (resumes automatically from its output dir)")
    _add_bundle_run_args(p)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="wall-clock budget of training + validation; the learning rate anneals over it")
    p.set_defaults(func=_run_train, workflow="train")


@command
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a bundle's best model: per-case CSV, summary, overlays")
    _add_bundle_run_args(p)
    p.set_defaults(func=_run_train, workflow="evaluate")


def _run_train(args: argparse.Namespace) -> int:
    from medunet.engines.workflow import parse_overrides, run_bundle_workflow

    overrides = parse_overrides(args.set)
    for key in ("dataset_dir", "output_dir", "ckpt_dir", "device", "max_epochs", "time_budget"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    run_bundle_workflow(args.bundle, args.workflow, overrides)
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from medunet import __version__

    parser = argparse.ArgumentParser(
        prog="medunet",
        description="medunet: 2D/3D medical image segmentation (U-Net family, MONAI, nnU-Net-style planning)",
    )
    parser.add_argument("--version", action="version", version=f"medunet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for adder in _COMMANDS:
        adder(sub)
    return parser


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (not the one of the first call), so repeated
    in-process runs — tests, notebooks — never log into a stream that has since been closed."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # not setStream(): it would flush the old, possibly closed, stream
        super().emit(record)


def _configure_logging(debug: bool) -> None:
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _CurrentStderrHandler)), None)
    if handler is None:
        handler = _CurrentStderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _configure_logging(debug=args.debug)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("medunet: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug or os.environ.get("MEDUNET_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"medunet {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
