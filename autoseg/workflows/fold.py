"""Train one fold, then validate it: the training step followed by prediction and scoring of the fold's
validation cases (rank 0 only)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from autoseg.defaults import VALIDATION_TTA_MAX_BUDGET_SHARE
from autoseg.locking import JobLock, fold_lock_path
from autoseg.parallel import available_cores
from autoseg.plans import Plans
from autoseg.runconfig import Overrides, TrainConfig, fold_cases
from autoseg.training.progress import append_log
from autoseg.training.runtime import Runtime
from autoseg.training.trainer import Trainer
from autoseg.workflows.validate import check_references, unmirrored_dice, validate_fold, validation_cost

__all__ = ["train_fold", "validation_line"]


def train_fold(run_dir: Path, fold: str, overrides: Overrides, runtime: Runtime, restart: bool = False,
               say: Callable[[str], None] = print, configuration: str | None = None) -> dict | None:
    """Train ``fold`` of ``run_dir`` in ``configuration`` (None: the plan's default; resuming, or only
    validating when it is already trained), then predict its validation cases into ``fold_<k>/validation/``
    and score them. Returns the validation metrics on rank 0, None on the other ranks.

    Raises:
        TrainingInterrupted: after SIGINT/SIGTERM, once ``latest`` is written.
        ValueError: see :meth:`Trainer.fit`.
        LockedError: another process is training this fold.
    """
    def probe(plans: Plans, cfg: TrainConfig, net: nn.Module) -> float:
        """Measure the validation; under a budget, mirror only if that fits its share of the budget, and predict
        one-pass cases by tiles too only if that does."""
        cost = validation_cost(Path(run_dir), plans, cfg.val_cases, net, cfg.stages[-1].patch_size, runtime.device)
        minutes = cfg.overrides.time_budget_minutes
        share = VALIDATION_TTA_MAX_BUDGET_SHARE * minutes * 60 if minutes is not None else None
        mirrored = cost.seconds(True, tiles=False)
        cfg.validation_tta = share is None or mirrored <= share
        if not cfg.validation_tta:
            say(f"validation  without mirroring: with it, it would take ~{mirrored:.0f} s, more than "
                f"{VALIDATION_TTA_MAX_BUDGET_SHARE:.0%} of the time budget (autoseg predict still mirrors)")
        cfg.validation_tiles = share is None or cost.tiled_seconds <= share
        if not cfg.validation_tiles:
            say(f"validation  one pass only: also predicting its cases by tiles would take ~{cost.tiled_seconds:.0f} "
                f"s, more than {VALIDATION_TTA_MAX_BUDGET_SHARE:.0%} of the time budget (find-best then keeps the "
                "one pass)")
        return cost.seconds(cfg.validation_tta, cfg.validation_tiles)

    trainer = Trainer(run_dir, fold, overrides, runtime, restart, say, validation_probe=probe,
                      configuration=configuration)
    lock = JobLock(fold_lock_path(trainer.fold_dir), f"training of {trainer.fold_dir}")
    runtime.from_main(lock.acquire)  # every rank learns that another process trains this fold
    try:
        runtime.from_main(lambda: check_references(Path(run_dir), fold_cases(trainer.plans, fold)[1]))
        return _fit_and_validate(trainer, runtime, say)
    finally:
        lock.release()


def _fit_and_validate(trainer: Trainer, runtime: Runtime, say: Callable[[str], None]) -> dict | None:
    """Train (or resume, or load the trained fold), then validate on rank 0; the metrics, None on other ranks."""
    net = trainer.fit()
    if not runtime.main:
        return None
    if runtime.distributed and runtime.device.type == "cpu":  # the other ranks are done: validate on every core
        torch.set_num_threads(available_cores())
    cfg = trainer.config
    assert cfg is not None
    t0 = time.perf_counter()
    metrics = validate_fold(trainer.run_dir, trainer.fold_dir, trainer.plans, cfg.val_cases, net,
                            cfg.stages[-1].patch_size, runtime.device, runtime.progress, cfg.validation_tta,
                            cfg.validation_tiles)
    line = validation_line(metrics, cfg, time.perf_counter() - t0, trainer.fold_dir / "validation" / "metrics.json")
    say(line)
    append_log(trainer.fold_dir / "training_log.txt", line)
    return metrics


def validation_line(metrics: dict, cfg: TrainConfig, seconds: float, path: Path) -> str:
    """The log line of a fold's validation: Dice per class and mean, seconds (and the budget's estimate),
    whether it mirrored, and for cases a patch-free network segmented in one pass, its unmirrored Dice against
    tiles'."""
    per_class = "  ".join(f"{k} {v:.4f}" for k, v in metrics["mean_per_class"].items())
    notes = f"; the time budget planned {cfg.measured_validation_seconds:.0f} s" \
        if cfg.measured_validation_seconds is not None else ""
    notes += "" if cfg.validation_tta else "; no mirroring"
    tiled = metrics.get("tiled_without_mirroring")
    if tiled is not None:
        one = _one_pass_mean(metrics, list(tiled["cases"]))
        notes += (f"; {len(tiled['cases'])} case(s) in one pass, unmirrored {one:.4f} against tiles "
                  f"{tiled['mean_foreground_dice']:.4f}")
    elif metrics.get("one_pass_cases"):
        notes += f"; {len(metrics['one_pass_cases'])} case(s) in one pass, not compared with tiles"
    return (f"validation  {len(cfg.val_cases)} cases, Dice {per_class}; mean {metrics['mean_foreground_dice']:.4f}"
            f" ({seconds:.0f} s{notes}) -> {path}")


def _one_pass_mean(metrics: dict, case_ids: list[str]) -> float:
    """Mean over ``case_ids`` and foreground classes of the unmirrored Dice of a validation's main prediction."""
    per = unmirrored_dice(metrics)
    return float(sum(sum(per[c].values()) / len(per[c]) for c in case_ids) / len(case_ids))
