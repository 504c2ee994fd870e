#!/usr/bin/env python
"""Score finished ``train_hippocampus.sh`` runs alone and as an ensemble on their validation split.

    python scripts/hippocampus_ensemble.py runs/hippocampus_v3 runs/hippocampus_v4 [...]

Each RUN_DIR holds ``models/model.pt`` and ``models/plan.json``. Every run is predicted on the cached
validation crops (every ``--val-every``-th case, whole-volume pass, bf16, no TTA — the pass the training
curve uses) and its softmax kept; the script prints per-class Dice for each run alone, for each pair, and
for all runs averaged. It measures how much of a shortfall is variance between trained models (which
averaging removes) and how much they all share. The runs must have been trained on the same split.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="output folders of scripts/train_hippocampus.sh")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--val-every", type=int, default=5)
    p.add_argument("--no-pairs", action="store_true", help="skip the pairwise ensembles")
    args = p.parse_args(argv)

    from medunet.data.cached import cache_cases, every_nth_split
    from medunet.data.datalist import load_datalist
    from medunet.data.plan import Plan
    from medunet.engines.recipes import whole_volume_logits
    from medunet.io import load_weights
    from medunet.metrics.segmentation import case_metrics

    plans = {}
    for run in args.runs:
        plan_file = Path(run) / "models" / "plan.json"
        if not plan_file.is_file() or not (Path(run) / "models" / "model.pt").is_file():
            raise SystemExit(f"{run}: no models/model.pt with models/plan.json (not a finished train_hippocampus run)")
        plans[run] = Plan.load(plan_file)
    first = plans[args.runs[0]]
    for run, plan in plans.items():
        if (plan.target_spacing, plan.normalization, plan.labels) != (first.target_spacing, first.normalization,
                                                                       first.labels):
            raise SystemExit(f"{run}: preprocessing or labels differ from {args.runs[0]}; cannot average them")
    _, val_items = every_nth_split(load_datalist(args.data_dir), args.val_every)
    cases = cache_cases(val_items, first)
    n_classes = first.out_channels
    names = first.label_names

    probs: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for run, plan in plans.items():
            net = plan.build_network()
            load_weights(net, Path(run) / "models" / "model.pt")
            net.eval()
            probs[run] = [torch.softmax(whole_volume_logits(net, c.image.unsqueeze(0), bf16=True), 1)[0]
                          for c in cases]

    def score(members: list[str]) -> str:
        dice = []
        for i, case in enumerate(cases):
            pred = sum(probs[m][i] for m in members).argmax(0)
            metrics = case_metrics(pred, case.label[0], n_classes, metrics=("dice",))
            dice.append([metrics[c]["dice"] for c in range(1, n_classes)])
        per_class = np.nanmean(np.asarray(dice, dtype=float), axis=0)
        parts = " ".join(f"{names[c]}={per_class[c - 1]:.4f}" for c in range(1, n_classes))
        return f"mean={per_class.mean():.4f} {parts}"

    print(f"{len(cases)} validation cases (every {args.val_every}th), whole-volume pass, no TTA")
    for run in args.runs:
        print(f"{run}: {score([run])}")
    if not args.no_pairs and len(args.runs) > 2:
        for a, b in itertools.combinations(args.runs, 2):
            print(f"{a} + {b}: {score([a, b])}")
    if len(args.runs) > 1:
        print(f"all {len(args.runs)} averaged: {score(list(args.runs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
