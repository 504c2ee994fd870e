"""Checkpoints: atomic saving and safe loading (``torch.load(weights_only=True)``, never arbitrary pickles).

A checkpoint file is either a raw ``state_dict`` (what MONAI bundles call ``models/model.pt``) or a dict
of state dicts, e.g. ``{"model": ..., "optimizer": ..., "scheduler": ..., "trainer": ...}``; the network
weights are found under ``"model"`` (or ``"network"``/``"state_dict"``) or at the top level.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import torch

from medunet.io.atomic import atomic_path
from medunet.io.errors import InputError

__all__ = ["save_checkpoint", "load_checkpoint", "extract_state_dict", "load_weights"]

_MODEL_KEYS = ("model", "network", "state_dict", "net")


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """Save ``obj`` (tensors, numbers, strings, nested dicts/lists only) atomically.

    The archive is built in memory and written with plain file writes, so a full disk, a file-size
    limit or a read-only folder surfaces as an ``OSError`` with its errno (``torch.save`` writing to a
    path turns those into an opaque ``RuntimeError`` from its C++ writer).
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(buffer.getbuffer())
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; :class:`InputError` names the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "checkpoint not found")
    if path.is_dir():
        raise InputError(path, "checkpoint path is a folder, expected a .pt file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty checkpoint file (0 bytes)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:160]
        raise InputError(path, f"truncated or corrupt checkpoint ({msg})") from None
    except pickle.UnpicklingError as e:
        msg = " ".join(str(e).split())[:160]
        raise InputError(path, f"refused to unpickle: not a plain weights file ({msg})") from None
    except Exception as e:
        raise InputError(path, f"cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise InputError(path, f"checkpoint holds a {type(obj).__name__}, expected a state dict")
    return obj


def extract_state_dict(checkpoint: dict) -> dict:
    """The network weights inside a checkpoint (raw state dict or under a ``model``-like key).

    Keys of a ``DistributedDataParallel``/``torch.compile`` wrapper (``module.``/``_orig_mod.``) are
    stripped.
    """
    for key in _MODEL_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    state = {}
    for k, v in checkpoint.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    return state


def load_weights(network: torch.nn.Module, path: str | os.PathLike, map_location="cpu") -> torch.nn.Module:
    """Load a checkpoint's weights into ``network`` strictly; mismatches name the file and the layers."""
    state = extract_state_dict(load_checkpoint(path, map_location))
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "checkpoint does not contain network weights")
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise InputError(path, f"checkpoint is for a different network ({type(network).__name__}): " + "; ".join(parts))
    network.load_state_dict(state, strict=True)
    return network
