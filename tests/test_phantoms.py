"""Phantom generator: layout, determinism, realistic intensities and geometry, learnable structures."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medunet.cli import main
from medunet.data.phantoms import generate_case, generate_dataset
from medunet.io import read_image


def _world_centroid(case, value: int) -> np.ndarray:
    idx = np.argwhere(case.label == value).mean(axis=0)
    return (case.affine @ np.append(idx, 1.0))[:3]


def _visible_border(image: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the voxels just outside ``mask`` (a 2-voxel shell) whose locally averaged intensity
    differs from the structure's median by more than 2 robust standard deviations of its core."""
    smooth = ndimage.uniform_filter(image.astype(np.float32), size=3)
    core = ndimage.binary_erosion(mask)
    core = core if core.sum() >= 20 else mask
    shell = ndimage.binary_dilation(mask, iterations=2) & ~mask
    inside = smooth[core]
    median = np.median(inside)
    spread = 1.4826 * np.median(np.abs(inside - median)) + 1e-6
    return float(np.mean(np.abs(smooth[shell] - median) > 2 * spread))


# --------------------------------------------------------------------------------------------------
def test_ct_dataset_layout_json_and_determinism(tmp_path):
    root = generate_dataset("ct", tmp_path / "a", cases=2, seed=3, size="small", test_cases=1)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "kidney", "3": "spleen"}
    assert meta["numTraining"] == 2 and meta["numTest"] == 1 and meta["tensorImageSize"] == "3D"
    assert meta["training"][0] == {"image": "./imagesTr/ct_000.nii.gz", "label": "./labelsTr/ct_000.nii.gz"}
    assert meta["test"] == ["./imagesTs/ct_002.nii.gz"]
    assert (root / "labelsTs" / "ct_002.nii.gz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"

    again = generate_dataset("ct", tmp_path / "b", cases=2, seed=3, size="small", test_cases=1)
    other = generate_dataset("ct", tmp_path / "c", cases=1, seed=4, size="small", test_cases=0)
    for rel in ("imagesTr/ct_000.nii.gz", "labelsTr/ct_000.nii.gz", "imagesTs/ct_002.nii.gz"):
        a, b = nib.load(root / rel), nib.load(again / rel)
        np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
        np.testing.assert_array_equal(a.affine, b.affine)
    assert not np.array_equal(nib.load(root / "imagesTr/ct_000.nii.gz").get_fdata(),
                              nib.load(other / "imagesTr/ct_000.nii.gz").get_fdata())
    # stored dtypes are what scanners / annotators write
    assert nib.load(root / "imagesTr/ct_000.nii.gz").get_data_dtype() == np.int16
    assert nib.load(root / "labelsTr/ct_000.nii.gz").get_data_dtype() == np.uint8


def test_case_does_not_depend_on_number_of_cases():
    a = generate_case("mri", 1, seed=0, size="small")
    b = generate_case("mri", 1, seed=0, size="small")
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, generate_case("mri", 2, seed=0, size="small").image)


def test_ct_intensities_spacing_orientations_and_anatomy():
    cases = [generate_case("ct", i, seed=0, size="small") for i in range(8)]
    axcodes, oblique, visible = set(), 0, []
    for case in cases:
        hu, label = case.image.astype(np.float32), case.label
        assert case.image.dtype == np.int16 and label.shape == hu.shape
        assert set(np.unique(label)) == {0, 1, 2, 3}, "liver, kidneys and spleen all present"
        assert np.mean(hu < -900) > 0.05, "air around the body"
        fat = np.median(hu[(hu > -200) & (hu < -30)])
        assert -120 < fat < -80, fat
        assert np.mean(hu > 400) > 0.001, "bone (spine, ribs)"
        for v in (1, 2, 3):
            organ = float(np.median(hu[label == v]))
            assert 40 < organ < 230, (v, organ)
            visible.append(_visible_border(hu, label == v))
            assert visible[-1] > 0.6, f"organ {v}: only {visible[-1]:.0%} of its border is visible"
        sizes = [int((label == v).sum()) for v in (1, 2, 3)]
        assert sizes[0] > sizes[1] and sizes[0] > sizes[2], "the liver is the largest organ"
        spacing = sorted(np.linalg.norm(case.affine[:3, :3], axis=0))
        assert 0.6 <= spacing[0] <= spacing[1] <= 0.9 and 2.5 <= spacing[2] <= 5.0, spacing
        axcodes.add("".join(nib.aff2axcodes(case.affine)))
        oblique += bool(case.info["oblique"])
        # Whatever the voxel order or obliquity: liver on the patient's right (+x in RAS), spleen on the
        # left, kidneys posterior (−y) of the liver.
        liver, kidney, spleen = (_world_centroid(case, v) for v in (1, 2, 3))
        assert liver[0] > spleen[0] and kidney[1] < liver[1], (case.info, liver, spleen, kidney)
    assert np.mean(visible) > 0.85, "organs stand out from their surroundings"
    assert len(axcodes) >= 3, axcodes
    assert oblique >= 1
    organ_sizes = [int((c.label == 1).sum()) for c in cases]
    assert max(organ_sizes) > 1.2 * min(organ_sizes), "organ size varies between cases"


def test_ct_default_and_explicit_sizes():
    case = generate_case("ct", 2, seed=0, size="default")
    n_inplane = sorted(case.image.shape)[1:]
    assert all(256 <= n <= 512 for n in n_inplane), case.image.shape
    assert case.info["shape"][2] * case.info["spacing"][2] >= 150  # a real abdominal z extent
    explicit = generate_case("ct", 0, seed=0, size=(40, 36, 12))
    assert sorted(explicit.image.shape) == [12, 36, 40]
    with pytest.raises(ValueError, match="size"):
        generate_case("ct", 0, size=(40, 36))


