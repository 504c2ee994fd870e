"""In-memory cached cases, the grid_sample patch dataset and its sample stream (medunet.data.cached)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.data import Plan
from medunet.data.cached import (
    AugmentConfig,
    CachedCase,
    PatchDataset,
    SampleStream,
    _integer_crop,
    cache_cases,
)
from medunet.data.datalist import every_nth_split
from medunet.io import InputError


def _case(shape=(9, 11, 7), seed=0) -> CachedCase:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((1, *shape), generator=g)
    label = torch.randint(0, 3, (1, *shape), generator=g, dtype=torch.uint8)
    return CachedCase("c", image, label, "img", "lab", (1.0, 1.0, 1.0))


def _draw(dataset: PatchDataset, n: int, start: int = 0):
    """Samples ``start … start + n − 1`` as a batch."""
    return dataset.batch(range(start, start + n))


def _find_crop(volume: torch.Tensor, patch: torch.Tensor) -> bool:
    """Is ``patch`` (C, *P) equal to ``_integer_crop(volume, start)`` for some (possibly negative) start?"""
    shape, p = volume.shape[1:], patch.shape[1:]
    ranges = [range(min(0, s - q), max(0, s - q) + 1) for s, q in zip(shape, p)]
    for a in ranges[0]:
        for b in ranges[1]:
            for c in ranges[2]:
                if torch.allclose(_integer_crop(volume, (a, b, c), p), patch, atol=1e-5):
                    return True
    return False


def test_every_nth_split_is_deterministic_and_disjoint():
    items = [{"image": f"i{i}", "label": f"l{i}"} for i in range(12)]
    train, val = every_nth_split(items, 5)
    assert [v["image"] for v in val] == ["i4", "i9"]
    assert len(train) == 10 and not {t["image"] for t in train} & {v["image"] for v in val}
    with pytest.raises(ValueError):
        every_nth_split(items, 1)


def test_integer_crop_pads_with_zeros_and_crops():
    x = torch.arange(1, 1 + 4 * 5 * 3, dtype=torch.float32).reshape(1, 4, 5, 3)
    out = _integer_crop(x, (-1, 1, 0), (6, 3, 3))
    assert out.shape == (1, 6, 3, 3)
    assert torch.equal(out[:, 1:5], x[:, :, 1:4])
    assert float(out[:, 0].abs().sum()) == 0 and float(out[:, 5].abs().sum()) == 0


def test_patches_without_augmentation_returns_exact_crops_and_pads():
    big, small = _case((9, 11, 7), 0), _case((4, 5, 3), 1)
    for case in (big, small):
        image, label = _draw(PatchDataset([case], (6, 6, 6), augment=AugmentConfig.none(), seed=3), 3)
        assert image.shape == (3, 1, 6, 6, 6) and label.shape == (3, 1, 6, 6, 6)
        assert image.dtype == torch.float32 and label.dtype == torch.int64
        for b in range(3):
            assert _find_crop(case.image, image[b])
            assert _find_crop(case.label.float(), label[b].float())
    # a small case is wholly inside every patch
    image, label = _draw(PatchDataset([small], (6, 6, 6), AugmentConfig.none(), seed=0), 2)
    assert int((label > 0).sum()) == 2 * int((small.label > 0).sum())


def test_grid_path_matches_integer_crop_and_rotates_the_right_axes():
    case = _case((8, 10, 6), 2)
    patch = (8, 10, 6)
    # a negligible rotation takes the grid_sample path but must reproduce the volume itself
    aug = AugmentConfig.none()
    aug.p_rotation, aug.rotation = 1.0, 1e-7
    image, label = _draw(PatchDataset([case], patch, aug, seed=0), 1)
    assert torch.allclose(image[0], case.image, atol=1e-4)
    assert torch.equal(label[0], case.label.long())

    # a 90° rotation in the (axis0, axis1) plane of a square patch equals torch.rot90 of the volume
    sq = _case((6, 6, 4), 4)
    dataset = PatchDataset([sq], (6, 6, 4), AugmentConfig.none(), seed=0)
    dataset._matrix = lambda rng: torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    image, label = _draw(dataset, 1)
    candidates = [torch.rot90(sq.label.long(), k, dims=(1, 2)) for k in (1, 3)]
    assert any(torch.equal(label[0], c) for c in candidates)
    assert not torch.equal(label[0], sq.label.long())


def test_full_augmentation_keeps_labels_valid_and_is_reproducible():
    cases = [_case((9, 11, 7), i) for i in range(3)]
    aug = AugmentConfig(p_rotation=1.0, p_scale=1.0, p_gamma=1.0, p_noise=1.0)
    a = PatchDataset(cases, (8, 8, 8), aug, seed=7)
    b = PatchDataset(cases, (8, 8, 8), aug, seed=7)
    for step in range(3):
        # sample k is a function of (seed, k): the same in any order and in any copy of the dataset
        (ia, la), (ib, lb) = _draw(a, 4, 4 * step), b.batch(list(reversed(range(4 * step, 4 * step + 4))))
        assert torch.equal(ia, ib.flip(0)) and torch.equal(la, lb.flip(0))
        assert set(la.unique().tolist()) <= {0, 1, 2}
        assert torch.isfinite(ia).all()


def test_foreground_oversampling_finds_small_structures_in_large_volumes():
    # one 2³ blob of class 2 and one of class 1 in a 40³ volume: a uniform 8³ patch rarely sees either
    image = torch.zeros(1, 40, 40, 40)
    label = torch.zeros(1, 40, 40, 40, dtype=torch.uint8)
    label[0, 3:5, 30:32, 17:19] = 2
    label[0, 36:38, 2:4, 37:39] = 1  # near a corner: the clamped patch must still contain it
    case = CachedCase("blob", image, label, "i", "l")

    def fraction_with(cls, fg):
        dataset = PatchDataset([case], (8, 8, 8), AugmentConfig.none(), seed=0, foreground_fraction=fg)
        hits = [bool((dataset[k]["label"] == cls).any()) for k in range(200)]
        return sum(hits) / len(hits)

    for cls in (1, 2):
        assert fraction_with(cls, 0.0) < 0.05
        # about half of the forced samples pick each class, and the picked class is always inside
        assert 0.3 < fraction_with(cls, 1.0) < 0.7
    assert 0.1 < fraction_with(2, 0.33) < 0.3
    # a case without foreground falls back to uniform placement
    empty = CachedCase("empty", image, torch.zeros_like(label), "i", "l")
    empty_set = PatchDataset([empty], (8, 8, 8), AugmentConfig.none(), foreground_fraction=1.0)
    assert _draw(empty_set, 2)[0].shape == (2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="foreground_fraction"):
        PatchDataset([case], (8, 8, 8), foreground_fraction=1.5)


def test_patches_2d_and_rejects_mismatched_dims():
    g = torch.Generator().manual_seed(0)
    case = CachedCase("c2", torch.randn(1, 12, 9, generator=g), torch.randint(0, 2, (1, 12, 9), generator=g, dtype=torch.uint8), "i", "l")
    aug = AugmentConfig(p_rotation=1.0, mirror_axes=(0, 1))
    image, label = _draw(PatchDataset([case], (8, 8), aug, seed=1), 2)
    assert image.shape == (2, 1, 8, 8) and label.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="spatial dimensions"):
        PatchDataset([case], (8, 8, 8))
    with pytest.raises(ValueError, match="at least one case"):
        PatchDataset([], (8, 8))


def _write_case(folder, name, shape, label_max=2, seed=0):
    rng = np.random.default_rng(seed)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    img = (rng.random(shape) * 1000 + 50).astype(np.float32)
    lab = rng.integers(0, label_max + 1, shape).astype(np.uint8)
    nib.save(nib.Nifti1Image(img, np.eye(4)), folder / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), folder / "labelsTr" / f"{name}.nii.gz")
    return {"image": str(folder / "imagesTr" / f"{name}.nii.gz"), "label": str(folder / "labelsTr" / f"{name}.nii.gz")}


def test_cache_cases_normalises_like_the_plan_and_skips_bad_files(tmp_path):
    plan = Plan(labels={"background": 0, "a": 1, "b": 2}, modality="MRI", target_spacing=[1.0, 1.0, 1.0],
                normalization={"scheme": "zscore", "nonzero": False}, patch_size=[8, 8, 8])
    good = _write_case(tmp_path, "case_1", (10, 12, 8))
    bad_label = _write_case(tmp_path, "case_2", (10, 12, 8), label_max=5, seed=1)
    broken = {"image": str(tmp_path / "imagesTr" / "case_3.nii.gz"), "label": good["label"]}
    (tmp_path / "imagesTr" / "case_3.nii.gz").write_bytes(b"not a nifti")
    errors = []
    cases = cache_cases([good, bad_label, broken], plan, on_error=errors.append)
    assert [c.case_id for c in cases] == ["case_1"]
    assert len(errors) == 2 and all(isinstance(e, InputError) for e in errors)
    assert "case_2" in str(errors[0]) and "label values" in str(errors[0])
    assert "case_3" in str(errors[1])
    c = cases[0]
    assert c.image.shape == (1, 10, 12, 8) and c.label.dtype == torch.uint8
    assert abs(float(c.image.mean())) < 1e-4 and math.isclose(float(c.image.std(unbiased=False)), 1.0, rel_tol=1e-3)
    assert c.spacing == (1.0, 1.0, 1.0)
    with pytest.raises(InputError):
        cache_cases([broken], plan)


def test_sample_stream_gives_each_rank_its_own_samples_and_resumes_at_a_step():
    one = SampleStream(batch_size=2, rank=0, world_size=1)
    it = iter(one)
    assert [next(it) for _ in range(6)] == [0, 1, 2, 3, 4, 5]
    ranks = [iter(SampleStream(batch_size=2, rank=r, world_size=2)) for r in (0, 1)]
    steps = [[next(r) for _ in range(4)] for r in ranks]
    assert steps == [[0, 1, 4, 5], [2, 3, 6, 7]]  # step 0: rank 0 → 0,1; rank 1 → 2,3; step 1: 4,5 / 6,7
    resumed = SampleStream(batch_size=2, rank=0, world_size=1)
    resumed.start_step = 2
    assert next(iter(resumed)) == 4
    with pytest.raises(ValueError):
        SampleStream(batch_size=0)


def test_dataloader_workers_draw_the_same_batches_as_the_main_process():
    cases = [_case((9, 11, 7), i) for i in range(3)]
    dataset = PatchDataset(cases, (8, 8, 8), AugmentConfig(p_rotation=0.5, p_noise=0.5), seed=3)
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=SampleStream(2, rank=0, world_size=1),
                                             num_workers=workers)
        it = iter(loader)
        batches[workers] = [next(it) for _ in range(3)]
        del it
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
