"""The run configuration of one fold: which stages run, for how many epochs, and why (the overrides asked for,
and the step times a time budget was computed from). Written once to ``fold_<k>/config.json``; a resume
uses it unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from autoseg import __version__
from autoseg.plans import Plans, StagePlan
from autoseg.typedjson import SchemaError, from_jsonable, read_json, write_json_atomic

__all__ = ["Overrides", "StageRun", "TrainConfig", "CONFIG_FILE", "stage_runs", "fold_cases", "budget_epochs",
           "load_config", "save_config", "new_config"]

CONFIG_FILE = "config.json"
StageChoice = Literal["zoom-in", "zoom-out", "both"]


@dataclass
class Overrides:
    """What the user asked for on the command line (None: the plan's value)."""

    stage: StageChoice
    epochs: int | None
    iterations_per_epoch: int | None
    time_budget_minutes: float | None


@dataclass
class StageRun:
    """One stage as it is actually trained."""

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


def stage_runs(plans: Plans, o: Overrides) -> list[StageRun]:
    """The stages to train with the overrides applied.

    ``--epochs N`` sets the first trained stage to N epochs and scales the zoom-out stage by the plan's ratio.
    ``--stage zoom-out`` alone is a single-stage schedule: it trains from scratch with the zoom-in stage's
    optimiser and learning rate (the zoom-out rate is a fine-tuning rate).
    """
    zin, zout = plans.stages[0], plans.stages[-1]
    runs = []
    if o.stage in ("zoom-in", "both"):
        runs.append(_run(zin, zin, None))
    if o.stage in ("zoom-out", "both"):
        runs.append(_run(zout, zout if o.stage == "both" else zin, "zoom_in" if o.stage == "both" else None))
    ratio = zout.epochs / max(zin.epochs, 1)
    for i, r in enumerate(runs):
        if o.iterations_per_epoch is not None:
            r.iterations_per_epoch = o.iterations_per_epoch
        if o.epochs is not None:
            r.epochs = o.epochs if i == 0 else max(1, round(o.epochs * ratio))
    return runs


def _run(st: StagePlan, schedule: StagePlan, init_from: str | None) -> StageRun:
    return StageRun(st.name, list(st.patch_size), st.batch_size, st.epochs, st.iterations_per_epoch,
                    schedule.optimizer, schedule.learning_rate, schedule.momentum, schedule.weight_decay,
                    schedule.scheduler, init_from)


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


def load_config(path: Path) -> TrainConfig:
    try:
        return from_jsonable(TrainConfig, read_json(path))
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None


def save_config(config: TrainConfig, path: Path) -> None:
    write_json_atomic(config, path)


def new_config(plans: Plans, fold: str, o: Overrides, device: str, world_size: int) -> TrainConfig:
    train, val = fold_cases(plans, fold)
    return TrainConfig(__version__, fold, train, val, o, stage_runs(plans, o), [], device, world_size)
