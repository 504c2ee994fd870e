"""Datalists: MSD and nnU-Net v2 dataset.json, folder pairing, deterministic k-fold splits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medunet.data.datalist import (
    case_id,
    dataset_labels,
    dataset_modalities,
    find_dataset_items,
    kfold_split,
    load_datalist,
    pair_folders,
    read_dataset_json,
)
from medunet.data.phantoms import generate_dataset
from medunet.io import InputError


def _touch(path: Path) -> Path:
    """Pairing looks at names only: a few bytes stand in for an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x1f\x8b")
    return path


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory) -> Path:
    return generate_dataset("mri", tmp_path_factory.mktemp("dl") / "mri", cases=4, size="small", test_cases=2)


def test_msd_training_and_test_sections(phantom_set):
    items = load_datalist(phantom_set)
    assert len(items) == 4
    for item in items:
        assert set(item) == {"image", "label"}
        assert os.path.isabs(item["image"]) and Path(item["image"]).is_file() and Path(item["label"]).is_file()
        assert Path(item["image"]).parent.name == "imagesTr" and "./" not in item["image"]
    test = load_datalist(phantom_set, "test")
    assert [Path(t["image"]).name for t in test] == ["mri_004.nii.gz", "mri_005.nii.gz"]
    assert all(set(t) == {"image"} for t in test)
    # the dataset.json file itself is accepted, and so is find_dataset_items on the folder
    assert load_datalist(phantom_set / "dataset.json") == items == find_dataset_items(phantom_set)
    meta = read_dataset_json(phantom_set)
    assert dataset_labels(meta) == {"background": 0, "anterior": 1, "posterior": 2}
    assert dataset_modalities(meta) == {0: "MRI"}


def test_extra_path_keys_and_other_sections(tmp_path):
    (tmp_path / "lists").mkdir()
    datalist = {
        "labels": {"0": "background", "1": "cell"},
        "training": [{"image": "../imgs/a.png", "label": "../lbls/a.png", "instance": "../inst/a.png", "weight": 2}],
        "validation": [{"image": "../imgs/b.png", "label": "../lbls/b.png"}],
    }
    (tmp_path / "lists" / "split.json").write_text(json.dumps(datalist))
    train = load_datalist(tmp_path / "lists" / "split.json")
    assert train == [{"image": str(tmp_path / "imgs/a.png"), "label": str(tmp_path / "lbls/a.png"),
                      "instance": str(tmp_path / "inst/a.png"), "weight": 2}]
    assert load_datalist(tmp_path / "lists" / "split.json", "validation")[0]["label"] == str(tmp_path / "lbls/b.png")
    with pytest.raises(InputError, match=r"split\.json: has no 'test2' list"):
        load_datalist(tmp_path / "lists" / "split.json", "test2")


def test_nnunet_v2_layout_with_channel_files(tmp_path):
    for case in ("brain_001", "brain_002"):
        for ch in (0, 1):
            _touch(tmp_path / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        _touch(tmp_path / "labelsTr" / f"{case}.nii.gz")
    _touch(tmp_path / "imagesTs" / "brain_003_0000.nii.gz")
    _touch(tmp_path / "imagesTs" / "brain_003_0001.nii.gz")
    _touch(tmp_path / "imagesTr" / "._brain_001_0000.nii.gz")  # macOS resource fork: ignored
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "FLAIR"}, "labels": {"background": 0, "tumour": 1},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    items = load_datalist(tmp_path)
    assert items[0] == {"image": [str(tmp_path / "imagesTr/brain_001_0000.nii.gz"),
                                  str(tmp_path / "imagesTr/brain_001_0001.nii.gz")],
                        "label": str(tmp_path / "labelsTr/brain_001.nii.gz")}
    assert len(load_datalist(tmp_path, "test")) == 1 and len(load_datalist(tmp_path, "test")[0]["image"]) == 2
    meta = read_dataset_json(tmp_path)
    assert dataset_labels(meta) == {"background": 0, "tumour": 1}
    assert dataset_modalities(meta) == {0: "T1", 1: "FLAIR"}
    assert case_id("x/brain_001_0001.nii.gz") == "brain_001"


def test_pair_folders_names_every_unpaired_file(tmp_path):
    for name in ("a", "b", "c"):
        _touch(tmp_path / "images" / f"{name}.nii.gz")
    _touch(tmp_path / "labels" / "a.nii.gz")
    _touch(tmp_path / "labels" / "z.nii")
    with pytest.raises(InputError) as err:
        pair_folders(tmp_path / "images", tmp_path / "labels")
    msg = str(err.value)
    assert str(tmp_path / "images") in msg and "\n" not in msg
    assert "2 image(s) without label: b, c" in msg and "1 label(s) without image: z" in msg
    _touch(tmp_path / "labels" / "b.nii")
    _touch(tmp_path / "labels" / "c.png")
    (tmp_path / "labels" / "z.nii").unlink()
    pairs = pair_folders(tmp_path / "images", tmp_path / "labels")
    assert [Path(p["label"]).name for p in pairs] == ["a.nii.gz", "b.nii", "c.png"]
    assert find_dataset_items(tmp_path) == pairs
    assert [set(p) for p in find_dataset_items(tmp_path, "test")] == [{"image", "label"}] * 3


