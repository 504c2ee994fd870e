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
        from monai.bundle import ConfigParser

        self.bundle_path = path
        self.output_label_key = "pred"
        meta = json.loads((Path(path) / "configs" / "metadata.json").read_text())
        channels = next(iter(meta["network_data_format"]["outputs"].values()))["channel_def"]
        self.labels = {v.lower(): int(k) for k, v in channels.items() if v.lower() != "background"}
        parser = ConfigParser()
        parser.read_config(str(Path(path) / "configs" / "inference.json"))
        parser.config["bundle_root"] = path
        self.network = parser.get_parsed_content("network_def", instantiate=True)

    def _get_network(self, device, data):
        state = torch.load(Path(self.bundle_path) / "models" / "model.pt", map_location=device, weights_only=True)
        self.network.load_state_dict(state.get("model", state), strict=True)
        return self.network.to(device).eval()

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
    modules["monailabel.interfaces.tasks.strategy"].Strategy = plain
    modules["monailabel.interfaces.tasks.train"].TrainTask = plain
    modules["monailabel.tasks.activelearning.first"].First = plain
    modules["monailabel.tasks.activelearning.random"].Random = plain
    modules["monailabel.tasks.infer.bundle"].BundleInferTask = _StandInBundleInferTask
    modules["monailabel.tasks.train.bundle"].BundleTrainTask = plain
    modules["monailabel.utils.others.generic"].strtobool = lambda v: str(v).lower() in ("1", "true", "yes")
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "medunet.label.main", raising=False)


def test_label_infer_task_equals_medunet_segment_on_an_oblique_phantom(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    _install_stand_ins(monkeypatch)
    from medunet.label.main import MedunetInferTask

    images = tmp_path / "images"
    images.mkdir()
    source = oblique_ct_case(images)
    ckpt = random_checkpoint(tmp_path / "trained", tiny_plan("ct"))
    (setup,) = launch.prepare_app(tmp_path / "work", [REPO / "bundles" / "ct"], {"ct": ckpt})
    assert setup.weights == "checkpoint"
    assert (setup.path / "models" / "plan.json").is_file()  # the trained plan went with the weights

    task = MedunetInferTask(str(setup.path), {})
    out_file, result = task({"image": str(source), "device": "cpu"})
    assert result == {}
    assert main(["segment", "--no-progress", "-i", str(source), "-o", str(tmp_path / "seg"), "--bundle",
                 str(REPO / "bundles" / "ct"), "--checkpoint", str(ckpt), "--device", "cpu"]) == 0
    served, segmented = nib.load(out_file), nib.load(tmp_path / "seg" / source.name.replace(".nii.gz", "_seg.nii.gz"))
    np.testing.assert_array_equal(np.asarray(served.dataobj), np.asarray(segmented.dataobj))
    np.testing.assert_array_equal(served.affine, segmented.affine)
    assert served.get_data_dtype() == np.uint8
    Path(out_file).unlink()
