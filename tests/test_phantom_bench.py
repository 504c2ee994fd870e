"""The CT bench network's cache (:mod:`medunet.engines.phantom_bench`): a run is reused only while the
plan it was trained with fits the bench's spacing, patch and batch."""

from __future__ import annotations

from test_inference_paths import tiny_plan

from medunet.data import Plan
from medunet.engines.phantom_bench import bench_overrides, phantom_dir, run_dir, trained_run


def test_a_cached_run_is_used_only_when_its_plan_fits(tmp_path):
    plan = tiny_plan()
    assert phantom_dir(tmp_path, 32) != phantom_dir(tmp_path, 8) and run_dir(tmp_path, 32).name == "bundle_run_32"
    assert trained_run(tmp_path, plan, 32) is None  # nothing trained yet
    models = run_dir(tmp_path, 32) / "models"
    models.mkdir(parents=True)
    (models / "model.pt").write_bytes(b"weights")
    plan.save(models / "plan.json")
    assert trained_run(tmp_path, plan, 32) == models / "model.pt"
    assert trained_run(tmp_path, plan, 8) is None  # another phantom count, another run
    other = plan.to_dict()
    other["patch_size"] = [2 * v for v in other["patch_size"]]
    assert bench_overrides(plan)["patch_size"] != other["patch_size"]

    assert trained_run(tmp_path, Plan.from_dict(other), 32) is None
