"""Data-parallel training on the cores of one CPU: N worker processes, gloo, loopback only.

Small 3D networks use two CPU threads poorly: on the 2-core CI machine a Hippocampus step (DynUNet
16–128, patch 40×56×40, bf16) takes 0.34 s with batch 2 on 2 threads, but 0.25 s with batch 1 on 1
thread, and two such processes side by side do not slow each other down. Two workers with one thread
and half the batch each, averaging gradients like ``DistributedDataParallel`` does, therefore train the
same effective batch at about 1.25× the steps per second (``scripts/hippocampus_train.py --workers``;
measured: 5760 instead of 4615 steps in 28 min). More steps are not more Dice on every task: on
Hippocampus, where training has flattened by then, they were not (bundles/mri/docs/README.md).

:func:`spawn_cpu_workers` starts the processes with a file-based rendezvous (no TCP store) and gloo
bound to the loopback interface, so nothing listens beyond 127.0.0.1. Inside a worker,
:func:`world` gives ``(rank, world_size)``; :func:`medunet.engines.recipes.train_recipe` wraps the
network in ``DistributedDataParallel`` when a process group is up.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["world", "spawn_cpu_workers", "default_workers", "loopback_interface", "all_gather_list"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def loopback_interface() -> str | None:
    """Name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS), or ``None``."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def default_workers(batch_size: int, cpu_count: int | None = None) -> int:
    """Worker processes for CPU training: 2 when there are ≥ 2 cores and the batch splits evenly, else 1.

    Two is where the measured gain is (one thread per worker on 2 cores); more workers on a bigger CPU
    would shrink the per-worker batch below one sample, so the rest of the cores go to threads.
    """
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return 2 if cores >= 2 and batch_size >= 2 and batch_size % 2 == 0 else 1


def _worker(rank: int, fn: Callable, nprocs: int, threads: int, store_path: str, args: Sequence) -> None:
    torch.set_num_threads(threads)
    store = dist.FileStore(store_path, nprocs)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=nprocs)
    try:
        fn(rank, nprocs, *args)
    finally:
        dist.destroy_process_group()


def spawn_cpu_workers(fn: Callable, nprocs: int, args: Sequence = (), threads_per_worker: int | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` processes joined by a gloo process group.

    Args:
        fn: a picklable (module-level) function; it runs with the process group initialised.
        nprocs: number of processes (≥ 1; with 1, ``fn`` still runs in a child with a group of one).
        args: extra arguments, pickled to every worker (tensors go through shared memory).
        threads_per_worker: torch threads per worker (default: ``cpu_count // nprocs``, at least 1).

    Raises:
        torch.multiprocessing.ProcessRaisedException: when a worker fails (the others are stopped).
    """
    import torch.multiprocessing as mp

    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // nprocs)
    interface = loopback_interface()
    set_interface = bool(interface) and "GLOO_SOCKET_IFNAME" not in os.environ
    if set_interface:
        os.environ["GLOO_SOCKET_IFNAME"] = interface  # inherited by the spawned workers, removed after
    try:
        with tempfile.TemporaryDirectory(prefix="medunet_dist_") as tmp:
            store_path = str(Path(tmp) / "store")
            mp.spawn(_worker, args=(fn, nprocs, threads, store_path, tuple(args)), nprocs=nprocs, join=True)
    finally:
        if set_interface:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)


def all_gather_list(items: list) -> list:
    """Concatenate a list from every rank, in rank order (the list itself when not distributed)."""
    rank, size = world()
    if size == 1:
        return list(items)
    gathered: list = [None] * size
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]
