"""The MONAI Label infer task predicts through the Predictor: its label equals ``medunet segment``'s
(voxels and affine) on an oblique CT phantom.

monailabel lives in ``.venv-label`` (``make label``), not in medunet's environment, so this test stands
in for the few monailabel classes ``medunet.label.main`` subclasses. The stand-in ``BundleInferTask``
runs a request in the order MONAI Label 0.8's ``BasicInferTask.__call__`` does (pre-transforms, inferer,
inverse transforms, post-transforms, writer); the real server is exercised by
``tests/test_label_server.py`` (``make test-label``).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_inference_paths import oblique_ct_case, random_checkpoint, tiny_plan

from medunet.cli import main
from medunet.label import launch

REPO = Path(__file__).resolve().parents[1]


class _StandInBundleInferTask:
    """What ``medunet.label.main.MedunetInferTask`` uses of MONAI Label's ``BundleInferTask``."""

    def __init__(self, path: str, conf: dict):
        self.bundle_path = path
        self.output_label_key = "pred"
        meta = json.loads((Path(path) / "configs" / "metadata.json").read_text(encoding="utf-8"))
        channels = next(iter(meta["network_data_format"]["outputs"].values()))["channel_def"]
        self.labels = {v.lower(): int(k) for k, v in channels.items() if v.lower() != "background"}

    def clear_cache(self):
        pass

    def run_pre_transforms(self, data, transforms):
        for t in transforms:
            data = t(data)
        return data

    def run_invert_transforms(self, data, pre_transforms, names):
        return data if names is None else pytest.fail("the Predictor needs no inverse transforms")

    def run_post_transforms(self, data, transforms):
        return self.run_pre_transforms(data, transforms)

    def info(self) -> dict:
        return {"description": "stand-in"}

    def __call__(self, request: dict):
        data = {**request, "image_path": request["image"]}
        pre = self.pre_transforms(data)
        data = self.run_pre_transforms(data, pre)
        data = self.run_inferer(data, device=request.get("device", "cpu"))
        data = self.run_invert_transforms(data, pre, self.inverse_transforms(data))
        data = self.run_post_transforms(data, self.post_transforms(data))
        return self.writer(data)


def _install_stand_ins(monkeypatch) -> None:
    names = ["monailabel", "monailabel.config", "monailabel.datastore", "monailabel.datastore.local",
             "monailabel.interfaces", "monailabel.interfaces.app", "monailabel.interfaces.datastore",
             "monailabel.interfaces.tasks", "monailabel.interfaces.tasks.infer_v2",
             "monailabel.interfaces.tasks.scoring",
             "monailabel.interfaces.tasks.strategy", "monailabel.interfaces.tasks.train", "monailabel.tasks",
             "monailabel.tasks.activelearning", "monailabel.tasks.activelearning.first",
             "monailabel.tasks.activelearning.random", "monailabel.tasks.infer", "monailabel.tasks.infer.bundle",
             "monailabel.tasks.train", "monailabel.tasks.train.bundle", "monailabel.utils", "monailabel.utils.others",
             "monailabel.utils.others.generic"]
    modules = {n: types.ModuleType(n) for n in names}
    plain = type("StandIn", (), {})
    modules["monailabel.config"].settings = types.SimpleNamespace()
    modules["monailabel.datastore.local"].LocalDatastore = plain
    modules["monailabel.interfaces.app"].MONAILabelApp = plain
    modules["monailabel.interfaces.datastore"].Datastore = plain
    modules["monailabel.interfaces.tasks.infer_v2"].InferTask = plain
    modules["monailabel.interfaces.tasks.scoring"].ScoringMethod = plain
    modules["monailabel.interfaces.tasks.strategy"].Strategy = plain
    modules["monailabel.interfaces.tasks.train"].TrainTask = plain
    modules["monailabel.tasks.activelearning.first"].First = plain
    modules["monailabel.tasks.activelearning.random"].Random = plain
    modules["monailabel.tasks.infer.bundle"].BundleInferTask = _StandInBundleInferTask
    modules["monailabel.tasks.train.bundle"].BundleTrainTask = plain
    modules["monailabel.utils.others.generic"].strtobool = lambda v: str(v).lower() in ("1", "true", "yes")
    modules["monailabel.utils.others.generic"].name_to_device = lambda d: d or "cpu"
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "medunet.label.main", raising=False)


def _served_task(tmp_path: Path, monkeypatch, ckpt: Path):
    """(the infer task of an app copy of bundles/ct serving ``ckpt``, an oblique CT phantom, the copy)."""
    pytest.importorskip("fastapi")
    _install_stand_ins(monkeypatch)
    from medunet.label.main import MedunetInferTask

    images = tmp_path / "images"
    images.mkdir()
    source = oblique_ct_case(images)
    (setup,) = launch.prepare_app(tmp_path / "work", [REPO / "bundles" / "ct"], {"ct": ckpt})
    assert setup.weights == "checkpoint"
    assert (setup.path / "models" / "plan.json").is_file()  # the trained plan went with the weights
    return MedunetInferTask(str(setup.path), {}), source, setup


