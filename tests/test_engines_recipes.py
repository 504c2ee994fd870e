"""The CPU training recipe (medunet.engines.recipes): schedule, loss, whole-volume evaluation, loop."""

from __future__ import annotations

import math

import pytest
import torch

from medunet import networks
from medunet.data.cached import AugmentConfig, CachedCase, PatchSampler
from medunet.engines.recipes import (
    DeepSupervisionDiceCE,
    RecipeConfig,
    evaluate_cases,
    poly_lr,
    summarize_rows,
    train_recipe,
    whole_volume_logits,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a shared CPU (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_poly_lr_schedule_and_warmup():
    assert poly_lr(1.0, 0.0) == 1.0
    assert poly_lr(1.0, 1.0) == 0.0
    assert math.isclose(poly_lr(0.01, 0.5, 0.9), 0.01 * 0.5**0.9)
    assert poly_lr(1.0, 2.0) == 0.0 and poly_lr(1.0, -1.0) == 1.0  # clamped
    assert math.isclose(poly_lr(1.0, 0.0, iteration=0, warmup_iterations=10), 0.1)
    assert math.isclose(poly_lr(1.0, 0.0, iteration=5, warmup_iterations=10), 0.55)
    assert poly_lr(1.0, 0.0, iteration=10, warmup_iterations=10) == 1.0


def test_recipe_config_needs_a_budget():
    with pytest.raises(ValueError, match="max_iterations or time_budget_s"):
        RecipeConfig(max_iterations=None, time_budget_s=None)
    with pytest.raises(ValueError, match="optimizer"):
        RecipeConfig(optimizer="adam")


def test_deep_supervision_loss_accepts_dynunet_training_output():
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    main = torch.randn(2, 3, 8, 8, 8)
    loss = DeepSupervisionDiceCE()
    single = loss(main, target)
    assert single.dim() == 0 and single > 0
    assert torch.allclose(loss([main], target), single)
    stacked = torch.stack([main, torch.randn_like(main), torch.randn_like(main)], dim=1)  # (B, 3, K, *S)
    ds = loss(stacked, target)
    assert torch.isfinite(ds) and not torch.allclose(ds, single)
    perfect = torch.nn.functional.one_hot(target[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 20
    assert float(loss(perfect, target)) < 0.01


def test_whole_volume_logits_pads_to_a_valid_size_and_crops_back():
    net = networks.create("unet", 3, 1, 3, **networks.get_spec("unet").tiny_options).eval()
    x = torch.randn(1, 1, 13, 10, 7)  # not a multiple of 4
    with torch.no_grad():
        out = whole_volume_logits(net, x)
    assert out.shape == (1, 3, 13, 10, 7) and out.dtype == torch.float32


class _Oracle(torch.nn.Module):
    """Logits that reproduce the label stored in the image (image == label value)."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].round().long().clamp(0, 2), 3).movedim(-1, 1).float() * 10


def _label_case(case_id="c", shape=(10, 12, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros((1, *shape), dtype=torch.uint8)
    label[:, 2:6, 3:8, 2:6] = 1
    label[:, 6:9, 3:8, 2:6] = 2
    image = label.float() + 0.01 * torch.randn(label.shape, generator=g)
    return CachedCase(case_id, image, label, "i", "l", (1.0, 1.0, 1.0))


def test_evaluate_cases_scores_a_perfect_and_a_shifted_prediction():
    perfect = _label_case("perfect")
    rows = evaluate_cases(_Oracle(), [perfect], 3, tta=True, metrics=("dice", "hd95"), keep_predictions=True)
    assert rows[0]["case"] == "perfect" and rows[0]["mean_dice"] == pytest.approx(1.0)
    assert rows[0]["metrics"][1]["hd95"] == pytest.approx(0.0)
    assert torch.equal(rows[0]["pred"], perfect.label[0])
    wrong = _label_case("wrong")
    wrong.label = torch.roll(wrong.label, 2, dims=1)  # reference moved 2 voxels along axis 0
    rows2 = evaluate_cases(_Oracle(), [perfect, wrong], 3, metrics=("dice", "hd95"))
    summary = summarize_rows(rows2)
    assert 0.3 < rows2[1]["mean_dice"] < 0.9
    assert summary["mean_dice"] == pytest.approx((1.0 + rows2[1]["mean_dice"]) / 2)
    assert summary["classes"][1]["hd95"] > 0


def test_train_recipe_learns_a_tiny_task_and_logs_history():
    cases = [_label_case(f"c{i}", seed=i) for i in range(3)]
    for c in cases:  # make the image informative but not the label itself
        c.image = (c.label.float() * 2 - 1) + 0.3 * torch.randn(c.label.shape)
    sampler = PatchSampler(cases, (8, 8, 8), 2, AugmentConfig.none(), seed=0)
    torch.manual_seed(0)
    net = networks.create("dynunet", 3, 1, 3, strides=[1, 2, 2], kernel_size=[3, 3, 3], filters=(8, 16, 16),
                          deep_supervision=False)
    config = RecipeConfig(lr=1e-2, max_iterations=40, time_budget_s=None, eval_interval_s=0, warmup_iterations=2,
                          bf16=True)
    calls = []

    def evaluate(n):
        calls.append(n)
        return {"dice": summarize_rows(evaluate_cases(n, cases, 3))["mean_dice"]}

    history = train_recipe(net, sampler, DeepSupervisionDiceCE(), config, evaluate=evaluate, log=None)
    assert len(history) == 1 and history[0]["final"] and history[0]["iteration"] == 40
    assert calls == [net]  # evaluated once, at the end
    assert net.training  # evaluate_cases switched to eval() and back
    assert history[0]["lr"] < 1e-3  # annealed
    assert history[0]["dice"] > 0.6
    for key in ("elapsed_s", "train_s", "cpu_s", "loss"):
        assert history[0][key] > 0


def test_train_recipe_time_budget_and_periodic_evaluation():
    cases = [_label_case("c")]
    sampler = PatchSampler(cases, (8, 8, 8), 1, AugmentConfig.none(), seed=0)
    net = networks.create("unet", 3, 1, 3, **networks.get_spec("unet").tiny_options)
    config = RecipeConfig(max_iterations=None, time_budget_s=1.5, eval_interval_s=0.3, bf16=False)
    history = train_recipe(net, sampler, DeepSupervisionDiceCE(), config, evaluate=lambda n: {"x": 1.0}, log=None)
    assert len(history) >= 2 and history[-1]["final"] and not history[0]["final"]
    assert history[-1]["elapsed_s"] >= 1.5
    assert [h["iteration"] for h in history] == sorted(h["iteration"] for h in history)


def test_train_recipe_stops_on_divergence():
    cases = [_label_case("c")]
    sampler = PatchSampler(cases, (8, 8, 8), 1, AugmentConfig.none(), seed=0)
    net = networks.create("unet", 3, 1, 3, **networks.get_spec("unet").tiny_options)

    def nan_loss(out, target):
        return out.float().sum() * float("nan")

    with pytest.raises(FloatingPointError, match="diverged"):
        train_recipe(net, sampler, nan_loss, RecipeConfig(max_iterations=30, time_budget_s=None), log=None)


def test_train_recipe_skips_isolated_non_finite_steps():
    cases = [_label_case("c")]
    sampler = PatchSampler(cases, (8, 8, 8), 1, AugmentConfig.none(), seed=0)
    net = networks.create("unet", 3, 1, 3, **networks.get_spec("unet").tiny_options)
    base, calls = DeepSupervisionDiceCE(), []

    def flaky(out, target):
        calls.append(1)
        value = base(out, target)
        return value * float("inf") if len(calls) % 3 == 0 else value

    before = [p.detach().clone() for p in net.parameters()]
    history = train_recipe(net, sampler, flaky, RecipeConfig(max_iterations=9, time_budget_s=None, bf16=False), log=None)
    assert history[-1]["skipped_steps"] == 3 and math.isfinite(history[-1]["loss"])
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
