"""Early stopping of a stage (seed 003's rule, and a patience): decided after each epoch from the EMA of the
pseudo-Dice, so every rank, given the same reduced pseudo-Dice, takes the same decision.

- ``--stop-at-dice``: the stage ends at the first epoch where the EMA pseudo-Dice of every foreground class is
  at least its bar (one bar for all classes, or one per class). A class the validation patches have never
  shown has no EMA and never passes: stopping needs evidence for every class.
- ``--patience N``: the stage ends after N epochs in a row without a new best EMA of the mean pseudo-Dice in
  this stage.

A zoom-in stage that stops moves on to the zoom-out stage; a zoom-out stage that stops ends training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoseg.checkpoint import TrainState
from autoseg.runconfig import TrainConfig

__all__ = ["expand_bars", "update_class_ema", "bar_reason", "patience_reason", "early_stop_reason", "start_stage",
           "record_early_stop"]


def expand_bars(bars: Sequence[float], class_names: Sequence[str]) -> list[float]:
    """One bar per foreground class from ``bars`` (empty: no bar; one value: the same for every class).

    Raises:
        ValueError: a bar outside (0, 1], or a count that is neither 1 nor the number of classes.
    """
    if not bars:
        return []
    bad = [b for b in bars if not 0.0 < b <= 1.0]
    if bad:
        raise ValueError(f"--stop-at-dice: {bad[0]:g} is not a Dice in (0, 1]")
    if len(bars) == 1:
        return [float(bars[0])] * len(class_names)
    if len(bars) != len(class_names):
        raise ValueError(f"--stop-at-dice: {len(bars)} bars for {len(class_names)} foreground classes "
                         f"({', '.join(class_names)}); give one bar for all or one per class in this order")
    return [float(b) for b in bars]


def update_class_ema(ema: Sequence[float], dice: Sequence[float], momentum: float) -> list[float]:
    """Per-class EMA after one more epoch. A NaN Dice (the class was in no validation patch) leaves the class's
    EMA as it was; a class's first value starts its EMA. NaN stands for "never seen"."""
    if not ema:
        ema = [math.nan] * len(dice)
    out = []
    for old, new in zip(ema, dice):
        if math.isnan(new):
            out.append(old)
        elif math.isnan(old):
            out.append(new)
        else:
            out.append(momentum * old + (1 - momentum) * new)
    return out


def bar_reason(bars: Sequence[float], class_ema: Sequence[float], class_names: Sequence[str]) -> str | None:
    """Why the stage stops for the Dice bar, or None while a class is below its bar (or never seen)."""
    if not bars or not class_ema:
        return None
    if all(not math.isnan(e) and e >= b for e, b in zip(class_ema, bars)):
        return "every class's EMA pseudo-Dice reached its bar (" + ", ".join(
            f"{n} {e:.3f} >= {b:g}" for n, e, b in zip(class_names, class_ema, bars)) + ")"
    return None


def patience_reason(patience: int | None, epochs_without_gain: int, best: float) -> str | None:
    """Why the stage stops for lack of progress, or None."""
    if patience is not None and epochs_without_gain >= patience:
        return f"no new best EMA pseudo-Dice (best {best:.3f}) for {epochs_without_gain} epochs (--patience {patience})"
    return None


def early_stop_reason(state: TrainState, dice: Sequence[float], momentum: float, bars: Sequence[float],
                      class_names: Sequence[str], patience: int | None) -> str | None:
    """After an epoch whose pseudo-Dice per class is ``dice`` (``state.ema`` already updated): update the
    per-class EMA and the stage's patience count in ``state``; why the stage stops now, or None."""
    state.class_ema = update_class_ema(state.class_ema, dice, momentum)
    if state.ema > state.stage_best_ema:
        state.stage_best_ema, state.epochs_without_gain = state.ema, 0
    else:
        state.epochs_without_gain += 1
    return (bar_reason(bars, state.class_ema, class_names)
            or patience_reason(patience, state.epochs_without_gain, state.stage_best_ema))


def start_stage(state: TrainState) -> None:
    """Patience counts within a stage: a new stage starts without a best."""
    state.stage_best_ema, state.epochs_without_gain = -1.0, 0


def record_early_stop(cfg: TrainConfig, si: int, epoch: int, reason: str) -> str:
    """Record in ``cfg.early_stops`` that stage ``si`` ended after ``epoch``; the line for the log."""
    run = cfg.stages[si]
    then = f"; on to {cfg.stages[si + 1].name}" if si + 1 < len(cfg.stages) else "; training ends"
    cfg.early_stops[run.name] = f"epoch {epoch} of {run.epochs}: {reason}"
    return f"early stop   {run.name} at epoch {epoch}/{run.epochs}: {reason}{then}"
