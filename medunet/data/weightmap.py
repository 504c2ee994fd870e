"""The seed U-Net's border weight map (the weighted cross-entropy that uses it lives in
:mod:`medunet.engines.losses`).

Ronneberger et al. (2015): ``w(x) = w_c(x) + w0 · exp(−(d1(x) + d2(x))² / (2σ²))`` where ``w_c`` balances
class frequencies and ``d1``/``d2`` are the distances to the nearest and second-nearest object. The
border term makes the thin background gaps between touching objects expensive to get wrong.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

__all__ = ["border_weight_map", "class_weight_map", "BorderWeightMapd"]


def class_weight_map(label: np.ndarray, class_weights: str | Mapping[int, float] | None = "balanced") -> np.ndarray:
    """``w_c``: a weight per voxel from its class.

    Args:
        label: semantic label, any shape, integer values.
        class_weights: ``"balanced"`` (``N / (K · n_c)`` for the ``K`` classes present, as scikit-learn's
            ``class_weight="balanced"``), a ``{class value: weight}`` mapping (missing classes get 1),
            or ``None`` (all ones).
    """
    label = np.asarray(label)
    if class_weights is None:
        return np.ones(label.shape, dtype=np.float32)
    values, counts = np.unique(label, return_counts=True)
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be 'balanced', a mapping or None, got {class_weights!r}")
        table = {v: label.size / (len(values) * c) for v, c in zip(values.tolist(), counts.tolist())}
    else:
        table = {v: float(class_weights.get(int(v), 1.0)) for v in values.tolist()}
    out = np.ones(label.shape, dtype=np.float32)
    for v, w in table.items():
        out[label == v] = w
    return out


def _objects(label: np.ndarray, instances: np.ndarray | None, kind: str, connectivity: int) -> np.ndarray:
    """Instance map (0 = background) from explicit instances, an instance map, or connected components."""
    if instances is not None:
        instances = np.asarray(instances)
        if instances.shape != label.shape:
            raise ValueError(f"instances shape {instances.shape} does not match label shape {label.shape}")
        return instances.astype(np.int64)
    if kind == "instances":
        return label.astype(np.int64)
    if kind != "semantic":
        raise ValueError(f"kind must be 'semantic' or 'instances', got {kind!r}")
    structure = ndimage.generate_binary_structure(label.ndim, connectivity)
    out = np.zeros(label.shape, dtype=np.int64)
    offset = 0
    for value in np.unique(label):
        if value == 0:
            continue
        comps, n = ndimage.label(label == value, structure=structure)
        out[comps > 0] = comps[comps > 0] + offset
        offset += n
    return out


def border_weight_map(
    label_or_instances: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: str | Mapping[int, float] | None = "balanced",
    *,
    instances: np.ndarray | None = None,
    kind: str = "semantic",
    spacing: Sequence[float] | None = None,
    background_only: bool = False,
    connectivity: int = 1,
) -> np.ndarray:
    """The seed's weight map ``w = w_c + w0 · exp(−(d1 + d2)² / 2σ²)``.

    Args:
        label_or_instances: ``(*S)`` (2D or 3D; a leading channel of 1 is allowed) semantic label
            (``kind="semantic"``, objects = connected components of each class) or an instance map
            (``kind="instances"``: 0 background, one id per object; classes = id > 0).
        w0, sigma: border weight and its width (in voxels, or mm with ``spacing``).
        class_weights: see :func:`class_weight_map`.
        instances: optional instance map for a semantic label (touching objects of one class are
            only separable with it).
        spacing: voxel size for the distance transforms (default 1 per axis).
        background_only: add the border term only on background voxels (the gaps); by default
            (``False``) it applies everywhere, as the formula reads — so the boundary voxels of two
            touching instances (``d1 = 0``, ``d2 = 1``) get ≈ ``w_c + w0`` too.
        connectivity: neighbourhood for connected components (1 = faces only).

    Returns:
        float32 array, same shape as the input. With fewer than two objects the border term is 0.
    """
    arr = np.asarray(label_or_instances)
    squeeze = arr.ndim in (3, 4) and arr.shape[0] == 1
    label = arr[0] if squeeze else arr
    inst = None if instances is None else np.asarray(instances)
    if inst is not None and inst.ndim == label.ndim + 1 and inst.shape[0] == 1:
        inst = inst[0]
    label = np.rint(label).astype(np.int64)
    objects = _objects(label, inst, kind, connectivity)
    semantic = (label > 0).astype(np.int64) if (kind == "instances" and inst is None) else label
    weight = class_weight_map(semantic, class_weights)
    ids = np.unique(objects)
    ids = ids[ids != 0]
    if len(ids) >= 2 and w0 != 0:
        d1, d2 = _two_nearest_distances(objects, ids, _border_reach(w0, sigma), spacing)
        border = float(w0) * np.exp(-((d1 + d2) ** 2) / (2.0 * float(sigma) ** 2))
        if background_only:
            border[objects != 0] = 0.0
        weight = weight + border.astype(np.float32)
    return weight[None] if squeeze else weight


def _border_reach(w0: float, sigma: float, tolerance: float = 1e-6) -> float:
    """Distance beyond which the border term ``w0·exp(−d²/2σ²)`` is below ``tolerance``."""
    return float(sigma) * float(np.sqrt(2.0 * np.log(max(abs(float(w0)) / tolerance, 1.0 + 1e-9))))


def _two_nearest_distances(objects: np.ndarray, ids: np.ndarray, reach: float,
                           spacing: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel, the distances to the nearest and second-nearest object (``inf`` beyond ``reach``).

    Each object's distance transform is computed only in its bounding box grown by ``reach``: voxels
    farther away cannot have ``d1 + d2 < reach``, where the border term is negligible.
    """
    sampling = np.ones(objects.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    margin = np.ceil(reach / sampling).astype(int) + 1
    d1 = np.full(objects.shape, np.inf, dtype=np.float32)
    d2 = np.full(objects.shape, np.inf, dtype=np.float32)
    boxes = ndimage.find_objects(objects)
    for i in ids:
        box = boxes[int(i) - 1] if int(i) - 1 < len(boxes) else None
        if box is None:
            continue
        region = tuple(slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(box, margin, objects.shape))
        d = ndimage.distance_transform_edt(objects[region] != i, sampling=sampling).astype(np.float32)
        d[d > reach] = np.inf
        r1, r2 = d1[region], d2[region]
        closer = d < r1
        d2[region] = np.where(closer, r1, np.minimum(r2, d))
        d1[region] = np.where(closer, d, r1)
    return d1, d2


class BorderWeightMapd(MapTransform):
    """Dictionary transform adding ``data[output_key] = border_weight_map(data[key])``, shape ``(1, *S)``.

    Args:
        keys: the semantic label key (``(1, *S)``).
        instance_key: optional key of an instance map (``(1, *S)``); otherwise connected components.
        output_key: where to store the weight map (float32, ``MetaTensor`` when the label is one).
        w0, sigma, class_weights, spacing, background_only: see :func:`border_weight_map`.
    """

    def __init__(self, keys: KeysCollection = "label", instance_key: str | None = None, output_key: str = "weight",
                 w0: float = 10.0, sigma: float = 5.0, class_weights: str | Mapping[int, float] | None = "balanced",
                 spacing: Sequence[float] | None = None, background_only: bool = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("BorderWeightMapd takes one label key")
        self.instance_key = instance_key
        self.output_key = output_key
        self.options = dict(w0=w0, sigma=sigma, class_weights=class_weights, spacing=spacing,
                            background_only=background_only)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            inst = d.get(self.instance_key) if self.instance_key else None
            lab_np = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
            inst_np = None
            if inst is not None:
                inst_np = inst.detach().cpu().numpy() if isinstance(inst, torch.Tensor) else np.asarray(inst)
            w = torch.as_tensor(border_weight_map(lab_np, instances=inst_np, **self.options))
            if isinstance(label, MetaTensor):
                w = MetaTensor(w, meta=label.meta, applied_operations=list(label.applied_operations))
            d[self.output_key] = w
        return d
