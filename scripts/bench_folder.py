"""Folder throughput of ``medunet segment``: volumes per minute for N CT phantoms, one at a time against
reading the next volume while this one is predicted (``Predictor.segment(prefetch=...)``), and against
two torchrun processes splitting the folder (one CPU core each).

Uses the ``bundles/ct`` network (``make demo``'s weights when present; untrained weights time the same)
on stored int16 CT phantoms (default 10 of 256×256×64). Each configuration runs in its own fresh
process (``medunet segment``, the user's command) into its own empty output folder, in an order that
alternates between repeats; the last line is ``prefetch_speedup=X torchrun2_speedup=Y``.

Usage: ``.venv/bin/python scripts/bench_folder.py [--cases 10] [--shape 256 256 64] [--repeats 2]
[--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from medunet.data.phantoms import generate_case
from medunet.io import write_nifti

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 64])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/medunet/bench_folder"))
    ap.add_argument("--checkpoint", default=str(REPO / "demo_output" / "ct" / "models" / "model.pt"))
    args = ap.parse_args()
    work = Path(args.workdir)
    cases = work / f"ct_{'x'.join(map(str, args.shape))}"
    cases.mkdir(parents=True, exist_ok=True)
    for i in range(args.cases):
        path = cases / f"ct_{i:03d}.nii.gz"
        if not path.exists():
            case = generate_case("ct", 2000 + i, seed=0, size=tuple(args.shape))
            write_nifti(case.image, case.affine, path, dtype=np.int16)
    weights = ["--checkpoint", args.checkpoint] if Path(args.checkpoint).is_file() else []
    segment = ["-m", "medunet.cli", "segment", "-i", str(cases), "--bundle", str(REPO / "bundles" / "ct"), *weights,
               "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    configs = {
        "one at a time (default)": lambda out: [sys.executable, *segment, "-o", out],
        "next volume read ahead (--prefetch)": lambda out: [sys.executable, *segment, "-o", out, "--prefetch"],
        "torchrun, 2 processes x 1 thread": lambda out: [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), *segment, "-o", out],
    }
    print(f"{args.cases} stored CT phantoms {tuple(args.shape)} int16, bundles/ct "
          f"({'weights ' + args.checkpoint if weights else 'untrained weights'}), {os.cpu_count()} cores, "
          f"load {os.getloadavg()}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            run = subprocess.run(configs[name](str(out)), env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - t
            done = len(list(out.glob("*_seg.nii.gz")))
            if done != args.cases:
                raise SystemExit(f"{name}: {done}/{args.cases} labels written (rc {run.returncode})\n{run.stderr[-2000:]}")
            times[name].append(seconds)
            print(f"  repeat {repeat + 1}: {name:<36} {seconds:7.1f} s  {60 * args.cases / seconds:5.2f} volumes/min",
                  flush=True)
    best = {name: min(v) for name, v in times.items()}
    base = best[names[0]]
    print(f"\n{'configuration':<36} {'best s':>7} {'volumes/min':>11} {'speedup':>7}")
    for name in names:
        print(f"{name:<36} {best[name]:7.1f} {60 * args.cases / best[name]:11.2f} {base / best[name]:7.2f}")
    print("(each run: a fresh process, model loading included; best of the repeats)")
    print(f"prefetch_speedup={base / best[names[1]]:.2f} torchrun2_speedup={base / best[names[2]]:.2f}")


if __name__ == "__main__":
    main()
