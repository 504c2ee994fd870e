"""The training path's parts: poly LR with warm-up, the deep-supervision loss, the mixed-precision step
(skipping non-finite updates), and the budget that drives learning rate, validation and stopping."""

from __future__ import annotations

import math

import pytest
import torch
from bundle_helpers import one_thread
from ignite.engine import Engine, Events

from medunet.engines import DeepSupervisionDiceCE, TrainingBudget, TrainStep, float32_norms, poly_lr

pytestmark = pytest.mark.usefixtures("one_thread")
assert one_thread


def test_poly_lr_schedule_and_warmup():
    assert poly_lr(1.0, 0.0) == 1.0
    assert poly_lr(1.0, 1.0) == 0.0
    assert poly_lr(1.0, 0.5, power=0.9) == pytest.approx(0.5 ** 0.9)
    assert poly_lr(1.0, 2.0) == 0.0 and poly_lr(1.0, -1.0) == 1.0  # progress is clamped
    assert poly_lr(1.0, 0.0, iteration=0, warmup_iterations=10) == pytest.approx(0.1)
    assert poly_lr(1.0, 0.0, iteration=5, warmup_iterations=10) == pytest.approx(0.55)
    assert poly_lr(1.0, 0.0, iteration=10, warmup_iterations=10) == 1.0


def test_deep_supervision_loss_accepts_dynunet_training_output():
    from medunet.networks import create

    net = create("dynunet", 3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], filters=[4, 8, 16],
                 deep_supervision=True, deep_supr_num=1).train()
    x = torch.randn(2, 1, 16, 16, 16)
    target = torch.randint(0, 3, (2, 1, 16, 16, 16))
    out = net(x)
    assert out.shape == (2, 2, 3, 16, 16, 16)  # main output + one deep-supervision head
    loss_fn = DeepSupervisionDiceCE()
    loss = loss_fn(out, target)
    main_only = loss_fn(out[:, 0], target)
    head_only = loss_fn(out[:, 1], target)
    assert loss.item() == pytest.approx(main_only.item() + 0.5 * head_only.item(), rel=1e-5)
    loss.backward()
    # a list of heads is the same as the stacked tensor; a larger target is centre-cropped (valid nets)
    assert loss_fn(list(out.detach().unbind(1)), target).item() == pytest.approx(loss.item(), rel=1e-5)
    big = torch.nn.functional.pad(target, (2, 2, 2, 2, 2, 2))
    assert loss_fn(out[:, 0].detach(), big).item() == pytest.approx(main_only.item(), rel=1e-5)


class _Trainer(Engine):
    """The attributes of a MONAI SupervisedTrainer that :class:`TrainStep` uses."""

    def __init__(self, network, optimizer, loss, step):
        super().__init__(step)
        self.network, self.optimizer, self.loss_function = network, optimizer, loss
        self.inferer = lambda x, net: net(x)
        self.prepare_batch = lambda batch, device, non_blocking, **kw: (batch[0], batch[1])
        self.non_blocking, self.amp, self.scaler = False, False, None
        self.state.device = torch.device("cpu")


def _tiny():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 2, 1))
    return net, torch.optim.SGD(net.parameters(), lr=0.1)


def _batch():
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 2, (2, 1, 8, 8, 8), generator=g)
    return label.float() + 0.3 * torch.randn(label.shape, generator=g), label


