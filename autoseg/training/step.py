"""One optimiser step: forward under autocast, backward (through the GradScaler under AMP), gradient
clipping, and what to do when the numbers go wrong.

A step whose gradients are not finite is skipped: under AMP the ``GradScaler`` skips it and lowers its scale
(an fp16 overflow of the scaled gradients is routine there, the loss itself being finite); in fp32 the
optimiser is not stepped. The decision uses the gradients after DDP's all-reduce, which every rank holds
identically, so all ranks skip together. Training stops (:class:`NonFiniteGuard`) only after
``MAX_NON_FINITE_IN_A_ROW`` steps in a row whose loss was not finite on some rank, or when the weights are no
longer finite."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from autoseg.device import is_gpu_out_of_memory, is_out_of_memory
from autoseg.training.schedules import set_learning_rate

__all__ = ["Stepper", "StepResult", "TrainingDiverged", "OutOfMemory", "MAX_NON_FINITE_IN_A_ROW",
           "MAX_SKIPPED_IN_A_ROW", "NonFiniteGuard", "weights_finite", "out_of_memory_message",
           "guard_out_of_memory"]

T = TypeVar("T")
#: steps in a row with a non-finite loss (on any rank) after which training is declared diverged
MAX_NON_FINITE_IN_A_ROW = 10
#: skipped steps in a row (non-finite gradients, finite loss) after which training is declared diverged: in
#: fp32 such gradients are a fault; under AMP the scaler halves its scale at each one, and 2^16 -> 2^-14 takes 30
MAX_SKIPPED_IN_A_ROW = {False: 10, True: 30}


class TrainingDiverged(ValueError):
    """The loss or the weights stayed non-finite; the message says what to change."""


class OutOfMemory(ValueError):
    """The device ran out of memory; the message says what ran out and what to do."""


def weights_finite(net: nn.Module) -> bool:
    """Whether every parameter is finite (one reduction per parameter, one host sync)."""
    flags = [torch.isfinite(p).all() for p in net.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


@dataclass
class StepResult:
    loss: float
    skipped: bool


class Stepper:
    """Runs optimiser steps of one stage.

    Args:
        model: the network as called (wrapped in DDP when distributed).
        net: the bare network (its parameters are clipped and checked).
        loss_scale: multiplies the loss before backward; DDP averages gradients over ranks, so a rank with
            ``b`` of the global ``B`` samples scales by ``b * world_size / B`` to weigh every sample the same.
        amp: float16 autocast and a GradScaler (CUDA only).
    """

    def __init__(self, model: nn.Module, net: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp: bool, grad_clip: float, loss_scale: float = 1.0):
        self.model, self.net, self.loss_fn, self.opt = model, net, loss_fn, optimizer
        self.device, self.amp, self.grad_clip, self.loss_scale = device, amp, grad_clip, loss_scale
        self.scaler = torch.amp.GradScaler(device.type) if amp else None
        self.skipped_in_a_row = 0

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, where: str,
             guide: torch.Tensor | None = None) -> StepResult:
        """One optimiser step on batch ``(x, y)`` at learning rate ``lr``.

        Args:
            where: stage and step, for messages.
            guide: the patch-free network's guidance-patch corners, passed to it after ``x``.

        Raises:
            TrainingDiverged: the ``MAX_SKIPPED_IN_A_ROW``-th skipped step in a row (every rank decides the same:
                the gradients are all-reduced).
        """
        set_learning_rate(self.opt, lr)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.amp):
            loss = self.loss_fn(self.model(x) if guide is None else self.model(x, guide), y)
        scaled = loss * self.loss_scale if self.loss_scale != 1.0 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
            self.scaler.unscale_(self.opt)
        else:
            scaled.backward()
        norm = nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        finite = bool(torch.isfinite(norm))
        if self.scaler is not None:
            self.scaler.step(self.opt)  # skips the update itself when the gradients overflowed
            self.scaler.update()
        elif finite:
            self.opt.step()
        self.skipped_in_a_row = 0 if finite else self.skipped_in_a_row + 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW[self.amp]:
            raise TrainingDiverged(f"{where}: {self.skipped_in_a_row} steps in a row had non-finite gradients; "
                                   "training diverged. Lower the stage's learning_rate in plans.json, then train "
                                   "with --restart")
        return StepResult(float(loss.detach()), not finite)

    def check_weights(self, where: str) -> None:
        """Raises:
        TrainingDiverged: a weight is NaN or infinite."""
        if not weights_finite(self.net):
            raise TrainingDiverged(f"{where}: the network's weights are no longer finite; training diverged. Lower "
                                   "the stage's learning_rate in plans.json, then train with --restart")


class NonFiniteGuard:
    """Counts steps in a row whose loss was not finite (on any rank: the trainer passes the agreed flag)."""

    def __init__(self, limit: int = MAX_NON_FINITE_IN_A_ROW):
        self.limit, self.in_a_row = limit, 0

    def observe(self, non_finite: bool, where: str) -> None:
        """Raises:
        TrainingDiverged: the ``limit``-th non-finite loss in a row."""
        self.in_a_row = self.in_a_row + 1 if non_finite else 0
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(f"{where}: the loss was not finite in {self.limit} steps in a row; training "
                                   "diverged. Lower the stage's learning_rate in plans.json, then train with "
                                   "--restart")


def out_of_memory_message(gpu: bool, device: torch.device, what: str, patch: list[int], batch: int,
                          estimated_gib: float | None) -> str:
    """One line: what ran out of memory (the GPU's when ``gpu``, else RAM), where, and what to do about it."""
    gpu = gpu and device.type == "cuda"
    est = f"; the plan estimated {estimated_gib:.2f} GiB per step" if estimated_gib else ""
    free = ""
    if gpu:
        free_b, total_b = torch.cuda.mem_get_info(device)
        free = f" ({free_b / 2**30:.1f} of {total_b / 2**30:.1f} GiB free now)"
    shape = "x".join(map(str, patch))
    if gpu:
        what_ran_out = f"{device} out of memory{free}"
        advice = ("free the GPU of other processes and run the same command again, or plan for less memory "
                  "(autoseg plan DATASET --gpu-memory GB, a smaller GB) and train with --restart")
    else:
        what_ran_out = "out of memory (RAM)"
        advice = ("close other programs or use fewer data workers (-j) and run the same command again, or plan "
                  "again on this machine and train with --restart")
    return f"{what_ran_out} in {what} (patch {shape}, batch {batch} per process{est}): {advice}"


def guard_out_of_memory(device: torch.device, what: str, patch: list[int], batch: int, estimated_gib: float | None,
                        work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, with running out of memory turned into :class:`OutOfMemory`, one line saying what ran
    out, where and what to do.

    Raises:
        OutOfMemory: ``work`` ran out of GPU memory or RAM.
    """
    try:
        return work(*args)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        gpu = is_gpu_out_of_memory(e)
    # outside the except block: its traceback no longer holds the frames (and tensors) of the failed step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    raise OutOfMemory(out_of_memory_message(gpu, device, what, patch, batch, estimated_gib))
