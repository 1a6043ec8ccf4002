"""The one training loop: resume, seeding, warm-up, EMA, gradient clipping, skipped steps, checkpoints."""

import pytest
import torch
from torch import nn

from neuro_ood.trainer import (StepResult, TrainState, ema_model, merge_samplers, optimization_manager, sample_rows,
                               train_loop)


def _regression_step(model, optimizer, optimize):
    def step(batch, generator):
        loss = (model(batch["x"]) - batch["y"]).pow(2).mean()
        return StepResult(loss.item(), skipped=not optimize(optimizer, loss))
    return step


def _problem(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    return x, y


def _run(until, state=None, model=None, **kwargs):
    x, y = _problem()
    model = model or nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    state = train_loop(_regression_step(model, optimizer, optimization_manager()),
                       sample_rows({"x": x, "y": y}, 16), {"model": optimizer}, until, seed=3, state=state,
                       on_step=lambda step, loss: losses.append((step, loss)), **kwargs)
    return model, state, losses


def test_loop_trains_and_resumes_where_it_stopped():
    model, state, losses = _run(40)
    assert state.step == 40 and [s for s, _ in losses] == list(range(1, 41))
    assert losses[-1][1] < 0.1 * losses[0][1]
    assert state.optimizers["model"]["state"]  # momentum buffers are kept for a resume
    _, resumed, more = _run(50, state=TrainState(state.step, dict(state.optimizers)), model=model)
    assert resumed.step == 50 and [s for s, _ in more] == list(range(41, 51))
    _, same, none = _run(50, state=resumed, model=model)   # nothing left to do
    assert same.step == 50 and none == []


def test_a_resumed_run_is_reproducible():
    torch.manual_seed(0)
    start = nn.Linear(3, 1)
    first, second = nn.Linear(3, 1), nn.Linear(3, 1)
    first.load_state_dict(start.state_dict())
    second.load_state_dict(start.state_dict())
    _, state_a, _ = _run(10, model=first)
    _, state_b, _ = _run(10, model=second)
    _run(20, state=state_a, model=first)
    _run(20, state=state_b, model=second)
    assert torch.equal(first.weight, second.weight)


def test_checkpoints_every_n_steps_and_at_the_end():
    seen = []
    _run(10, checkpoint_every=4, on_checkpoint=lambda state: seen.append(state.step))
    assert seen == [4, 8, 10]


def test_warmup_scales_the_learning_rate_linearly():
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _problem()
    rates = []

    def step(batch, generator):
        rates.append(optimizer.param_groups[0]["lr"])
        return StepResult(0.0)

    train_loop(step, sample_rows({"x": x, "y": y}, 4), {"model": optimizer}, 6, warmup_steps=4)
    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_gradient_clipping_bounds_the_update_and_nonfinite_gradients_skip_the_step():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    optimize = optimization_manager(grad_clip=0.5)
    assert optimize(optimizer, (model(torch.tensor([[100.0, 0.0]])) - 1e4).pow(2).sum())
    assert torch.linalg.norm(model.weight).item() == pytest.approx(0.5, rel=1e-5)
    before = model.weight.detach().clone()
    assert not optimize(optimizer, model(torch.tensor([[float("nan"), 0.0]])).sum())
    assert torch.equal(model.weight, before)


def test_skipped_steps_are_counted_and_leave_the_ema_alone():
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ema_model(model, 0.5)
    x = torch.ones(8, 1)

    def step(batch, generator):
        skipped = len(calls) % 2 == 1
        calls.append(skipped)
        if not skipped:
            with torch.no_grad():
                model.weight += 1.0
        return StepResult(1.0, skipped=skipped)

    calls = []
    state = train_loop(step, sample_rows({"x": x}, 4), {"model": optimizer}, 4, ema=ema, ema_of=model)
    assert state.counters == {"skipped": 2}
    assert int(ema.n_averaged) == 2 and state.ema is not None


def test_ema_follows_the_weights_with_its_decay():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = ema_model(model, 0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(batch, generator):
        with torch.no_grad():
            model.weight += 1.0          # weights 1, 2, 3 after the three steps
        return StepResult(0.0)

    train_loop(step, sample_rows({"x": torch.zeros(4, 1)}, 2), {"model": optimizer}, 3, ema=ema, ema_of=model)
    # the first update copies (1), then 0.9·1 + 0.1·2 = 1.1, then 0.9·1.1 + 0.1·3 = 1.29
    assert ema.module.weight.item() == pytest.approx(1.29)
    assert model.weight.item() == pytest.approx(3.0)
    assert ema_model(model, None) is None


def test_balanced_sampler_draws_every_class_and_shares_rows_across_pools():
    labels = torch.tensor([0] * 90 + [1] * 10)
    x = torch.arange(100.0)[:, None]
    sample = sample_rows({"x": x, "y": labels}, 32, labels=labels)
    generator = torch.Generator().manual_seed(0)
    batch = sample(generator)
    assert (batch["y"] == 1).sum() == 16 and torch.equal(batch["x"][:, 0].long() >= 90, batch["y"] == 1)
    critic = sample_rows({"x": x}, 5, draws=3)(generator)
    assert critic["x"].shape == (3, 5, 1)
    with pytest.raises(ValueError, match="one length"):
        sample_rows({"x": x, "other": torch.zeros(7, 2)}, 5)
    # independent pools: a merged sampler draws their rows separately, even at equal lengths
    merged = merge_samplers(sample_rows({"x": x}, 50), sample_rows({"outliers": x.clone()}, 50))(generator)
    assert set(merged) == {"x", "outliers"} and not torch.equal(merged["x"], merged["outliers"])


def test_a_resumed_run_keeps_the_configured_learning_rate():
    _, state, _ = _run(5)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _problem()
    train_loop(_regression_step(model, optimizer, optimization_manager()), sample_rows({"x": x, "y": y}, 4),
               {"model": optimizer}, 6, state=state)
    assert optimizer.param_groups[0]["lr"] == 0.01