def test_pair_folders_ids_channels_and_duplicates(tmp_path):
    # a case id that merely ends in four digits is not a channel when its label has the full name
    _touch(tmp_path / "img" / "case_0001.nii.gz")
    _touch(tmp_path / "lbl" / "case_0001.nii.gz")
    assert pair_folders(tmp_path / "img", tmp_path / "lbl")[0]["image"].endswith("case_0001.nii.gz")
    _touch(tmp_path / "img" / "case_0001.nii")
    with pytest.raises(InputError, match="duplicate id 'case_0001'"):
        pair_folders(tmp_path / "img", tmp_path / "lbl")
    # missing channel
    for name in ("p_0000", "p_0001", "q_0000"):
        _touch(tmp_path / "ch" / f"{name}.nii.gz")
    with pytest.raises(InputError, match=r"q: case has channel\(s\) \[0\], expected 0…1"):
        pair_folders(tmp_path / "ch")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        pair_folders(tmp_path / "empty")
    with pytest.raises(InputError, match="not a dataset"):
        find_dataset_items(tmp_path / "empty")
    with pytest.raises(InputError, match="dataset not found"):
        find_dataset_items(tmp_path / "nowhere")


@pytest.mark.parametrize("content, reason", [
    (None, "dataset.json not found"),
    ("{ not json", "invalid JSON at line 1"),
    ("[1, 2]", "expected a JSON object"),
    ('{"labels": {"0": "background", "1": "a", "2": "a"}}', "label name 'a' is used twice"),
    ('{"labels": {"1": "liver"}}', "no background"),
    ('{"labels": {"background": 0, "tumour": [1, 2]}}', "region"),
    ('{"labels": {"0": "background"}, "training": {"image": "x"}}', "'training' must be a list"),
    ('{"labels": {"0": "background"}, "training": [{"image": "x.nii.gz"}]}', r"training\[0\] has no 'label'"),
])
def test_bad_dataset_json_is_one_clear_line(tmp_path, content, reason):
    if content is not None:
        (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(InputError, match=reason) as err:
        load_datalist(tmp_path)
    assert str(err.value).startswith(str(tmp_path / "dataset.json") + ": ")


def test_kfold_split_is_a_deterministic_partition():
    items = [{"image": f"/d/case_{i:03d}.nii.gz", "label": f"/l/case_{i:03d}.nii.gz"} for i in range(23)]
    vals = []
    for fold in range(5):
        train, val = kfold_split(items, 5, fold, seed=7)
        assert len(train) + len(val) == 23 and len(val) in (4, 5)
        assert not {v["image"] for v in val} & {t["image"] for t in train}
        vals += [v["image"] for v in val]
        assert kfold_split(list(reversed(items)), 5, fold, seed=7) == (train, val), "order-independent"
    assert sorted(vals) == sorted(i["image"] for i in items)
    assert kfold_split(items, 5, 0, seed=7)[1] != kfold_split(items, 5, 0, seed=8)[1]
    for bad in ({"n_folds": 1}, {"n_folds": 30}, {"fold": 5}, {"fold": -1}):
        with pytest.raises(ValueError):
            kfold_split(items, **{"n_folds": 5, "fold": 0, **bad})


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(2, 10), seed=st.integers(0, 1000))
def test_kfold_split_property(n, k, seed):
    k = min(k, n)
    items = [{"image": f"/x/{i}.nii.gz"} for i in range(n)]
    seen = []
    for fold in range(k):
        train, val = kfold_split(items, k, fold, seed)
        assert val and len(train) == n - len(val)
        seen += [v["image"] for v in val]
    assert sorted(seen) == sorted(i["image"] for i in items)
    sizes = [len(kfold_split(items, k, f, seed)[1]) for f in range(k)]
    assert max(sizes) - min(sizes) <= 1


def test_hippocampus_dataset_json_matches_its_folders(hippocampus_dir):
    listed = load_datalist(hippocampus_dir)
    paired = pair_folders(hippocampus_dir / "imagesTr", hippocampus_dir / "labelsTr")
    assert len(listed) == 195
    assert sorted(i["image"] for i in listed) == [p["image"] for p in paired]
    assert dataset_labels(read_dataset_json(hippocampus_dir)) == {"background": 0, "anterior": 1, "posterior": 2}