def test_train_step_learns_and_skips_non_finite_updates():
    net, opt = _tiny()
    step = TrainStep(cpu_bf16=False)
    trainer = _Trainer(net, opt, DeepSupervisionDiceCE(), step)
    batch = _batch()
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run([batch] * 20, max_epochs=1)
    assert losses[-1] < losses[0]

    # a NaN loss is not applied to the weights; 3 in a row with max_bad_steps=3 is divergence
    before = {k: v.clone() for k, v in net.state_dict().items()}
    nan_loss = lambda pred, target: pred.sum() * float("nan")  # noqa: E731
    bad = _Trainer(net, opt, nan_loss, TrainStep(cpu_bf16=False, max_bad_steps=3))
    bad.run([batch] * 2, max_epochs=1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert bad.state.skipped_steps == 2
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        _Trainer(net, opt, nan_loss, TrainStep(cpu_bf16=False, max_bad_steps=3)).run([batch] * 3, max_epochs=1)


def test_train_step_bf16_keeps_norms_in_float32():
    net, opt = _tiny()
    step = TrainStep(cpu_bf16=True)
    trainer = _Trainer(net, opt, DeepSupervisionDiceCE(), step)
    seen = []
    net[1].register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    trainer.run([_batch()] * 2, max_epochs=1)
    assert step.autocast_dtype(trainer) == torch.bfloat16
    assert seen and all(d == torch.float32 for d in seen)  # the pre-hook cast the bf16 conv output
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert float32_norms(net) is net  # idempotent


class _Validator:
    def __init__(self):
        self.epochs = []

    def run(self, epoch):
        self.epochs.append(epoch)


def _budget_trainer(budget, step_seconds=0.0):
    import time

    def step(engine, batch):
        if step_seconds:
            time.sleep(step_seconds)
        return {"loss": 0.0}

    trainer = Engine(step)
    budget.attach(trainer)
    return trainer


def test_budget_in_epochs_anneals_and_validates_on_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    validator = _Validator()
    budget = TrainingBudget(opt, 0.01, warmup_iterations=2, validator=validator, val_interval=2)
    lrs = []
    trainer = _budget_trainer(budget)
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: lrs.append(opt.param_groups[0]["lr"]))
    trainer.run([0] * 4, max_epochs=5)
    assert trainer.state.iteration == 20 and budget.finished
    assert lrs[0] == pytest.approx(0.001)  # warm-up starts at lr/10
    assert lrs[5] == pytest.approx(poly_lr(0.01, 5 / 20))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert validator.epochs == [2, 4, 5]  # every 2nd epoch, and the last one


def test_time_budget_stops_mid_epoch_validates_and_resumes_its_clock():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    validator = _Validator()
    budget = TrainingBudget(opt, 0.01, time_budget=0.25, warmup_iterations=0, validator=validator, val_interval=0)
    trainer = _budget_trainer(budget, step_seconds=0.02)
    trainer.run([0] * 1000, max_epochs=100)
    assert budget.finished and trainer.state.epoch == 1 and 5 <= trainer.state.iteration < 1000
    assert validator.epochs == [1]  # the epoch in which the budget ran out ended early and was validated
    assert budget.elapsed >= 0.25 and opt.param_groups[0]["lr"] < 0.01 * 0.2
    state = budget.state_dict()
    assert state["finished"] and state["elapsed_s"] == pytest.approx(budget.elapsed)

    # restored from a checkpoint: a used-up budget trains nothing more; a larger one continues the clock
    again = TrainingBudget(opt, 0.01, time_budget=0.25)
    again.load_state_dict(state)
    t2 = _budget_trainer(again)
    done = trainer.state.iteration

    def restore(engine):  # what CheckpointManager.restore does at STARTED
        engine.state.epoch, engine.state.iteration = 1, done

    t2.add_event_handler(Events.STARTED, restore)
    t2.run([0] * 1000, max_epochs=100)
    assert (t2.state.epoch, t2.state.iteration) == (1, done)
    longer = TrainingBudget(opt, 0.01, time_budget=state["elapsed_s"] + 0.1)
    longer.load_state_dict(state)
    assert not longer.finished
    t3 = _budget_trainer(longer, step_seconds=0.02)
    t3.run([0] * 1000, max_epochs=100)
    assert longer.elapsed >= state["elapsed_s"] + 0.1 and t3.state.iteration < 100
    with pytest.raises(ValueError, match="time_budget"):
        TrainingBudget(opt, 0.01, time_budget=0)


def test_budget_tells_the_sample_stream_where_to_continue():
    from medunet.data.cached import SampleStream

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    stream = SampleStream(batch_size=2, rank=0, world_size=1)
    budget = TrainingBudget(opt, 0.01, sampler=stream)
    trainer = _budget_trainer(budget)
    trainer.run([0] * 3, max_epochs=2)
    assert stream.start_step == 3  # set at the start of epoch 2
    assert math.isfinite(budget.elapsed)
