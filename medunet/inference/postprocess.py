"""Postprocessing of label maps."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

__all__ = ["keep_largest_component"]


def keep_largest_component(label: np.ndarray | torch.Tensor, classes: Iterable[int] | None = None):
    """Keep only the largest connected component of each foreground class (others become 0).

    Args:
        label: integer label map ``(*S)`` (numpy or torch).
        classes: class values to clean (default: every non-zero value present).

    Returns:
        a label map of the same type, shape and dtype. Components are face-, edge- and corner-connected.
    """
    is_numpy = isinstance(label, np.ndarray)
    t = torch.as_tensor(np.asarray(label)) if is_numpy else label
    values = sorted(int(v) for v in torch.unique(t).tolist() if v != 0) if classes is None else list(classes)
    if values:
        keep = KeepLargestConnectedComponent(applied_labels=values, is_onehot=False, independent=True)
        t = keep(t.unsqueeze(0))[0]
        t = t.as_tensor() if hasattr(t, "as_tensor") else t
    if is_numpy:
        return t.cpu().numpy().astype(label.dtype, copy=False)
    return t.to(label.dtype)
