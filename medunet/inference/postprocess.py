"""Postprocessing of label maps."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from scipy import ndimage

__all__ = ["keep_largest_component"]


def keep_largest_component(label: np.ndarray | torch.Tensor, classes: Iterable[int] | None = None):
    """Keep only the largest connected component of each foreground class (the rest becomes 0).

    Args:
        label: integer label map ``(*S)`` (numpy or torch), 2D or 3D.
        classes: class values to clean (default: every non-zero value present).

    Returns:
        a label map of the same type, shape and dtype. Components are face-, edge- and
        corner-connected (full connectivity, as MONAI's ``KeepLargestConnectedComponent``).
    """
    is_tensor = isinstance(label, torch.Tensor)
    arr = label.detach().cpu().numpy() if is_tensor else np.asarray(label)
    out = arr.copy()
    values = [int(v) for v in np.unique(arr) if v != 0] if classes is None else [int(c) for c in classes]
    structure = np.ones((3,) * arr.ndim, dtype=bool)
    for value in values:
        components, n = ndimage.label(arr == value, structure=structure)
        if n > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[(components != 0) & (components != int(np.argmax(sizes)))] = 0
    if is_tensor:
        return torch.from_numpy(out).to(label.device)
    return out
