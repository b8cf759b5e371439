"""The run configuration of one fold (``fold_<k>/config.json``): which stages run, for how many epochs, and
why (the overrides asked for, the step times a time budget was computed from). Written by training, read by
training on resume and by prediction (the patch of the last stage); a shared artefact below both."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from autoseg.plans import TOP_CONFIGURATION, Plans, StagePlan
from autoseg.typedjson import SchemaError, from_jsonable, read_json, write_json_atomic

__all__ = ["Overrides", "StageRun", "TrainConfig", "CONFIG_FILE", "fold_cases", "fold_dir_name", "load_config",
           "save_config", "model_dir"]

CONFIG_FILE = "config.json"
StageChoice = Literal["zoom-in", "zoom-out", "both"]


@dataclass
class Overrides:
    """What the user asked for on the command line (None: the plan's value).

    Attributes:
        deterministic: cuDNN in deterministic mode and without autotuning (``--deterministic``): a resumed
            run on a GPU then takes exactly the steps of an uninterrupted one, at some cost in speed.
        stop_at_dice: early stopping (``--stop-at-dice``): a stage ends once the EMA pseudo-Dice of every
            foreground class reaches its bar; one bar for all classes or one per class; empty: off.
        patience: early stopping (``--patience``): a stage ends after this many epochs without a new best EMA
            pseudo-Dice; None: off.
    """

    stage: StageChoice
    epochs: int | None
    iterations_per_epoch: int | None
    time_budget_minutes: float | None
    deterministic: bool = False
    stop_at_dice: list[float] = field(default_factory=list)
    patience: int | None = None

    def describe(self) -> str:
        """The options as typed on the command line, e.g. ``--stage both --epochs 8``."""
        parts = [f"--stage {self.stage}"]
        if self.epochs is not None:
            parts.append(f"--epochs {self.epochs}")
        if self.iterations_per_epoch is not None:
            parts.append(f"--iterations-per-epoch {self.iterations_per_epoch}")
        if self.time_budget_minutes is not None:
            parts.append(f"--time-budget {self.time_budget_minutes:g}")
        if self.deterministic:
            parts.append("--deterministic")
        if self.stop_at_dice:
            parts.append("--stop-at-dice " + ",".join(f"{b:g}" for b in self.stop_at_dice))
        if self.patience is not None:
            parts.append(f"--patience {self.patience}")
        return " ".join(parts)


@dataclass
class StageRun:
    """One stage as it is actually trained. ``batch_size`` is the global batch (all ranks together)."""

    name: str
    patch_size: list[int]
    batch_size: int
    epochs: int
    iterations_per_epoch: int
    optimizer: Literal["sgd", "adam"]
    learning_rate: float
    momentum: float
    weight_decay: float
    scheduler: Literal["poly", "cosine_restarts", "onecycle"]
    init_from: str | None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iterations_per_epoch

    def as_stage_plan(self) -> StagePlan:
        """The fields the optimiser and schedule read, in the plan's type."""
        return StagePlan(self.name, self.patch_size, self.batch_size, 0, 0, 0, self.epochs,  # type: ignore[arg-type]
                         self.iterations_per_epoch, self.optimizer, self.learning_rate, self.momentum,
                         self.weight_decay, self.scheduler, self.init_from)


@dataclass
class TrainConfig:
    autoseg_version: str
    fold: str
    train_cases: list[str]
    val_cases: list[str]
    overrides: Overrides
    stages: list[StageRun]
    measured_step_seconds: list[float]
    device: str
    world_size: int
    #: with a time budget: per stage, the real seconds of its check epoch, from which the epochs of it and the
    #: later stages were corrected
    budget_checks: dict[str, float] = field(default_factory=dict)
    #: with a time budget: the final validation's seconds, measured on one case and scaled to all (None: the
    #: estimate from the tile count and the measured step time)
    measured_validation_seconds: float | None = None
    #: the final validation mirrors as ``autoseg predict`` does; a time budget turns it off when mirroring
    #: would take more than ``defaults.VALIDATION_TTA_MAX_BUDGET_SHARE`` of it
    validation_tta: bool = True
    #: the final validation also predicts by tiles the cases a patch-free network segments in one pass (for
    #: find-best's one pass or tiles); a time budget turns it off when that would take more than
    #: ``defaults.VALIDATION_TTA_MAX_BUDGET_SHARE`` of it
    validation_tiles: bool = True
    #: the plan's configuration this fold trains (``3d``, ``2d``)
    configuration: str = TOP_CONFIGURATION
    #: stages that early stopping ended (``--stop-at-dice``, ``--patience``): stage name -> why, at which epoch
    early_stops: dict[str, str] = field(default_factory=dict)


def fold_dir_name(fold: str) -> str:
    return f"fold_{fold}"


def model_dir(run_dir: Path, configuration: str) -> Path:
    """Where a configuration's folds, cross-validation results and post-processing live: the run directory
    for the plan's top-level configuration (``3d``), ``RUN_DIR/<name>`` for the others."""
    return Path(run_dir) if configuration == TOP_CONFIGURATION else Path(run_dir) / configuration


def fold_cases(plans: Plans, fold: str) -> tuple[list[str], list[str]]:
    """Training and validation case ids of ``fold`` ("0".."k-1", or "all": every case, validated on itself).

    Raises:
        ValueError: no such fold.
    """
    if fold == "all":
        every = sorted({c for f in plans.folds for c in f.train + f.val})
        return every, every
    if not fold.isdigit() or int(fold) >= len(plans.folds):
        raise ValueError(f"fold {fold!r}: the plan has folds 0..{len(plans.folds) - 1} (or 'all')")
    f = plans.folds[int(fold)]
    return list(f.train), list(f.val)


def load_config(path: Path) -> TrainConfig:
    """Raises:
    SchemaError: not a fold configuration of this autoseg (names the file)."""
    try:
        return from_jsonable(TrainConfig, read_json(path))
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None


def save_config(config: TrainConfig, path: Path) -> None:
    write_json_atomic(config, path)
