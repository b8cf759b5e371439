"""Fitting a training schedule into a time budget: measure a step, estimate an epoch and the final
validation, set the epochs per stage, and correct them once a real epoch has been timed."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from autoseg.plans import Plans
from autoseg.runconfig import StageRun, TrainConfig
from autoseg.tiling import mirror_combinations, tile_starts
from autoseg.training.data import read_size
from autoseg.training.device_augment import DeviceAugmenter
from autoseg.training.schedules import make_optimizer

__all__ = ["budget_epochs", "measure_step_seconds", "case_prediction_seconds", "estimates", "fit_budget",
           "refit_epochs", "BUDGET_SAFETY_SECONDS", "BUDGET_STEP_MARGIN", "BUDGET_CHECK_EPOCH"]

#: seconds kept aside in a time budget for starting workers, checkpoints and plots beyond the measured steps
BUDGET_SAFETY_SECONDS = 20.0
#: measured step times are multiplied by this to allow for data waits and timing noise
BUDGET_STEP_MARGIN = 1.06
#: with a time budget, each stage's epochs (and the later stages') are corrected from the real duration of
#: this epoch of it (the first one also pays for starting the data workers)
BUDGET_CHECK_EPOCH = 2


def budget_epochs(runs: list[StageRun], epoch_seconds: list[float], seconds: float) -> list[int]:
    """Epochs per stage so that the stages' planned epoch ratio is kept and the total fits ``seconds``,
    given the seconds one epoch of each stage takes (training steps plus its validation).

    Raises:
        ValueError: not even one epoch of each stage fits.
    """
    first = max(runs[0].epochs, 1)
    ratios = [r.epochs / first for r in runs]
    per_first_epoch = sum(q * t for q, t in zip(ratios, epoch_seconds))
    n = int(seconds // per_first_epoch) if per_first_epoch > 0 else 0
    while n > 0 and sum(max(1, round(n * q)) * t for q, t in zip(ratios, epoch_seconds)) > seconds:
        n -= 1
    if n < 1:
        need = sum(epoch_seconds) / 60
        raise ValueError(f"the time budget leaves {max(seconds, 0) / 60:.1f} min for training, less than one epoch "
                         f"of each stage ({need:.1f} min measured); give more time or fewer --iterations-per-epoch")
    return [max(1, round(n * q)) for q in ratios]


def measure_step_seconds(net: nn.Module, loss_fn: nn.Module, run: StageRun, batch: int, channels: int,
                         classes: int, device: torch.device, amp: bool, augmenter: DeviceAugmenter | None = None,
                         warmup: int = 2, timed: int = 3) -> float:
    """Median seconds of one optimiser step of ``run`` on ``device`` (a throw-away network, random data). With
    ``augmenter`` (the plan augments on the training device), a step includes augmenting a batch of regions as
    the data workers read them, since that runs between the steps."""
    net = net.to(device).train()
    loss_fn = loss_fn.to(device)
    opt = make_optimizer(run.as_stage_plan(), net.parameters())
    size = list(run.patch_size) if augmenter is None else read_size(list(run.patch_size), augmenter.aug, True)
    x = torch.randn(batch, channels, *size, device=device)
    y = torch.randint(0, classes, (batch, *size), device=device)
    times = []
    for i in range(warmup + timed):
        t0 = time.perf_counter()
        xs, ys = (x, y) if augmenter is None else augmenter(x, y, i)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(xs), ys)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def case_prediction_seconds(plans: Plans, last: StageRun, step_seconds: float) -> float:
    """Rough seconds to predict one median case with mirroring: forward ~1/3 of a batch-1 step per tile."""
    shape = [max(m, p) for m, p in zip(plans.median_shape_after_resampling, last.patch_size)]
    tiles = math.prod(len(s) for s in tile_starts(shape, last.patch_size, plans.inference.tile_step))
    step = step_seconds / max(1, last.batch_size)
    return tiles * len(mirror_combinations(plans.inference.mirror_axes)) * step / 3 + 0.5


def estimates(plans: Plans, cfg: TrainConfig) -> tuple[list[float], float]:
    """Estimated seconds of one epoch of each stage (steps and pseudo-Dice), from the measured step times, and
    of the final validation: measured (``cfg.measured_validation_seconds``) when the trainer was given a way to
    measure it, else estimated from the median case's tile count."""
    v = plans.training.validation_iterations
    epoch_s = [r.iterations_per_epoch * t * BUDGET_STEP_MARGIN + v * t / 3 for r, t in
               zip(cfg.stages, cfg.measured_step_seconds)]
    if cfg.measured_validation_seconds is not None:
        return epoch_s, cfg.measured_validation_seconds * BUDGET_STEP_MARGIN
    return epoch_s, len(cfg.val_cases) * case_prediction_seconds(plans, cfg.stages[-1], cfg.measured_step_seconds[-1])


def fit_budget(plans: Plans, cfg: TrainConfig, minutes: float, spent: float) -> str:
    """Set each stage's epochs so that training, per-epoch validation and the final validation fit
    ``minutes``, of which ``spent`` seconds are gone; ``cfg.measured_step_seconds`` must be set. Returns the
    line to print.

    Raises:
        ValueError: not even one epoch of each stage fits (says where the time went).
    """
    epoch_s, final_validation = estimates(plans, cfg)
    left = minutes * 60 - spent - final_validation - BUDGET_SAFETY_SECONDS
    try:
        epochs = budget_epochs(cfg.stages, epoch_s, left)
    except ValueError as too_short:
        raise ValueError(f"--time-budget {minutes:g}: {spent:.0f} s went to measurements, ~{final_validation:.0f} "
                         f"s are kept for the final validation and {BUDGET_SAFETY_SECONDS:g} s spare; {too_short}"
                         ) from None
    for r, n in zip(cfg.stages, epochs):
        r.epochs = n
    how = "measured on one case" if cfg.measured_validation_seconds is not None else "estimated"
    return (f"time budget  {minutes:g} min: measured "
            + ", ".join(f"{r.name} {t:.3f} s/step" for r, t in zip(cfg.stages, cfg.measured_step_seconds))
            + f"; final validation ~{final_validation:.0f} s ({how}) -> epochs " + ", ".join(f"{r.name} {r.epochs}"
                                                                                 for r in cfg.stages))


def refit_epochs(plans: Plans, cfg: TrainConfig, minutes: float, si: int, epoch_seconds: float, epochs_done: int,
                 spent: float) -> list[int]:
    """Epochs of stage ``si`` and the later ones corrected from the real duration of one epoch of it (data
    loading, pseudo-Dice and checkpoints included), which a short measurement of bare steps under- or
    overestimates, more so on a loaded machine. Never fewer than the ``epochs_done`` of stage ``si``."""
    estimate, final_validation = estimates(plans, cfg)
    ratio = epoch_seconds / estimate[si]
    if cfg.measured_validation_seconds is None:  # an estimate from step times is off by as much as they are
        final_validation *= ratio
    left = minutes * 60 - spent - final_validation - BUDGET_SAFETY_SECONDS + epochs_done * epoch_seconds
    rest = cfg.stages[si:]
    try:
        epochs = budget_epochs(rest, [e * ratio for e in estimate[si:]], left)
    except ValueError:
        epochs = [1] * len(rest)
    epochs[0] = max(epochs[0], epochs_done)
    return epochs
