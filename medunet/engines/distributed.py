"""What a bundle's ``multi_gpu_train.json`` calls under ``torchrun``: the device of this rank, the process
group, the DDP wrapper and the closing summary — named functions instead of logic written in JSON.

    torchrun --standalone --nproc_per_node 2 -m monai.bundle run training \
        --config_file "['bundles/mri/train.json','bundles/mri/multi_gpu_train.json']"

On GPUs each rank takes ``cuda:<LOCAL_RANK>`` and NCCL; on a CPU the ranks use gloo, and when the
rendezvous address is on this machine (``--standalone``, or ``MASTER_ADDR`` 127.0.0.1/localhost) gloo is
bound to the loopback interface, so no socket listens beyond 127.0.0.1. On a 2-core CPU two ranks with
one thread each (torchrun's default ``OMP_NUM_THREADS=1``) and half the batch each train about 1.25×
more steps per second than one 2-thread process (measured on Hippocampus, bundles/mri/docs/README.md).
"""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist

__all__ = ["world", "rank_device", "init_distributed", "wrap_ddp", "loopback_interface", "distributed_summary",
           "finish_distributed", "per_rank_batch"]

logger = logging.getLogger("medunet.engines")

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


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


def rank_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_distributed(device: torch.device | str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``…), once.

    NCCL for CUDA devices, gloo otherwise; gloo is bound to the loopback interface when the rendezvous
    is local and ``GLOO_SOCKET_IFNAME`` is not set. Returns ``(rank, world_size)``.
    """
    device = torch.device(device) if device is not None else rank_device()
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise RuntimeError("init_distributed: not started by torchrun (no WORLD_SIZE in the environment); "
                               "use `torchrun --nproc_per_node N -m monai.bundle run ...`")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "gloo" and os.environ.get("MASTER_ADDR", "127.0.0.1") in _LOCAL_HOSTS:
            interface = loopback_interface()
            if interface:
                os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return world()


def per_rank_batch(batch_size: int) -> int:
    """The samples each rank takes per step so that the ranks together keep the plan's batch.

    ``batch_size // world_size`` when it divides evenly (e.g. 2 ranks × 1 of a batch of 2); otherwise each
    rank keeps the whole batch (the effective batch grows) and rank 0 says so once.
    """
    _, size = world()
    if size > 1 and batch_size % size == 0:
        return batch_size // size
    if size > 1:
        logger.warning("batch_size %d does not split over %d ranks: each rank takes %d (effective batch %d)",
                       batch_size, size, batch_size, batch_size * size)
    return int(batch_size)


def wrap_ddp(network: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``network`` (moved to ``device``); gradients are averaged over
    the ranks and every rank starts from rank 0's weights."""
    device = torch.device(device)
    network = network.to(device)
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)


def distributed_summary(trainer) -> str:
    """One line per rank for the log: rank, backend, iterations trained."""
    rank, size = world()
    backend = dist.get_backend() if dist.is_initialized() else "none"
    line = (f"medunet ddp: rank {rank}/{size} ({backend}) trained {int(trainer.state.iteration)} iterations, "
            f"{float(getattr(trainer.state, 'train_elapsed_s', 0.0) or 0.0):.1f} s")
    print(line, flush=True)
    return line


def finish_distributed() -> None:
    """Leave the process group (no-op without one): wait for every rank, free what still refers to
    collective work while the group is alive, then destroy it."""
    if dist.is_available() and dist.is_initialized():
        import gc
        import time

        dist.barrier()
        gc.collect()
        time.sleep(0.05)  # let gloo's worker threads finish releasing completed work (they need the GIL)
        dist.destroy_process_group()
