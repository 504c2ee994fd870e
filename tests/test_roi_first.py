"""ROI-first inference: a cheap first model finds the foreground's box; the model runs only inside it
(plus a margin in mm) and everything outside is background; with nothing found, the whole image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medunet.data import Plan
from medunet.inference import Predictor
from medunet.io import ImageData

CUBE = (slice(10, 18), slice(12, 20), slice(6, 10))


class _Bright(torch.nn.Module):
    """Class 1 where the (unnormalised) intensity is above 1, else background; class 2 never."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 10.0 * (x - 1.0), torch.full_like(x, -10.0)], dim=1)


def _plan(spacing) -> Plan:
    return Plan(labels={"background": 0, "a": 1, "b": 2}, patch_size=[16, 16, 8], target_spacing=list(spacing),
                normalization={"scheme": "none"}, network={"name": "unet"})


def _image(cube: bool = True) -> ImageData:
    arr = np.linspace(0.2, 0.8, 40 * 36 * 20, dtype=np.float32).reshape(40, 36, 20)  # below 1: no class 1
    if cube:
        arr[CUBE] = 3.0
    return ImageData(array=arr, affine=np.diag([1.0, 1.0, 1.5, 1.0]), path="case.nii.gz")


def _full_res(**kw) -> Predictor:
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    return Predictor(net, _plan((1.0, 1.0, 1.5)), device="cpu", roi_size=(16, 16, 8), cpu_bf16=False,
                     backend="torch", **kw)


def test_roi_first_predicts_only_inside_the_first_pass_box():
    first = Predictor(_Bright(), _plan((2.0, 2.0, 3.0)), device="cpu", cpu_bf16=False, backend="torch")
    assert (first.predict_image(_image()).label != 0).sum() > 0  # the cheap pass sees the cube
    plain = _full_res().predict_image(_image())
    pred = _full_res(roi_first=first, roi_margin_mm=2.0).predict_image(_image())
    box = pred.stats["body_box"]
    assert box is not None and pred.stats["roi_first_s"] > 0
    # the box holds the cube (plan grid = input grid here) and not much more: 2 mm + the coarse pass' rounding
    for (start, stop), cube, spacing in zip(box, CUBE, (1.0, 1.0, 1.5)):
        assert start <= cube.start and stop >= cube.stop
        assert cube.start - start <= 2.0 / spacing + 3 and stop - cube.stop <= 2.0 / spacing + 3
    inside = np.zeros(pred.label.shape, dtype=bool)
    inside[tuple(slice(a, b) for a, b in box)] = True
    assert not pred.label[~inside].any()  # background outside the box
    assert plain.label[~inside].any()  # which the full pass does not give
    assert pred.stats["windows"] < plain.stats["windows"]


def test_roi_first_with_nothing_found_predicts_the_whole_image():
    first = Predictor(_Bright(), _plan((2.0, 2.0, 3.0)), device="cpu", cpu_bf16=False, backend="torch")
    pred = _full_res(roi_first=first).predict_image(_image(cube=False))
    assert pred.stats["body_box"] is None
    assert np.array_equal(pred.label, _full_res().predict_image(_image(cube=False)).label)


def test_roi_first_model_must_have_the_same_classes():
    two = Plan(labels={"background": 0, "a": 1}, patch_size=[16, 16, 8], target_spacing=[2.0, 2.0, 3.0],
               normalization={"scheme": "none"}, network={"name": "unet"})
    first = Predictor(torch.nn.Conv3d(1, 2, 1), two, device="cpu", cpu_bf16=False, backend="torch")
    with pytest.raises(ValueError, match="same classes"):
        _full_res(roi_first=first)


def test_segment_cli_roi_first_option(tmp_path, tiny_checkpoint):
    """`medunet segment --roi-first CKPT --roi-margin MM` runs the first pass and writes the label; a
    missing first-pass checkpoint is one line naming it."""
    import nibabel as nib
    from reliability_support import run_cli, segment_argv

    rng = np.random.default_rng(0)
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(24, 20, 12)).astype(np.float32), np.eye(4)), str(path))
    res = run_cli(segment_argv([path], tmp_path / "out", tiny_checkpoint, "--roi-first", str(tiny_checkpoint),
                               "--roi-margin", "4"))
    assert res.code == 0, res.stderr
    assert nib.load(str(tmp_path / "out" / "case_seg.nii.gz")).shape == (24, 20, 12)
    missing = tmp_path / "no_such_model.pt"
    res = run_cli(segment_argv([path], tmp_path / "out2", tiny_checkpoint, "--roi-first", str(missing)))
    assert res.code != 0 and str(missing) in res.stderr and "Traceback" not in res.stderr
