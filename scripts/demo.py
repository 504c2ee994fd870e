"""`make demo`: the whole job on built-in data, in a few minutes on a laptop CPU.

1. generate CT phantoms (MSD layout) at a clinical in-plane resolution (256×256×48 voxels of 0.6–0.9 mm
   in-plane, 2.5–5 mm slices) — done by the ct bundle itself because the dataset folder is new;
2. train the ``bundles/ct`` bundle for a wall-clock budget (MONAI bundle + Ignite; MLflow run in a local
   SQLite store); the learning rate anneals over the budget;
3. evaluate the final weights on the held-out phantoms through the Predictor (per-case CSV, summary
   JSON, best/worst overlays);
4. segment one test volume with ``medunet segment``;
5. print the per-class Dice and where the label, the overlays and the MLflow run are.

Everything goes to ``demo_output/``. Running it again resumes (a finished run is not retrained).
Options: ``--seconds S`` (training budget, default 170), ``--cases N`` (default 12), ``--out DIR``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ct"


#: phantom volumes of the demo: a clinical in-plane resolution (0.6–0.9 mm) over a 154–230 mm field of view
PHANTOM_SHAPE = [256, 256, 48]


def _bundle_overrides(out: Path, seconds: float, cases: int) -> dict:
    return {
        "dataset_dir": str(out / "data" / "ct"),
        "output_dir": str(out / "ct" / "eval"),
        "ckpt_dir": str(out / "ct" / "models"),
        "phantom_cases": cases,
        "phantom_size": PHANTOM_SHAPE,
        "n_folds": 4,
        "time_budget": seconds,
        "progress_bar": False,
        "experiment_name": "medunet-demo",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=170.0, help="training budget (wall seconds)")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--out", default=str(REPO / "demo_output"))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    overrides = _bundle_overrides(out, args.seconds, args.cases)
    from medunet.engines.workflow import run_bundle_workflow

    t0 = time.perf_counter()

    print(f"[1-2/5] train bundles/ct for {args.seconds:.0f} s on {args.cases} CT phantoms "
          f"({'x'.join(map(str, PHANTOM_SHAPE))} voxels)", flush=True)
    run_bundle_workflow(BUNDLE, "train", overrides)
    t_train = time.perf_counter() - t0

    print("[3/5] evaluate the final weights on the held-out phantoms", flush=True)
    run_bundle_workflow(BUNDLE, "evaluate", overrides)
    summary = json.loads((out / "ct" / "eval" / "evaluation" / "summary.json").read_text(encoding="utf-8"))

    print("[4/5] medunet segment one held-out volume", flush=True)
    test_images = sorted((out / "data" / "ct" / "imagesTs").glob("*.nii.gz"))
    seg_dir = out / "segment"
    cmd = [str(Path(sys.executable).with_name("medunet")), "segment", "-i", str(test_images[0]), "-o", str(seg_dir),
           "--checkpoint", str(out / "ct" / "models" / "model.pt"), "--device", "cpu", "--overwrite", "--no-progress"]
    if not Path(cmd[0]).exists():
        cmd[:1] = [sys.executable, "-m", "medunet.cli"]
    subprocess.run(cmd, check=True)
    labels = sorted(p for p in seg_dir.glob("*.nii.gz") if "probabilities" not in p.name)

    dice_by_class = {name: m["dice"]["mean"] for name, m in summary["classes"].items()}
    marker = json.loads((out / "ct" / "eval" / "mlflow_run.json").read_text(encoding="utf-8"))
    print(f"\n[5/5] done in {time.perf_counter() - t0:.0f} s (training {t_train:.0f} s)")
    print(f"  held-out mean Dice ({summary['n_cases']} phantoms): {summary['mean_dice']:.3f}   "
          + "  ".join(f"{k} {v:.3f}" for k, v in dice_by_class.items() if v is not None))
    print(f"  segmentation:      {labels[0] if labels else seg_dir}")
    print(f"  evaluation:        {out / 'ct' / 'eval' / 'evaluation'} (metrics.csv, summary.json)")
    print(f"  overlays:          {out / 'ct' / 'eval' / 'evaluation' / 'overlays'}")
    print(f"  training curve:    {out / 'ct' / 'eval' / 'training_curve.png'}")
    print(f"  model + plan:      {out / 'ct' / 'models'}")
    print(f"  MLflow run:        {marker['run_id']} in {marker['tracking_uri']}")
    print(f"    browse it with:  mlflow ui --backend-store-uri {marker['tracking_uri']} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
