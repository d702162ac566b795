"""The optimisation step every recipe shares: accumulation, clipping, non-finite updates, and the schedule's horizon."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from proxim.train.optimization import NonFiniteUpdates, Optimization, parameter_groups
from proxim.train.step_sections import Optimizer


def _setup(settings: Optimizer, horizon: int = 10, lr: float = 0.1) -> tuple[torch.nn.Linear, Optimization]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).double()
    opt = Optimization(Accelerator(cpu=True), parameter_groups([(model, lr)]), settings, horizon=horizon)
    (prepared,) = opt.prepare(model)
    return prepared, opt


def test_micro_batches_accumulate_to_the_full_batch_gradient() -> None:
    x = torch.arange(12, dtype=torch.float64).reshape(4, 3) / 10
    y = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    grads = []
    for parts in ([slice(0, 4)], [slice(0, 1), slice(1, 3), slice(3, 4)]):
        model, opt = _setup(Optimizer(max_grad_norm=0.0))

        def loss_of(part: slice, model: torch.nn.Module = model) -> torch.Tensor:
            return ((model(x[part]).squeeze(-1) - y[part]) ** 2).sum() / 4  # each part's share of the batch mean

        w0 = model.weight.detach().clone()
        # the gradient of the batch mean of squared errors, by hand: (2/4) sum_i (w.x_i - y_i) x_i
        want = 2 / 4 * ((x @ w0.T).squeeze(-1) - y) @ x
        update = opt.update(parts, loss_of)
        assert not update.skipped
        assert update.grad_norm == pytest.approx(float(want.norm()), rel=1e-12)
        grads.append(w0 - model.weight.detach())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)


def test_clipping_scales_the_gradient_to_the_maximum_norm() -> None:
    model, opt = _setup(Optimizer(max_grad_norm=0.5))
    x = torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64)
    update = opt.update([0], lambda _: model(x).sum())  # gradient = x, norm 5: reported before clipping
    assert update.grad_norm == pytest.approx(5.0)
    weight = opt.parameters[0]
    assert weight.grad is None  # zeroed after the step
    # AdamW's first moment after one step is (1 - beta1) g, with g the clipped gradient x * 0.5 / (5 + 1e-6) (torch's clip)
    torch.testing.assert_close(opt.optimizer.state[weight]["exp_avg"], 0.1 * x * 0.5 / (5 + 1e-6), rtol=1e-12, atol=0)


def test_non_finite_updates_are_skipped_counted_and_stop_after_k_in_a_row() -> None:
    model, opt = _setup(Optimizer(max_nonfinite=3))
    w0 = model.weight.detach().clone()
    x = torch.ones(1, 3, dtype=torch.float64)
    nan = lambda _: model(x).sum() * float("nan")  # noqa: E731
    assert opt.update([0], nan).skipped and opt.update([0], nan).skipped
    assert (opt.nonfinite_total, opt.nonfinite_streak) == (2, 2)
    assert torch.equal(model.weight.detach(), w0)  # nothing was applied
    assert not opt.update([0], lambda _: model(x).sum()).skipped  # a good update resets the streak, not the total
    assert (opt.nonfinite_total, opt.nonfinite_streak) == (2, 0)
    opt.update([0], nan)
    opt.update([0], nan)
    with pytest.raises(NonFiniteUpdates, match="3 optimiser updates in a row had a non-finite loss or gradient"):
        opt.update([0], nan)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_restored_state_keeps_its_schedule_horizon(schedule: str) -> None:
    """A run resumed with more steps builds its optimiser for the new total; the saved horizon must win."""
    x = torch.ones(1, 3, dtype=torch.float64)
    model, first = _setup(Optimizer(lr_schedule=schedule, warmup_updates=2), horizon=6)
    lrs = []
    for _ in range(6):
        first.update([0], lambda _: model(x).sum())
        lrs.append(first.lr)
    # transformers' schedules with 2 warm-up updates over 6: the factor after k updates
    frac = [(k - 2) / 4 for k in range(1, 7)]
    want = [k / 2 if k < 2 else (1 - f if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * f))) for k, f in zip(range(1, 7), frac)]
    assert lrs == pytest.approx([0.1 * w for w in want], abs=1e-15)

    model, replay = _setup(Optimizer(lr_schedule=schedule, warmup_updates=2), horizon=6)
    for _ in range(3):
        replay.update([0], lambda _: model(x).sum())
    saved = replay.state_dict()
    model2, resumed = _setup(Optimizer(lr_schedule=schedule, warmup_updates=2), horizon=12)  # "--steps" doubled
    resumed.load_state_dict(saved)
    assert resumed.horizon == 6 and resumed.lr == pytest.approx(lrs[2], abs=1e-15)
    got = []
    for _ in range(3):
        resumed.update([0], lambda _: model2(x).sum())
        got.append(resumed.lr)
    assert got == pytest.approx(lrs[3:], abs=1e-15)
