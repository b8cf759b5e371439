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

    ``poly``: ``lr0 (1 - t)^0.9`` (nnU-Net). ``cosine_restarts``: ``COSINE_CYCLES`` cosine decays from lr0 to
    ``COSINE_MIN_SHARE`` lr0, each restarting at lr0 (seed 000). ``onecycle``: cosine warm-up from
    lr0/25 to lr0 over the first 30 %, then cosine decay to lr0/25/1e4 (seed 001; torch's OneCycleLR).
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
    """SGD with Nesterov momentum (nnU-Net) or Adam (seed 000), with the stage's weight decay."""
    if stage.optimizer == "sgd":
        return torch.optim.SGD(params, lr=stage.learning_rate, momentum=stage.momentum, nesterov=True,
                               weight_decay=stage.weight_decay)
    if stage.optimizer == "adam":
        return torch.optim.Adam(params, lr=stage.learning_rate, weight_decay=stage.weight_decay)
    raise ValueError(f"unknown optimizer {stage.optimizer!r}")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
