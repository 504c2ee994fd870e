"""Shared fixtures: small deterministic settings so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
HIPPOCAMPUS = SHARED / "data" / "hippocampus"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _cache_dir():
    """Converted networks (backend auto/openvino) go to a folder of this session, not the user's
    ~/.cache (subprocesses inherit it)."""
    from medunet.inference.benchmark import empty_model_cache

    with empty_model_cache():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def hippocampus_dir() -> Path:
    if not (HIPPOCAMPUS / "dataset.json").exists():
        pytest.skip(f"real data not present at {HIPPOCAMPUS} (read-only shared dataset)")
    return HIPPOCAMPUS


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random 3D UNet checkpoint with its plan beside it (:func:`reliability_support.make_tiny_checkpoint`)."""
    from reliability_support import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture
def predictions(monkeypatch) -> list[str]:
    """The input paths :meth:`Predictor.predict_image` was called for, in order (to prove a check came first)."""
    from medunet.inference import predictor as predictor_module

    seen: list[str] = []
    original = predictor_module.Predictor.predict_image

    def counting(self, image, *args, **kwargs):
        seen.append(str(image.path))
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(predictor_module.Predictor, "predict_image", counting)
    return seen
