"""The seed's border weight map w = w_c + w0·exp(−(d1+d2)²/2σ²) and the weighted cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from scipy import ndimage

from medunet.data.weightmap import BorderWeightMapd, border_weight_map, class_weight_map
from medunet.engines.losses import WeightedCrossEntropyLoss


def _two_squares(gap: int = 0, size: int = 64):
    inst = np.zeros((size, size), dtype=np.int64)
    inst[10:30, 10:30] = 1
    inst[10:30, 30 + gap:50 + gap] = 2
    return inst


def _naive(instances, w0=10.0, sigma=5.0):
    """Reference: every object's full distance transform, sorted per pixel."""
    ids = [i for i in np.unique(instances) if i != 0]
    d = np.sort(np.stack([ndimage.distance_transform_edt(instances != i) for i in ids]), axis=0)
    wc = class_weight_map((instances > 0).astype(int))
    return wc + w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))


def test_touching_instances_get_wc_plus_w0_and_far_away_wc():
    inst = _two_squares(gap=0)
    w = border_weight_map(inst, kind="instances")
    wc = class_weight_map((inst > 0).astype(int))
    # voxels on either side of the contact: d1 = 0, d2 = 1 → w0·exp(−1/50) ≈ 0.98·w0
    for y in (29, 30):
        assert w[20, y] == pytest.approx(wc[20, y] + 10.0, abs=0.3)
    assert w[60, 3] == pytest.approx(wc[60, 3], abs=1e-6)  # far from both squares
    assert w[60, 3] != pytest.approx(wc[20, 20])  # w_c differs per class (balanced)


def test_gap_between_components_of_a_semantic_label():
    label = (_two_squares(gap=1) > 0).astype(np.int64)  # one column of background between them
    w = border_weight_map(label)
    wc = class_weight_map(label)
    assert w[20, 30] == pytest.approx(wc[20, 30] + 10.0 * np.exp(-4 / 50), abs=1e-4)  # d1 = d2 = 1
    assert w[20, 30] > wc[20, 30] + 9.0
    assert w[62, 62] == pytest.approx(wc[62, 62], abs=1e-3)
    # background_only: the term is added in the gaps only
    w_bg = border_weight_map(label, background_only=True)
    assert w_bg[20, 29] == pytest.approx(wc[20, 29]) and w_bg[20, 30] == pytest.approx(w[20, 30])


def test_touching_same_class_needs_instances():
    inst = _two_squares(gap=0)
    semantic = (inst > 0).astype(np.int64)
    merged = border_weight_map(semantic)  # one connected component → no border term
    np.testing.assert_allclose(merged, class_weight_map(semantic))
    separated = border_weight_map(semantic, instances=inst)
    assert separated[20, 29] > merged[20, 29] + 9.0


def test_matches_the_formula_on_random_instances():
    rng = np.random.default_rng(0)
    inst = np.zeros((80, 70), dtype=np.int64)
    for k in range(1, 9):
        y, x = rng.integers(0, 60, 2)
        inst[y:y + rng.integers(4, 15), x:x + rng.integers(4, 15)] = k
    w = border_weight_map(inst, kind="instances")
    np.testing.assert_allclose(w, _naive(inst), atol=1e-4)


def test_3d_and_single_object():
    lab = np.zeros((20, 20, 12), dtype=np.int64)
    lab[2:8, 2:8, 2:8] = 1
    np.testing.assert_allclose(border_weight_map(lab), class_weight_map(lab))
    lab[9:15, 2:8, 2:8] = 1
    w = border_weight_map(lab)
    assert w.shape == lab.shape and w[8, 5, 5] > class_weight_map(lab)[8, 5, 5] + 9.0


def test_class_weights():
    label = np.zeros((10, 10), dtype=np.int64)
    label[:2] = 1
    wc = class_weight_map(label)
    assert wc.mean() == pytest.approx(1.0)  # 'balanced' keeps the mean weight at 1
    assert wc[0, 0] / wc[5, 5] == pytest.approx(80 / 20)
    assert np.all(class_weight_map(label, None) == 1)
    custom = class_weight_map(label, {1: 3.0})
    assert custom[0, 0] == 3.0 and custom[5, 5] == 1.0
    with pytest.raises(ValueError, match="class_weights"):
        class_weight_map(label, "inverse")


def test_dict_transform_with_instance_key():
    inst = _two_squares(gap=0)
    data = {"label": MetaTensor(torch.as_tensor((inst > 0)[None], dtype=torch.float32)),
            "inst": torch.as_tensor(inst[None])}
    out = BorderWeightMapd("label", instance_key="inst")(data)
    assert isinstance(out["weight"], MetaTensor) and out["weight"].shape == (1, 64, 64)
    wc = float(class_weight_map(inst > 0)[20, 29])
    assert float(out["weight"][0, 20, 29]) > wc + 9.0
    no_inst = BorderWeightMapd("label")(data)
    assert float(no_inst["weight"][0, 20, 29]) == pytest.approx(wc)


def test_weighted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 8, 8)).float()
    ones = torch.ones(2, 1, 8, 8)
    loss = WeightedCrossEntropyLoss()
    plain = F.cross_entropy(logits, target[:, 0].long())
    assert loss(logits, target, ones).item() == pytest.approx(plain.item(), rel=1e-6)
    assert loss(logits, target).item() == pytest.approx(plain.item(), rel=1e-6)
    assert loss(logits, target, 3 * ones).item() == pytest.approx(3 * plain.item(), rel=1e-6)
    weight = torch.rand(2, 1, 8, 8) + 0.5
    per_voxel = F.cross_entropy(logits, target[:, 0].long(), reduction="none")
    assert WeightedCrossEntropyLoss("weighted_mean")(logits, target, weight).item() == pytest.approx(
        ((per_voxel * weight[:, 0]).sum() / weight.sum()).item(), rel=1e-5)
    loss(logits, target, weight).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_weighted_cross_entropy_crops_target_for_valid_networks():
    logits = torch.randn(1, 2, 6, 6)
    target = torch.randint(0, 2, (1, 1, 10, 10))
    weight = torch.rand(1, 1, 10, 10)
    out = WeightedCrossEntropyLoss("none")(logits, target, weight)
    expected = F.cross_entropy(logits, target[:, 0, 2:8, 2:8], reduction="none") * weight[:, 0, 2:8, 2:8]
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="cannot centre-crop"):
        WeightedCrossEntropyLoss()(torch.randn(1, 2, 12, 12), target)
