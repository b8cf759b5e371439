"""A fold's run configuration built from the plan and the command line's overrides (the stages to train,
their epochs and learning rates); the format itself is :mod:`autoseg.runconfig`."""

from __future__ import annotations

from autoseg import __version__
from autoseg.plans import Plans, StagePlan
from autoseg.runconfig import Overrides, StageRun, TrainConfig, fold_cases

__all__ = ["stage_runs", "new_config"]


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


def new_config(plans: Plans, fold: str, o: Overrides, device: str, world_size: int) -> TrainConfig:
    train, val = fold_cases(plans, fold)
    return TrainConfig(__version__, fold, train, val, o, stage_runs(plans, o), [], device, world_size,
                       configuration=plans.configuration)
