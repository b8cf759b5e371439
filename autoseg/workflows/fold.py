"""Train one fold, then validate it: the training step followed by prediction and scoring of the fold's
validation cases (rank 0 only)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from autoseg.runconfig import Overrides
from autoseg.training.progress import append_log
from autoseg.training.runtime import Runtime
from autoseg.training.trainer import Trainer
from autoseg.workflows.validate import validate_fold

__all__ = ["train_fold"]


def train_fold(run_dir: Path, fold: str, overrides: Overrides, runtime: Runtime, restart: bool = False,
               say: Callable[[str], None] = print) -> dict | None:
    """Train ``fold`` of ``run_dir`` (resuming, or only validating when it is already trained), then predict
    its validation cases into ``fold_<k>/validation/`` and score them. Returns the validation metrics on rank
    0, None on the other ranks.

    Raises:
        TrainingInterrupted: after SIGINT/SIGTERM, once ``latest`` is written.
        ValueError: see :meth:`Trainer.fit`.
    """
    trainer = Trainer(run_dir, fold, overrides, runtime, restart, say)
    net = trainer.fit()
    if not runtime.main:
        return None
    cfg = trainer.config
    assert cfg is not None
    t0 = time.perf_counter()
    metrics = validate_fold(trainer.run_dir, trainer.fold_dir, trainer.plans, cfg.val_cases, net,
                            cfg.stages[-1].patch_size, runtime.device, runtime.progress)
    per_class = "  ".join(f"{k} {v:.4f}" for k, v in metrics["mean_per_class"].items())
    line = (f"validation  {len(cfg.val_cases)} cases, Dice {per_class}; mean {metrics['mean_foreground_dice']:.4f}"
            f" ({time.perf_counter() - t0:.0f} s) -> {trainer.fold_dir / 'validation' / 'metrics.json'}")
    say(line)
    append_log(trainer.fold_dir / "training_log.txt", line)
    return metrics