def test_mri_scale_bias_noise_and_hippocampus():
    cases = [generate_case("mri", i, seed=0, size="small") for i in range(4)]
    medians = [float(np.median(c.image)) for c in cases]
    assert max(medians) > 2 * min(medians), f"intensity scale should vary per case: {medians}"
    for case in cases:
        assert case.image.shape == (32, 40, 32) and case.image.dtype == np.float32
        assert case.image.min() >= 0, "Rician (magnitude) noise is non-negative"
        np.testing.assert_allclose(np.linalg.norm(case.affine[:3, :3], axis=0), 1.0, atol=0.11)
        anterior, posterior = _world_centroid(case, 1), _world_centroid(case, 2)
        assert anterior[1] > posterior[1], "label 1 is anterior (+y in RAS)"
        fraction = float(np.mean(case.label > 0))
        assert 0.005 < fraction < 0.15, fraction
        assert _visible_border(case.image, case.label > 0) > 0.6  # it also borders grey matter
    default = generate_case("mri", 0, size="default")
    assert 34 <= default.image.shape[0] <= 43 and 47 <= default.image.shape[1] <= 58


def test_cells_touch_with_gaps_and_instances(tmp_path):
    case = generate_case("cells", 0, seed=1, size="small")
    inst, label = case.instances, case.label
    assert inst.shape == label.shape == case.image.shape == (96, 96)
    np.testing.assert_array_equal(label, (inst > 0).astype(np.uint8))
    ids = np.unique(inst[inst > 0])
    assert len(ids) >= 5 and ids.max() == len(ids), "instances are numbered 1…N"
    # no two different cells share an edge: there is always a background gap between them
    for a, b in ((inst[1:, :], inst[:-1, :]), (inst[:, 1:], inst[:, :-1])):
        assert not np.any((a > 0) & (b > 0) & (a != b))
    # ...but many cells come within 3 pixels of another: the thin gaps the weight map is for
    near = sum(bool(np.any(np.isin(inst[ndimage.binary_dilation(inst == i, iterations=3)], [0, i], invert=True)))
               for i in ids)
    assert near >= len(ids) // 3, (near, len(ids))

    root = generate_dataset("cells", tmp_path / "png", cases=1, size="small", fmt="png", test_cases=0)
    entry = json.loads((root / "dataset.json").read_text(encoding="utf-8"))["training"][0]
    assert entry["instance"] == "./instancesTr/cells_000.png"
    img = read_image(root / entry["image"])
    np.testing.assert_array_equal(img.array, generate_case("cells", 0, size="small").image)
    np.testing.assert_array_equal(read_image(root / entry["instance"]).array,
                                  generate_case("cells", 0, size="small").instances)


def test_cells_are_learnable_by_a_small_network():
    """A three-layer CNN trained on two images segments a third with Dice > 0.9 for both classes."""
    torch.manual_seed(0)
    imgs = [generate_case("cells", i, seed=0, size="small") for i in range(3)]
    x = torch.tensor(np.stack([c.image for c in imgs]), dtype=torch.float32)[:, None]
    x = (x - x.mean()) / x.std()
    y = torch.tensor(np.stack([c.label for c in imgs]), dtype=torch.long)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 2, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is several times faster on a busy box
    try:
        for _ in range(60):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[:2]), y[:2])
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = net(x[2:]).argmax(1)
    finally:
        torch.set_num_threads(threads)
    for c in (0, 1):
        inter = float(((pred == c) & (y[2:] == c)).sum())
        dice = 2 * inter / float((pred == c).sum() + (y[2:] == c).sum())
        assert dice > 0.9, (c, dice)


def test_folder_safety_and_no_partial_dataset(tmp_path, monkeypatch):
    foreign = tmp_path / "user_data"
    foreign.mkdir()
    (foreign / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a medunet phantom set"):
        generate_dataset("mri", foreign, cases=1, size="small")
    assert (foreign / "scan.nii.gz").read_bytes() == b"x"

    root = generate_dataset("mri", tmp_path / "set", cases=3, size="small", test_cases=0)
    root = generate_dataset("mri", root, cases=1, size="small", test_cases=0)  # regenerate over it
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["mri_000.nii.gz"]

    from medunet.data.phantoms import mri

    calls = {"n": 0}
    real = mri.make_case

    def failing(rng, size):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return real(rng, size)

    monkeypatch.setattr(mri, "make_case", failing)
    with pytest.raises(RuntimeError):
        generate_dataset("mri", tmp_path / "broken", cases=3, size="small")
    assert not (tmp_path / "broken").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ValueError, match="unknown kind"):
        generate_dataset("pet", tmp_path / "x", cases=1)
    with pytest.raises(ValueError, match="png"):
        generate_dataset("ct", tmp_path / "x", cases=1, fmt="png")


def test_cli_phantoms(tmp_path, capsys):
    out = tmp_path / "mri"
    assert main(["phantoms", "--kind", "mri", "--cases", "2", "--out", str(out), "--size", "small",
                 "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "mri_000" in text and " s per case" in text and str(out) in text
    assert json.loads((out / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 2
    assert main(["phantoms", "--kind", "ct", "--cases", "1", "--out", str(tmp_path / "c"), "--size", "4x"]) == 2
