"""Optimisers and learning-rate schedules, as pure functions of the step so that a resumed run follows the
same curve as an uninterrupted one (the schedule's only state is the step counter in the checkpoint)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from autoseg import defaults
from autoseg.plans import StagePlan

__all__ = ["learning_rate", "make_optimizer", "set_learning_rate"]


def learning_rate(stage: StagePlan, step: int, total_steps: int) -> float:
    """The learning rate of ``stage`` at ``step`` of ``total_steps`` (0-based).

    Every schedule is a function of ``t = step / total_steps`` on ``[0, 1]`` (``step`` clamped to
    ``0..total_steps``): training uses steps ``0 .. total_steps - 1``, and ``t = 1`` is the end of the curve,
    reached just after the last update.

    ``poly``: ``lr0 (1 - t)^0.9`` (nnU-Net); equal to torch's ``PolynomialLR(total_iters=total_steps,
    power=POLY_EXPONENT)`` at every step.

    ``cosine_restarts``: ``COSINE_CYCLES`` cosine decays from lr0 to ``COSINE_MIN_SHARE`` lr0, each restarting at
    lr0 (seed 000); equal to torch's ``CosineAnnealingWarmRestarts(T_0=total_steps / COSINE_CYCLES,
    eta_min=COSINE_MIN_SHARE lr0)`` at every training step. At ``step == total_steps`` this returns the floor (the
    curve's end) where torch would restart at lr0; that step is never trained. torch needs an integer ``T_0``;
    this does not.

    ``onecycle``: cosine warm-up from lr0/25 to lr0 over ``t`` in ``[0, 0.3]``, then cosine decay to
    lr0/25/1e4 at ``t = 1`` (seed 001). torch's ``OneCycleLR(total_steps=N, pct_start=0.3)`` places the peak at
    step ``0.3 N - 1`` and the end at step ``N - 1``: its warm-up covers ``0.3 N - 1`` of the ``N - 1`` step
    intervals, not 30 %, and its end convention differs from that of its own ``PolynomialLR`` and
    ``CosineAnnealingWarmRestarts``. We keep the share exact and one convention for all three schedules: this
    curve is torch's with one more step, ``OneCycleLR(total_steps=N + 1, pct_start=(0.3 N + 1) / (N + 1))``
    (peak at step ``0.3 N``, end at step ``N``); ``tests/training/test_schedules.py`` pins both relations. The
    last trained step's rate, lr0 ``(pi / (1.4 N))^2`` or so, differs from torch's final lr0/25/1e4 by
    nothing that matters.

    Args:
        stage: the stage's plan (initial rate ``learning_rate`` and ``scheduler``).
        step: optimiser steps done so far.
        total_steps: steps of the stage.

    Returns:
        The learning rate.

    Raises:
        ValueError: unknown scheduler.
    """
    lr0 = stage.learning_rate
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    if stage.scheduler == "poly":
        return lr0 * (1 - t) ** defaults.POLY_EXPONENT
    if stage.scheduler == "cosine_restarts":
        cycle = (t * defaults.COSINE_CYCLES) % 1.0 if t < 1 else 1.0
        low = lr0 * defaults.COSINE_MIN_SHARE
        return low + 0.5 * (lr0 - low) * (1 + math.cos(math.pi * cycle))
    if stage.scheduler == "onecycle":
        start = lr0 / defaults.ONECYCLE_DIV_START
        end = start / defaults.ONECYCLE_DIV_END
        w = defaults.ONECYCLE_WARMUP_SHARE
        if t < w:
            return start + 0.5 * (lr0 - start) * (1 - math.cos(math.pi * t / w))
        return end + 0.5 * (lr0 - end) * (1 + math.cos(math.pi * (t - w) / (1 - w)))
    raise ValueError(f"unknown scheduler {stage.scheduler!r}")


def make_optimizer(stage: StagePlan, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (nnU-Net) or Adam (seed 000), with the stage's weight decay.

    Args:
        stage: the stage's plan (``optimizer``, ``learning_rate``, ``momentum`` for SGD, ``weight_decay``: an L2
            term added to the gradient, for Adam too, not AdamW's decoupled decay).
        params: the parameters to optimise.

    Returns:
        The optimiser; Adam keeps torch's betas (0.9, 0.999) and eps 1e-8.

    Raises:
        ValueError: unknown optimiser.
    """
    if stage.optimizer == "sgd":
        return torch.optim.SGD(params, lr=stage.learning_rate, momentum=stage.momentum, nesterov=True,
                               weight_decay=stage.weight_decay)
    if stage.optimizer == "adam":
        return torch.optim.Adam(params, lr=stage.learning_rate, weight_decay=stage.weight_decay)
    raise ValueError(f"unknown optimizer {stage.optimizer!r}")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
