"""`medunet label-server` preparation and request checks, without a server (medunet's own environment)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from medunet.cli import main
from medunet.io import InputError
from medunet.label import launch
from medunet.label.safety import check_request, unsafe_id_reason

sys.path.insert(0, str(Path(__file__).parent))
from label_bundle import make_ct_bundle  # noqa: E402


@pytest.mark.parametrize("value", ["../../etc/passwd", "/etc/passwd", "..", ".", "a/b", "a\\b", "x\x00y", "~root"])
def test_path_like_ids_are_refused(value):
    assert unsafe_id_reason(value)


@pytest.mark.parametrize("value", ["ct_000", "case 01", "spleen_12.v2", "a..b", "ÄÖ-1"])
def test_plain_names_are_accepted(value):
    assert unsafe_id_reason(value) is None


def test_check_request_looks_at_id_params_and_path_segments():
    assert check_request("/infer/ct", b"image=ct_000&output=image") is None
    assert "image" in check_request("/infer/ct", b"image=..%2F..%2Fetc%2Fpasswd")
    assert "tag" in check_request("/datastore/label", "image=ct_000&tag=../x")
    assert check_request("/session/../../etc", b"") is not None
    assert check_request("/infer/ct", b"params=../not-an-id") is None  # only id parameters


def test_default_bundles_are_the_3d_ones(tmp_path, monkeypatch):
    ct = make_ct_bundle(tmp_path / "bundles")
    flat = make_ct_bundle(tmp_path / "bundles", name="cells2d")
    meta_file = flat / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = [96, 96]
    meta_file.write_text(json.dumps(meta))
    monkeypatch.setattr(launch, "REPO_ROOT", tmp_path)
    assert launch.find_bundles(None) == [ct]
    assert launch.find_bundles([flat]) == [flat]  # served when named


def test_parse_checkpoints_pairs_files_with_bundles(tmp_path):
    assert launch.parse_checkpoints(["w.pt"], ["ct"]) == {"ct": Path("w.pt")}
    assert launch.parse_checkpoints(["mri=m.pt", "ct=c.pt"], ["ct", "mri"]) == {"ct": Path("c.pt"),
                                                                                "mri": Path("m.pt")}
    with pytest.raises(ValueError, match="NAME=FILE"):
        launch.parse_checkpoints(["w.pt"], ["ct", "mri"])
    with pytest.raises(ValueError, match="no bundle named 'liver'"):
        launch.parse_checkpoints(["liver=w.pt"], ["ct"])


def test_find_bundles_rejects_non_bundles_and_duplicate_names(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="configs/inference.json is missing"):
        launch.find_bundles([tmp_path / "empty"])
    with pytest.raises(InputError, match="not found"):
        launch.find_bundles([tmp_path / "missing"])
    a = make_ct_bundle(tmp_path / "a")
    b = make_ct_bundle(tmp_path / "b")
    with pytest.raises(InputError, match="two bundles are named 'ct'"):
        launch.find_bundles([a, b])


def test_prepare_app_weights_random_then_checkpoint_then_fine_tuned(tmp_path):
    bundle = make_ct_bundle(tmp_path / "bundles")
    work = tmp_path / "work"
    (setup,) = launch.prepare_app(work, [bundle])
    model = work / "app" / "model" / "ct" / "models" / "model.pt"
    assert setup.untrained and setup.labels == {"liver": 1, "kidney": 2, "spleen": 3}
    assert launch.weights_status(setup.path) == "random-init"
    assert "MedunetLabelApp" in (work / "app" / "main.py").read_text(encoding="utf-8")
    assert (work / "run").is_dir() and not list((work / "run").iterdir())  # empty CWD: no .env
    assert not (setup.path / "models" / "plan.json").exists()
    first = torch.load(model, weights_only=True)
    # a restart keeps the same random weights
    launch.prepare_app(work, [bundle])
    assert torch.equal(next(iter(torch.load(model, weights_only=True).values())), next(iter(first.values())))

    # a trained checkpoint ({"model": state_dict}, with the plan it was trained with beside it)
    trained = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in first.items()}
    ckpt_dir = tmp_path / "run1"
    ckpt_dir.mkdir()
    torch.save({"model": trained, "epoch": 3}, ckpt_dir / "best.pt")
    (ckpt_dir / "plan.json").write_text((bundle / "plan.json").read_text(encoding="utf-8"))
    (setup,) = launch.prepare_app(work, [bundle], {"ct": ckpt_dir / "best.pt"})
    assert setup.weights == "checkpoint" and not setup.untrained
    assert launch.weights_status(setup.path) == "checkpoint"
    assert (setup.path / "models" / "plan.json").is_file()
    saved = torch.load(model, weights_only=True)  # raw state dict, as MONAI Label expects
    assert set(saved) == set(first) and all(torch.equal(saved[k], trained[k]) for k in saved)

    # MONAI Label training replaces model.pt: reported as fine-tuned and kept at the next start
    torch.save(first, model)
    assert launch.weights_status(setup.path) == "fine-tuned"
    (setup,) = launch.prepare_app(work, [bundle])
    assert setup.weights == "fine-tuned"
    record = json.loads((setup.path / "models" / launch.WEIGHTS_RECORD).read_text(encoding="utf-8"))
    assert record["weights"] == "fine-tuned"


def test_prepare_app_refuses_a_checkpoint_of_another_network(tmp_path):
    bundle = make_ct_bundle(tmp_path / "bundles")
    bad = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(2, 1, 3, 3, 3)}, bad)
    with pytest.raises(InputError, match="other.pt"):
        launch.prepare_app(tmp_path / "work", [bundle], {"ct": bad})


def test_cli_dry_run_prints_loopback_command_and_untrained_warning(tmp_path, capsys, monkeypatch):
    bundle = make_ct_bundle(tmp_path / "bundles")
    studies = tmp_path / "studies"
    studies.mkdir()
    fake_python = tmp_path / "python"
    fake_python.write_text("")
    monkeypatch.setenv("MEDUNET_CACHE", str(tmp_path / "cache"))
    rc = main(["label-server", "--studies", str(studies), "--bundle", str(bundle), "--label-python",
               str(fake_python), "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "--host 127.0.0.1" in out and "--conf zoo_source local" in out and "--port 8000" in out
    assert "medunet.label.asgi:app" in out
    assert "UNTRAINED" in err and "'ct'" in err
    assert str(tmp_path / "cache" / "label-server") in out  # app dir outside the repository


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = main(["label-server", "--studies", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "nope" in err and "studies folder not found" in err


def _trained_copy(tmp_path):
    """A bundle copy started from a checkpoint, then fine-tuned (models/model.pt replaced)."""
    bundle = make_ct_bundle(tmp_path / "bundles")
    work = tmp_path / "work"
    (setup,) = launch.prepare_app(work, [bundle])
    first = torch.load(setup.path / "models" / "model.pt", weights_only=True)
    trained = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in first.items()}
    ckpt = tmp_path / "run1" / "best.pt"
    ckpt.parent.mkdir()
    torch.save({"model": trained}, ckpt)
    (ckpt.parent / "plan.json").write_text((bundle / "plan.json").read_text(encoding="utf-8"))
    (setup,) = launch.prepare_app(work, [bundle], {"ct": ckpt})
    tuned = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v for k, v in first.items()}
    torch.save(tuned, setup.path / "models" / "model.pt")  # what MONAI Label training writes
    return bundle, work, ckpt, trained, tuned


def test_restart_with_the_same_checkpoint_keeps_the_fine_tuned_weights(tmp_path):
    bundle, work, ckpt, trained, tuned = _trained_copy(tmp_path)
    (setup,) = launch.prepare_app(work, [bundle], {"ct": ckpt})  # the same command line again
    assert setup.weights == "fine-tuned"
    served = torch.load(setup.path / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(served[k], tuned[k]) for k in served)
    record = json.loads((setup.path / "models" / launch.WEIGHTS_RECORD).read_text(encoding="utf-8"))
    assert record["started_with"]["weights"] == "checkpoint"
    # a changed checkpoint file is new weights: it replaces the fine-tuned ones
    torch.save({"model": trained, "epoch": 9}, ckpt)
    (setup,) = launch.prepare_app(work, [bundle], {"ct": ckpt})
    assert setup.weights == "checkpoint"


@pytest.mark.parametrize("damage", ["truncated", "empty", "other-network"])
def test_fine_tuned_weights_that_do_not_load_are_not_served(tmp_path, damage):
    bundle, work, ckpt, trained, _ = _trained_copy(tmp_path)
    model = work / "app" / "model" / "ct" / "models" / "model.pt"
    if damage == "truncated":  # a trainer killed while writing without an atomic rename
        model.write_bytes(model.read_bytes()[:1000])
    elif damage == "empty":
        model.write_bytes(b"")
    else:
        torch.save({"conv.weight": torch.zeros(2, 1, 3, 3, 3)}, model)
    assert launch.weights_status(work / "app" / "model" / "ct") == "fine-tuned"
    (setup,) = launch.prepare_app(work, [bundle])  # restart without --checkpoint
    assert setup.weights == "checkpoint" and setup.weights_from == str(ckpt.resolve())
    served = torch.load(model, weights_only=True)
    assert all(torch.equal(served[k], trained[k]) for k in served)


def test_label_problems_name_each_reason(tmp_path):
    import nibabel as nib
    import numpy as np

    from medunet.label.safety import label_problems

    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    image = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16) + 5, affine), image)

    def label(name, data, aff=affine):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(data, aff), path)
        return path

    good = np.zeros((8, 8, 4), np.uint8)
    good[2:4, 2:4, 1:3] = 2
    assert label_problems(label("ok.nii.gz", good), image, {1, 2, 3}) == []
    assert label_problems(label("ok.nii", good), image, {1, 2, 3}) == []
    shifted = affine.copy()
    shifted[0, 3] = 7.0
    cases = {
        "shape": (label("shape.nii.gz", good[:6]), "shape"),
        "affine": (label("affine.nii.gz", good, shifted), "origin"),
        "values": (label("values.nii.gz", good * 4), "[8] not declared in the model's classes"),
        "fraction": (label("fraction.nii.gz", good.astype(np.float32) * 0.25), "non-integer"),
        "one-hot": (label("onehot.nii.gz", np.stack([good, good], axis=-1)), "4D label"),
    }
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not an image")
    cases["not-nifti-body"] = (text, "not a readable NIfTI")
    png = tmp_path / "seg.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    cases["not-nifti-name"] = (png, "not a NIfTI file")
    for what, (path, words) in cases.items():
        problems = label_problems(path, image, {1, 2, 3})
        assert problems and words in " ".join(problems), (what, problems)
        assert all("\n" not in p for p in problems)
