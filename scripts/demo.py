"""`make demo`: the whole job on built-in data, in a few minutes on a laptop CPU.

1. generate CT phantoms (MSD layout) — done by the ct bundle itself because the dataset folder is new;
2. train the ``bundles/ct`` bundle briefly (MONAI bundle + Ignite; MLflow run in a local SQLite store);
3. evaluate the best checkpoint (per-case CSV, summary JSON, best/worst overlays);
4. segment one held-out volume with ``medunet segment``;
5. print where the label, the overlays and the MLflow run are.

Everything goes to ``demo_output/``. Running it again resumes (a finished run is not retrained).
Options: ``--epochs N`` (default 16), ``--cases N`` (default 12), ``--out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ct"


def _bundle_overrides(out: Path, epochs: int, cases: int) -> dict:
    return {
        "dataset_dir": str(out / "data" / "ct"),
        "output_dir": str(out / "ct" / "eval"),
        "ckpt_dir": str(out / "ct" / "models"),
        "phantom_cases": cases,
        "max_epochs": epochs,
        "val_interval": max(1, epochs // 4),
        "num_workers": 0,
        "progress_bar": False,
        "experiment_name": "medunet-demo",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--out", default=str(REPO / "demo_output"))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    overrides = _bundle_overrides(out, args.epochs, args.cases)
    # small volumes: extra OpenMP threads gain little and stall badly on a busy 2-core machine
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from medunet.engines.workflow import run_bundle_workflow  # imports torch: after the thread setting

    t0 = time.perf_counter()

    print(f"[1-2/5] train bundles/ct for {args.epochs} epochs on {args.cases} CT phantoms", flush=True)
    run_bundle_workflow(BUNDLE, "train", overrides)
    t_train = time.perf_counter() - t0

    print("[3/5] evaluate the best checkpoint on the validation fold", flush=True)
    run_bundle_workflow(BUNDLE, "evaluate", overrides)
    summary = json.loads((out / "ct" / "eval" / "evaluation" / "summary.json").read_text())

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
    marker = json.loads((out / "ct" / "eval" / "mlflow_run.json").read_text())
    print(f"\n[5/5] done in {time.perf_counter() - t0:.0f} s (training {t_train:.0f} s)")
    print(f"  validation mean Dice (best checkpoint): {summary['mean_dice']:.3f}   "
          + "  ".join(f"{k} {v:.3f}" for k, v in dice_by_class.items() if v is not None))
    print(f"  segmentation:      {labels[0] if labels else seg_dir}")
    print(f"  evaluation:        {out / 'ct' / 'eval' / 'evaluation'} (metrics.csv, summary.json)")
    print(f"  overlays:          {out / 'ct' / 'eval' / 'evaluation' / 'overlays'}")
    print(f"  training curve:    {out / 'ct' / 'eval' / 'training_curve.png'}")
    print(f"  best model + plan: {out / 'ct' / 'models'}")
    print(f"  MLflow run:        {marker['run_id']} in {marker['tracking_uri']}")
    print(f"    browse it with:  mlflow ui --backend-store-uri {marker['tracking_uri']} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
