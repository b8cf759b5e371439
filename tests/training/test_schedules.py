"""Learning-rate schedules and optimisers."""

from __future__ import annotations

import math

import pytest
import torch

from autoseg import defaults
from autoseg.plans import StagePlan
from autoseg.training.schedules import learning_rate, make_optimizer


def stage(scheduler: str, optimizer: str = "sgd", lr: float = 0.01) -> StagePlan:
    return StagePlan("zoom_in", [8, 8, 8], 2, 1.0, 0.1, 1.0, 10, 10, optimizer, lr, 0.99, 3e-5,  # type: ignore[arg-type]
                     scheduler, None)  # type: ignore[arg-type]


def test_poly_matches_nnunet_formula():
    s = stage("poly")
    assert learning_rate(s, 0, 100) == pytest.approx(0.01)
    assert learning_rate(s, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    assert learning_rate(s, 100, 100) == 0.0


def test_cosine_restarts_restart_at_each_cycle():
    s = stage("cosine_restarts")
    n = 100 * defaults.COSINE_CYCLES
    low = 0.01 * defaults.COSINE_MIN_SHARE
    for c in range(defaults.COSINE_CYCLES):
        assert learning_rate(s, 100 * c, n) == pytest.approx(0.01)
        assert learning_rate(s, 100 * c + 50, n) == pytest.approx(low + 0.5 * (0.01 - low))
    assert learning_rate(s, n, n) == pytest.approx(low)


def test_onecycle_warms_up_then_decays():
    s = stage("onecycle")
    start = 0.01 / defaults.ONECYCLE_DIV_START
    assert learning_rate(s, 0, 1000) == pytest.approx(start)
    assert learning_rate(s, 300, 1000) == pytest.approx(0.01)
    assert learning_rate(s, 1000, 1000) == pytest.approx(start / defaults.ONECYCLE_DIV_END)
    assert learning_rate(s, 150, 1000) == pytest.approx(start + 0.5 * (0.01 - start) * (1 - math.cos(math.pi / 2)))
    lrs = [learning_rate(s, i, 1000) for i in range(1001)]
    assert lrs.index(max(lrs)) == 300


def test_optimizers():
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(stage("poly"), p)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    assert sgd.param_groups[0]["momentum"] == 0.99
    assert isinstance(make_optimizer(stage("poly", "adam", 1e-3), p), torch.optim.Adam)
