"""Overlap metrics per class. Convention: when a class is absent from both prediction and reference its
Dice is undefined (NaN, ``null`` in JSON) and left out of means, as in nnU-Net."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["confusion", "dice", "nanmean"]


def confusion(pred: np.ndarray, ref: np.ndarray, cls: int) -> tuple[int, int, int]:
    """True positives, false positives, false negatives of class ``cls``."""
    p, r = pred == cls, ref == cls
    tp = int(np.count_nonzero(p & r))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(r)) - tp


def dice(tp: int, fp: int, fn: int) -> float:
    """``2tp / (2tp + fp + fn)``; NaN when the class is in neither mask."""
    d = 2 * tp + fp + fn
    return 2 * tp / d if d else math.nan


def nanmean(values: list[float]) -> float:
    """Mean of the defined values; NaN when there are none."""
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else math.nan