def test_label_infer_task_equals_medunet_segment_on_an_oblique_phantom(tmp_path, monkeypatch):
    ckpt = random_checkpoint(tmp_path / "trained", tiny_plan("ct"))
    task, source, _ = _served_task(tmp_path, monkeypatch, ckpt)
    out_file, result = task({"image": str(source), "device": "cpu"})
    assert result == {}
    assert main(["segment", "--no-progress", "-i", str(source), "-o", str(tmp_path / "seg"), "--bundle",
                 str(REPO / "bundles" / "ct"), "--checkpoint", str(ckpt), "--device", "cpu"]) == 0
    served, segmented = nib.load(out_file), nib.load(tmp_path / "seg" / source.name.replace(".nii.gz", "_seg.nii.gz"))
    np.testing.assert_array_equal(np.asarray(served.dataobj), np.asarray(segmented.dataobj))
    np.testing.assert_array_equal(served.affine, segmented.affine)
    assert served.get_data_dtype() == np.uint8
    Path(out_file).unlink()


def test_label_infer_task_keeps_the_last_good_model_when_new_weights_do_not_load(tmp_path, monkeypatch):
    plan = tiny_plan("ct")
    task, source, setup = _served_task(tmp_path, monkeypatch, random_checkpoint(tmp_path / "a", plan, seed=0))

    def served() -> np.ndarray:
        out_file, _ = task({"image": str(source), "device": "cpu"})
        label = np.asarray(nib.load(out_file).dataobj)
        Path(out_file).unlink()
        return label

    first = served()
    model = setup.path / "models" / "model.pt"
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 3])  # a half-written file (a trainer without atomic writes)
    np.testing.assert_array_equal(served(), first)  # the last good model answers
    other = random_checkpoint(tmp_path / "b", plan, seed=1)
    model.write_bytes(other.read_bytes())  # a complete new model is picked up at the next request
    after = served()
    reference = task.predictor("cpu").predict_file(source).label
    np.testing.assert_array_equal(after, reference)
    assert task.predictor("cpu") is task.predictor("cpu")  # cached while the file is unchanged
    from medunet.io import extract_state_dict, load_checkpoint

    new_state = extract_state_dict(load_checkpoint(other))
    served_state = task.predictor("cpu").network.state_dict()
    assert all(torch.equal(served_state[k].cpu(), new_state[k]) for k in new_state)


def test_label_infer_task_answers_a_dicom_series_with_medunet_segments_dicom_seg(tmp_path, monkeypatch):
    import dicom_support

    from medunet.io import read_image
    from medunet.io.dicom import read_dicom_seg

    ckpt = random_checkpoint(tmp_path / "trained", tiny_plan("ct"))
    task, source, _ = _served_task(tmp_path, monkeypatch, ckpt)
    series = dicom_support.series_from_nifti(source, tmp_path / "oblique_series")  # the oblique phantom as CT slices
    out_file, result = task({"image": str(series.folder), "device": "cpu", "output_format": "dicom-seg"})
    assert result == {"output_format": "dicom-seg", "referenced_series": series.series}
    assert out_file.endswith("_seg.dcm") and Path(out_file).name.startswith("oblique_series_")
    assert main(["segment", "--no-progress", "-i", str(series.folder), "-o", str(tmp_path / "seg"), "--bundle",
                 str(REPO / "bundles" / "ct"), "--checkpoint", str(ckpt), "--device", "cpu",
                 "--format", "nifti,dicom-seg"]) == 0
    image = read_image(series.folder)
    served, _, names = read_dicom_seg(out_file, image=image)  # checks the SEG references this series
    (segmented_seg,) = (tmp_path / "seg").glob("*_seg.dcm")
    np.testing.assert_array_equal(served, read_dicom_seg(segmented_seg, image=image)[0])
    (segmented_nifti,) = (tmp_path / "seg").glob("*.nii.gz")
    np.testing.assert_array_equal(served, np.asarray(nib.load(segmented_nifti).dataobj))
    assert names == {1: "liver", 2: "kidney", 3: "spleen"}
    Path(out_file).unlink()
    # the NIfTI answer for the same series is unchanged
    out_file, result = task({"image": str(series.folder), "device": "cpu"})
    assert result == {}
    np.testing.assert_array_equal(np.asarray(nib.load(out_file).dataobj), served)
    Path(out_file).unlink()
    # a NIfTI image has no DICOM SEG: 400 naming it
    from fastapi import HTTPException

    with pytest.raises(HTTPException) as refused:
        task({"image": str(source), "device": "cpu", "output_format": "seg"})
    assert refused.value.status_code == 400 and source.name in refused.value.detail
    assert "DICOM series" in refused.value.detail
