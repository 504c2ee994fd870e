"""Are the phantom labels learnable? Train a small U-Net on a few phantom cases, report Dice on held-out ones.

Usage::

    .venv/bin/python scripts/phantom_learnability.py [--kind ct|mri|cells] [--train 4] [--test 2]
        [--steps 150] [--size small]

Prints one table row per label: Dice on the held-out cases after training, next to the Dice of a
baseline that predicts every voxel as that label's most likely intensity band (what an intensity
threshold alone achieves), so the table shows the network learns more than a threshold.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from medunet import networks
from medunet.data.phantoms import KINDS, generate_case


def _normalize(image: np.ndarray, kind: str) -> np.ndarray:
    x = image.astype(np.float32)
    if kind == "ct":
        return np.clip(x, -200, 300) / 100.0
    return (x - x.mean()) / (x.std() + 1e-6)


def _canonical(case):
    """Voxel order RAS (as the training pipelines do), so that position is a usable cue."""
    import nibabel as nib

    if case.image.ndim == 2:
        return case.image, case.label
    img = nib.as_closest_canonical(nib.Nifti1Image(case.image, case.affine))
    lbl = nib.as_closest_canonical(nib.Nifti1Image(case.label, case.affine))
    return np.asarray(img.dataobj), np.asarray(lbl.dataobj)


def _dice(pred: np.ndarray, truth: np.ndarray, value: int) -> float:
    p, t = pred == value, truth == value
    denom = p.sum() + t.sum()
    return float(2 * (p & t).sum() / denom) if denom else 1.0


def _threshold_baseline(train_imgs, train_lbls, test_imgs, value: int) -> np.ndarray:
    """Best single intensity band [lo, hi] for ``value`` on the training cases, applied to the test cases."""
    inside = np.concatenate([img[lbl == value] for img, lbl in zip(train_imgs, train_lbls)])
    lo, hi = np.percentile(inside, [5, 95])
    return [((i >= lo) & (i <= hi)).astype(np.uint8) * value for i in test_imgs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="ct", choices=sorted(KINDS))
    ap.add_argument("--train", type=int, default=4)
    ap.add_argument("--test", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--size", default="small")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    module = KINDS[args.kind]
    cases = [_canonical(generate_case(args.kind, i, seed=0, size=args.size)) for i in range(args.train + args.test)]
    # Canonical shapes can differ (axes permuted), so crop all to the common size.
    common = tuple(min(c[0].shape[d] for c in cases) for d in range(cases[0][0].ndim))
    crop = tuple(slice(0, n - n % 4) for n in common)
    imgs = [_normalize(c[0], args.kind)[crop] for c in cases]
    lbls = [c[1][crop].astype(np.int64) for c in cases]
    dims = module.SPATIAL_DIMS
    n_classes = max(module.LABELS.values()) + 1
    net = networks.create("unet", spatial_dims=dims, in_channels=1, out_channels=n_classes,
                          channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    x = torch.tensor(np.stack(imgs[: args.train]))[:, None]
    y = torch.tensor(np.stack(lbls[: args.train]))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(args.steps):
        opt.zero_grad()
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        soft = logits.softmax(1)[:, 1:]
        onehot = torch.nn.functional.one_hot(y, n_classes).movedim(-1, 1)[:, 1:].float()
        dims_sum = tuple(range(2, soft.dim()))
        dice = (2 * (soft * onehot).sum(dims_sum) + 1) / (soft.sum(dims_sum) + onehot.sum(dims_sum) + 1)
        (loss + 1 - dice.mean()).backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}  soft dice {dice.mean().item():.3f}", flush=True)
    train_time = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        preds = [net(torch.tensor(i)[None, None]).argmax(1)[0].numpy() for i in imgs[args.train:]]
    print(f"\n{args.kind} ({args.size}, crop {tuple(s.stop for s in crop)}): {args.train} training / {args.test} "
          f"held-out cases, {args.steps} steps in {train_time:.0f} s ({args.threads} thread(s), shared CPU)")
    print(f"{'label':<12} {'Dice U-Net':>11} {'Dice threshold':>15}")
    for name, value in module.LABELS.items():
        if value == 0:
            continue
        unet = np.mean([_dice(p, t, value) for p, t in zip(preds, lbls[args.train:])])
        base_pred = _threshold_baseline(imgs[: args.train], lbls[: args.train], imgs[args.train:], value)
        base = np.mean([_dice(p, t, value) for p, t in zip(base_pred, lbls[args.train:])])
        print(f"{name:<12} {unet:>11.3f} {base:>15.3f}")


if __name__ == "__main__":
    main()
