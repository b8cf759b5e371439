"""Learning-rate schedules against torch's own schedulers, and the optimisers' hyper-parameters and updates."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.optim import lr_scheduler

from autoseg import defaults
from autoseg.plans import StagePlan
from autoseg.training.schedules import learning_rate, make_optimizer, set_learning_rate

LR0 = 0.01
Scheduler = Callable[[torch.optim.Optimizer], lr_scheduler.LRScheduler]


def stage(scheduler: str, optimizer: str = "sgd", lr: float = LR0) -> StagePlan:
    return StagePlan("zoom_in", [8, 8, 8], 2, 1.0, 0.1, 1.0, 10, 10, optimizer, lr, 0.99, 3e-5,  # type: ignore[arg-type]
                     scheduler, None)  # type: ignore[arg-type]


def torch_rates(make: Scheduler, steps: int) -> list[float]:
    """The learning rate torch's scheduler gives each of ``steps`` optimiser steps (step 0 first)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0)
    sched = make(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def ours(scheduler: str, steps: int, total: int) -> list[float]:
    return [learning_rate(stage(scheduler), i, total) for i in range(steps)]


@pytest.mark.parametrize("total", [400, 1000])
def test_poly_is_torch_polynomial_lr(total):
    theirs = torch_rates(lambda o: lr_scheduler.PolynomialLR(o, total_iters=total, power=defaults.POLY_EXPONENT),
                         total + 3)
    # every trained step, the end of the curve (step == total) and beyond it (torch stays at 0, we clamp)
    assert ours("poly", total + 3, total) == pytest.approx(theirs, rel=1e-12, abs=1e-18)
    assert ours("poly", total + 1, total)[-1] == 0.0


@pytest.mark.parametrize("total", [400, 1000])
def test_cosine_restarts_is_torch_warm_restarts(total):
    t0 = total // defaults.COSINE_CYCLES
    low = LR0 * defaults.COSINE_MIN_SHARE
    theirs = torch_rates(lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=t0, eta_min=low), total + 1)
    mine = ours("cosine_restarts", total + 1, total)
    assert mine[:total] == pytest.approx(theirs[:total], rel=1e-12, abs=1e-18)  # every trained step
    assert [mine[c * t0] for c in range(defaults.COSINE_CYCLES)] == [LR0] * defaults.COSINE_CYCLES  # restarts
    # after the last update: the end of our curve is the floor; torch has started a fifth cycle
    assert mine[total] == pytest.approx(low, rel=1e-12) and theirs[total] == pytest.approx(LR0, rel=1e-12)


def one_cycle(total_steps: int, pct_start: float) -> Scheduler:
    return lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=LR0, total_steps=total_steps, pct_start=pct_start, anneal_strategy="cos",
        div_factor=defaults.ONECYCLE_DIV_START, final_div_factor=defaults.ONECYCLE_DIV_END, three_phase=False,
        cycle_momentum=False)


@pytest.mark.parametrize("total", [400, 1000])
def test_onecycle_is_torch_one_cycle_with_one_more_step(total):
    """Our curve (peak at 30 % of the steps, end at step ``total``) is torch's OneCycleLR over ``total + 1``
    steps with the warm-up share moved so that its peak, at step ``pct_start * steps - 1``, lands on ``0.3 total``."""
    share = defaults.ONECYCLE_WARMUP_SHARE
    theirs = torch_rates(one_cycle(total + 1, (share * total + 1) / (total + 1)), total + 1)
    mine = ours("onecycle", total + 1, total)
    assert mine == pytest.approx(theirs, rel=1e-12, abs=1e-18)
    start = LR0 / defaults.ONECYCLE_DIV_START
    assert mine[0] == pytest.approx(start, rel=1e-12)
    assert max(mine) == mine[round(share * total)] == pytest.approx(LR0, rel=1e-12)
    assert mine[total] == pytest.approx(start / defaults.ONECYCLE_DIV_END, rel=1e-12)


def test_onecycle_differs_from_torch_defaults_by_one_step():
    """torch's OneCycleLR(total_steps=N, pct_start=0.3) peaks at step 0.3 N - 1 and ends at N - 1, one step
    earlier than ours; its warm-up is one step short of 30 % (119 of 399 intervals here)."""
    n = 400
    share = defaults.ONECYCLE_WARMUP_SHARE
    theirs = torch_rates(one_cycle(n, share), n)
    mine = ours("onecycle", n + 1, n)
    assert theirs.index(max(theirs)) == round(share * n) - 1 and mine.index(max(mine)) == round(share * n)
    end = LR0 / defaults.ONECYCLE_DIV_START / defaults.ONECYCLE_DIV_END
    assert theirs[n - 1] == pytest.approx(end, rel=1e-12) and mine[n] == pytest.approx(end, rel=1e-12)
    # the same warm-up start, and at the last trained step ours is still above torch's end by lr0 (pi/(0.7N))^2/4
    assert theirs[0] == pytest.approx(mine[0], rel=1e-12)
    assert mine[n - 1] == pytest.approx(end + (LR0 - end) * (3.141592653589793 / (0.7 * n)) ** 2 / 4, rel=1e-4)


def test_steps_outside_the_stage_are_clamped_and_unknown_schedulers_rejected():
    for name in ("poly", "cosine_restarts", "onecycle"):
        assert learning_rate(stage(name), -5, 100) == learning_rate(stage(name), 0, 100)
        assert learning_rate(stage(name), 150, 100) == learning_rate(stage(name), 100, 100)
    with pytest.raises(ValueError, match="unknown scheduler 'step'"):
        learning_rate(stage("step"), 0, 100)


def test_sgd_is_nesterov_with_the_stage_hyper_parameters():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make_optimizer(stage("poly"), [p])
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"], g["dampening"]) == (LR0, 0.99, True, 3e-5, 0)
    # first step by hand: d = grad + wd p; buffer = d; Nesterov: p -= lr (d + momentum buffer) = lr (1.99 d)
    p.grad = torch.tensor([0.5, 0.25])
    d = torch.tensor([0.5 + 3e-5 * 1.0, 0.25 + 3e-5 * -2.0])
    expected = torch.tensor([1.0, -2.0]) - LR0 * (d + 0.99 * d)
    opt.step()
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


def test_adam_uses_l2_weight_decay_and_torch_defaults():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make_optimizer(stage("poly", "adam", 1e-3), [p])
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 3e-5)
    # first step by hand: g' = grad + wd p; bias-corrected m = g', v = g'^2: p -= lr g' / (|g'| + eps)
    p.grad = torch.tensor([0.5, -0.25])
    gp = torch.tensor([0.5 + 3e-5 * 1.0, -0.25 + 3e-5 * -2.0])
    expected = torch.tensor([1.0, -2.0]) - 1e-3 * gp / (gp.abs() + 1e-8)
    opt.step()
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer(stage("poly", "rmsprop"), [p])


def test_set_learning_rate_sets_every_group():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.2}], lr=0.3)
    set_learning_rate(opt, 0.05)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
