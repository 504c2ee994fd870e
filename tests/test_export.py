"""``medunet export`` (TorchScript / ONNX / OpenVINO, checked against eager) and the Predictor's
``backend="onnxruntime"`` / ``"openvino"`` engines. Tests of a backend skip when its package is absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet import networks
from medunet.cli import EXIT_OK, main
from medunet.data import Plan
from medunet.inference import Predictor
from medunet.inference import export as export_module
from medunet.inference.export import export_model, load_engine, probe_inputs
from medunet.io import ImageData, save_checkpoint

HAVE = {name: importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript", "onnxruntime", "openvino")}
NEEDS = {
    "torchscript": [],
    "onnx": ["onnx", "onnxscript", "onnxruntime"],
    "openvino": ["openvino"],
    "onnxruntime": ["onnx", "onnxscript", "onnxruntime"],
}


def needs(what: str):
    missing = [p for p in NEEDS[what] if not HAVE[p]]
    return pytest.mark.skipif(bool(missing), reason=f"{what} needs {', '.join(missing)} (pip install "
                                                    f"'medunet[{'openvino' if what == 'openvino' else 'onnx'}]')")


def _plan() -> Plan:
    return Plan(labels={"background": 0, "a": 1, "b": 2}, patch_size=[16, 16, 8], target_spacing=[1.5, 1.5, 2.0],
                normalization={"scheme": "zscore"}, network={"name": "unet", **networks.get_spec("unet").tiny_options})


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return _plan().build_network().eval()


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=needs(f)) for f in ("torchscript", "onnx", "openvino")])
def test_export_matches_eager_on_two_sizes(net, fmt, tmp_path):
    result = export_model(net, fmt, tmp_path / "model", (16, 16, 8), 1)
    assert result["max_abs_diff"] <= 1e-4 and result["max_abs_logit"] > 0.01
    assert result["shapes"][0][0] == 1 and result["shapes"][1][0] == 2  # batch size free
    assert result["shapes"][0][2:] != result["shapes"][1][2:]  # spatial sizes free
    files = [Path(f) for f in result["files"]]
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    assert files[-1].suffix == {"torchscript": ".pt", "onnx": ".onnx", "openvino": ".xml"}[fmt]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)  # no temporaries left


def test_export_writes_nothing_when_the_check_fails(net, tmp_path, monkeypatch):
    real = export_module._TorchScriptEngine.forward
    monkeypatch.setattr(export_module._TorchScriptEngine, "forward", lambda self, x: real(self, x) + 0.01)
    with pytest.raises(ValueError, match="differs from the eager one"):
        export_model(net, "torchscript", tmp_path / "model.pt", (16, 16, 8), 1)
    assert list(tmp_path.iterdir()) == []


@needs("onnx")
def test_a_valid_padding_network_exports_with_free_sizes(tmp_path):
    """The 2015 U-Net crops its skip connections by sizes computed from the input: still exact at a
    second input size."""
    torch.manual_seed(0)
    net = networks.create("unet2015", 2, 1, 2, features=(4, 8, 16), padding="valid", dropout=0.0).eval()
    result = export_model(net, "onnx", tmp_path / "m.onnx", (60, 60), 1)
    assert result["max_abs_diff"] <= 1e-4


def test_unknown_format_and_backend_are_refused(net, tmp_path):
    with pytest.raises(ValueError, match="format"):
        export_model(net, "tflite", tmp_path / "m", (16, 16, 8), 1)
    with pytest.raises(ValueError, match="backend"):
        load_engine("tensorrt", net, (16, 16, 8), 1)


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    real = export_module.importlib.import_module

    def no_openvino(name, *args):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args)

    monkeypatch.setattr(export_module.importlib, "import_module", no_openvino)
    with pytest.raises(ImportError, match=r"pip install 'medunet\[openvino\]'"):
        export_module.require("openvino")


def test_probe_inputs_are_sizes_the_network_accepts(net):
    small, large = probe_inputs(net, (15, 16, 7), 1)
    assert tuple(small.shape[2:]) == tuple(net.valid_input_shape((15, 16, 7), "up"))
    assert all(b > a for a, b in zip(small.shape[2:], large.shape[2:]))


def _image(seed=0) -> ImageData:
    rng = np.random.default_rng(seed)
    return ImageData(array=rng.normal(size=(40, 33, 20)).astype(np.float32) + 2.0,
                     affine=np.diag([1.3, 1.2, 1.8, 1.0]), path="case.nii.gz")


@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs(b)) for b in ("onnxruntime", "openvino")])
def test_predictor_backend_gives_torch_s_probabilities(net, backend):
    settings = {"device": "cpu", "roi_size": (16, 16, 8), "overlap": 0.5, "cpu_bf16": False}
    ref = Predictor(net, _plan(), **settings).predict_image(_image())
    predictor = Predictor(net, _plan(), backend=backend, **settings)
    assert predictor.engine.name == backend
    ours = predictor.predict_image(_image())
    assert ours.stats["windows"] == ref.stats["windows"] > 4
    assert float(np.abs(ours.probabilities - ref.probabilities).max()) <= 1e-4
    assert np.array_equal(ours.label, ref.label)


def test_torch_compile_backend_gives_eager_probabilities():
    torch.manual_seed(0)  # two convolutions: compiling a whole U-Net would take a minute of CI
    small = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv3d(4, 3, 3, padding=1)).eval()
    settings = {"device": "cpu", "roi_size": (16, 16, 8), "overlap": 0.5, "cpu_bf16": False}
    ref = Predictor(small, _plan(), **settings).predict_image(_image())
    predictor = Predictor(small, _plan(), backend="torch-compile", **settings)
    assert predictor.engine is not small  # the compiled wrapper runs the windows
    ours = predictor.predict_image(_image())
    assert ours.stats["windows"] == ref.stats["windows"] > 4
    assert float(np.abs(ours.probabilities - ref.probabilities).max()) <= 1e-4


@needs("openvino")
def test_openvino_bfloat16_stays_close_to_float32(net):
    settings = {"device": "cpu", "roi_size": (16, 16, 8), "overlap": 0.5}
    ref = Predictor(net, _plan(), cpu_bf16=False, **settings).predict_image(_image())
    predictor = Predictor(net, _plan(), backend="openvino", cpu_bf16=True, **settings)
    assert predictor.engine.precision == "bf16"
    ours = predictor.predict_image(_image())
    assert float(np.abs(ours.probabilities - ref.probabilities).max()) < 0.05


def test_network_fingerprint_follows_the_weights_and_buffers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2)).eval()  # 0-dim buffer inside
    example = torch.zeros(1, 1, 8, 8, 8)
    key = export_module.network_fingerprint(net, example)
    assert key == export_module.network_fingerprint(net, example)
    with torch.no_grad():
        net[1].running_mean += 1e-3
    assert export_module.network_fingerprint(net, example) != key
    assert export_module.network_fingerprint(net, torch.zeros(1, 2, 8, 8, 8)) != export_module.network_fingerprint(net, example)


@needs("openvino")
def test_auto_backend_sends_large_images_to_openvino_and_keeps_the_conversion(net, monkeypatch, tmp_path):
    """backend="auto": an image below the window-voxel threshold runs on torch (nothing converted);
    above it on OpenVINO with torch's probabilities; the converted network is kept in the cache folder
    and read back by the next Predictor (no second conversion); a damaged cache file is converted again."""
    import medunet.inference.predictor as predictor_module

    monkeypatch.setenv("MEDUNET_CACHE_DIR", str(tmp_path / "cache"))
    settings = {"device": "cpu", "roi_size": (16, 16, 8), "overlap": 0.5, "cpu_bf16": False}
    ref = Predictor(net, _plan(), backend="torch", **settings).predict_image(_image())
    small = Predictor(net, _plan(), **settings)  # backend="auto" is the default
    pred = small.predict_image(_image())
    assert pred.stats["backend"] == "torch" and small._auto_openvino is None
    assert np.array_equal(pred.label, ref.label)

    monkeypatch.setattr(predictor_module, "AUTO_OPENVINO_VOXELS", pred.stats["windows"] * 16 * 16 * 8)
    large = Predictor(net, _plan(), **settings).predict_image(_image())
    assert large.stats["backend"] == "openvino"
    assert float(np.abs(large.probabilities - ref.probabilities).max()) <= 1e-4
    assert np.array_equal(large.label, ref.label)
    cached = sorted((export_module.model_cache_dir() / "openvino").glob("*/model.xml"))
    assert len(cached) == 1 and cached[0].with_suffix(".bin").is_file()
    assert not list((export_module.model_cache_dir() / "openvino").glob(".converting-*"))  # nothing left aside

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds this network")

    with monkeypatch.context() as m:
        m.setattr(export_module, "openvino_model", no_conversion)
        again = Predictor(net, _plan(), **settings).predict_image(_image())
    assert again.stats["backend"] == "openvino" and np.array_equal(again.probabilities, large.probabilities)

    cached[0].write_text("not an OpenVINO model", encoding="utf-8")
    repaired = Predictor(net, _plan(), **settings).predict_image(_image())
    assert repaired.stats["backend"] == "openvino" and np.array_equal(repaired.probabilities, large.probabilities)
    assert "not an OpenVINO model" not in cached[0].read_text(encoding="utf-8", errors="replace")


@needs("openvino")
def test_auto_backend_falls_back_to_torch_when_openvino_cannot_convert(net, monkeypatch):
    import medunet.inference.predictor as predictor_module

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(predictor_module, "AUTO_OPENVINO_VOXELS", 1)
    monkeypatch.setattr(export_module, "cached_openvino_model", broken)
    settings = {"device": "cpu", "roi_size": (16, 16, 8), "overlap": 0.5, "cpu_bf16": False}
    predictor = Predictor(net, _plan(), **settings)
    with pytest.warns(RuntimeWarning, match="OpenVINO could not convert.*unsupported operation"):
        pred = predictor.predict_image(_image())
    assert pred.stats["backend"] == "torch"
    ref = Predictor(net, _plan(), backend="torch", **settings).predict_image(_image())
    assert np.array_equal(pred.probabilities, ref.probabilities)


@needs("onnx")
def test_cli_export_then_segment_with_the_exported_file(net, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    save_checkpoint({"model": net.state_dict(), "plan": _plan().to_dict()}, ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "-o", str(tmp_path / "exp" / "net")]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "max |exported - eager|" in printed and (tmp_path / "exp" / "net.onnx").is_file()
    image = _image(1)
    nib.save(nib.Nifti1Image(image.array, image.affine), str(tmp_path / "case.nii.gz"))
    common = ["segment", "-i", str(tmp_path / "case.nii.gz"), "--checkpoint", str(ckpt), "--device", "cpu",
              "--cpu-bf16", "off", "--no-progress"]
    assert main([*common, "-o", str(tmp_path / "torch")]) == EXIT_OK
    assert main([*common, "-o", str(tmp_path / "ort"), "--backend", "onnxruntime",
                 "--model-file", str(tmp_path / "exp" / "net.onnx")]) == EXIT_OK
    a = np.asarray(nib.load(str(tmp_path / "torch" / "case_seg.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "ort" / "case_seg.nii.gz")).dataobj)
    assert np.array_equal(a, b)


def test_cli_segment_refuses_a_missing_model_file(net, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    save_checkpoint({"model": net.state_dict(), "plan": _plan().to_dict()}, ckpt)
    code = main(["segment", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt),
                 "--device", "cpu", "--backend", "onnxruntime", "--model-file", str(tmp_path / "nope.onnx")])
    assert code != EXIT_OK
    assert "nope.onnx: exported model file not found" in capsys.readouterr().err


@pytest.mark.skipif(not (HAVE["openvino"] and importlib.util.find_spec("nncf") is not None),
                    reason="int8 needs openvino and nncf (pip install 'medunet[int8]')")
def test_int8_openvino_export_is_calibrated_and_checked_on_real_windows(net, tmp_path):
    from medunet.inference.export import calibration_windows

    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool3d(torch.randn(3, 1, 40, 36, 20, generator=gen), 5, 1, 2) * 4
    windows = calibration_windows(list(smooth), (16, 16, 8), count=16)
    assert len(windows) == 16 and windows[0].shape == (1, 1, 16, 16, 8)
    result = export_model(net, "openvino", tmp_path / "int8", (16, 16, 8), 1, tolerance=0.25, calibration=windows)
    assert 0.0 <= result["label_change"] <= 0.25 and result["max_abs_diff"] > 0  # int8 is not exact
    engine = load_engine("openvino", net, (16, 16, 8), 1, model_file=result["files"][-1])
    assert engine(torch.from_numpy(windows[0])).shape == (1, 3, 16, 16, 8)
    with pytest.raises(ValueError, match="int8 changes the label"):
        export_model(net, "openvino", tmp_path / "strict", (16, 16, 8), 1, tolerance=-1.0, calibration=windows)
    with pytest.raises(ValueError, match="openvino format"):
        export_model(net, "onnx", tmp_path / "x", (16, 16, 8), 1, calibration=windows)
