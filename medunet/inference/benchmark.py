"""Measuring pieces of the inference benchmarks (``scripts/bench_inference.py``, ``scripts/bench_folder.py``):
peak resident memory of this process or of a command, a conv3d roofline, forward FLOPs, and MONAI's
tiling with its window grid moved (the agreement a different tiling can expect against MONAI).

Linux only for the memory pieces (``/proc/self/status``; GNU ``time``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PeakRSS", "rss_mib", "child_peak_rss", "conv3d_roofline", "forward_flops", "ShiftedGridInferer",
           "empty_model_cache"]


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms), in MiB."""

    def __enter__(self):
        self.start = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())

    @property
    def increase(self) -> float:
        return self.peak - self.start


def rss_mib() -> float:
    """Resident memory of this process now, in MiB (NaN where ``/proc`` does not tell)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def conv3d_roofline(dtype=torch.float32, channels=32, size=64, repeats=3) -> float:
    """Best GFLOP/s of a 3×3×3 conv3d (``channels``→``channels``, ``size``³) on this CPU."""
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1).eval()
    x = torch.randn(1, channels, size, size, size)
    flops = 2.0 * channels * channels * 27 * size**3
    best = float("inf")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        conv(x)
        for _ in range(repeats):
            t = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def forward_flops(network: torch.nn.Module, shape) -> float:
    """FLOPs of one forward pass on a ``(1, 1, *shape)`` input."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        network(torch.zeros(1, 1, *shape))
    return float(counter.get_total_flops())


class ShiftedGridInferer:
    """The baseline's tiling with its window grid moved by ``shift`` voxels along every axis.

    The input ``(B, C, *S)`` is padded in front by ``shift`` voxels of its minimum (air after CT
    normalisation), tiled by ``inner``, and the output cropped back to ``S``. Comparing its labels with
    the unshifted baseline's measures how much the network's labels depend on where the window borders
    fall: the agreement any different tiling can expect against the baseline.
    """

    def __init__(self, inner, shift: int) -> None:
        self.inner, self.shift = inner, int(shift)

    def __call__(self, x: torch.Tensor, network) -> torch.Tensor:
        s = self.shift
        padded = torch.nn.functional.pad(x, (s, 0) * (x.dim() - 2), mode="constant", value=float(x.min()))
        out = self.inner(padded, network)
        return out[(Ellipsis, *[slice(s, None)] * (x.dim() - 2))]


def child_peak_rss(command: list[str]) -> tuple[float, float]:
    """Run ``command``; ``(its peak RSS in MiB, seconds)``.

    Measured by GNU ``time`` around it: Linux carries a process's peak-RSS record over ``fork`` and
    ``exec``, so a child started straight from this (large) process would report this process's RSS.
    """
    t = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-f", "maxrss_kib=%M", *command], check=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    kib = [line.split("=", 1)[1] for line in run.stderr.splitlines() if line.startswith("maxrss_kib=")]
    return float(kib[-1]) / 1024.0, seconds


@contextlib.contextmanager
def empty_model_cache():
    """A first run of some weights: inside the block the converted-network cache
    (:func:`medunet.inference.export.model_cache_dir`, ``MEDUNET_CACHE_DIR``) is an empty temporary folder."""
    old = os.environ.get("MEDUNET_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MEDUNET_CACHE_DIR"] = tmp
        try:
            yield tmp
        finally:
            if old is None:
                os.environ.pop("MEDUNET_CACHE_DIR", None)
            else:
                os.environ["MEDUNET_CACHE_DIR"] = old
