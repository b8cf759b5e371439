"""Post-processing in nnU-Net's manner: keep only the largest connected component of a class, adopted per
class when it raises that class's cross-validation Dice (removed voxels become background, so other classes
cannot get worse), or, unlike nnU-Net, when it keeps the Dice within :data:`DICE_TOLERANCE` and lowers the
mean HD95: a stray island far from an organ costs a few voxels of Dice but sets the 95th-percentile surface
distance. The decision is written to ``RUN_DIR/postprocessing.json`` and applied by ``predict``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.typedjson import from_jsonable, read_json, write_json_atomic

__all__ = ["Postprocessing", "keep_largest_component", "apply_postprocessing", "decide_postprocessing",
           "load_postprocessing", "save_postprocessing", "POSTPROCESSING_FILE", "DICE_TOLERANCE"]

POSTPROCESSING_FILE = "postprocessing.json"
#: largest-component is also adopted for a class whose mean Dice drops by at most this while its mean HD95 drops
DICE_TOLERANCE = 1e-3


@dataclass
class Postprocessing:
    """Classes reduced to their largest component, with the cross-validation Dice (and HD95, mm, when it was
    measured) that decided it."""

    largest_component_classes: list[int]
    dice_before: dict[int, float]
    dice_after: dict[int, float]
    n_cases: int
    hd95_before: dict[int, float] = field(default_factory=dict)
    hd95_after: dict[int, float] = field(default_factory=dict)


def keep_largest_component(labels: np.ndarray, cls: int) -> np.ndarray:
    """``labels`` with every face-connected component of ``cls`` but the largest set to background."""
    from scipy import ndimage  # here, not at import: ``predict`` without post-processing never needs it

    mask = labels == cls
    comps, n = ndimage.label(mask)
    if n <= 1:
        return labels
    sizes = np.bincount(comps.ravel())[1:]
    out = labels.copy()
    out[mask & (comps != 1 + int(np.argmax(sizes)))] = 0
    return out


def apply_postprocessing(labels: np.ndarray, pp: Postprocessing | None) -> np.ndarray:
    if pp is None:
        return labels
    for c in pp.largest_component_classes:
        labels = keep_largest_component(labels, c)
    return labels


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    tp = np.count_nonzero(pred & ref)
    d = np.count_nonzero(pred) + np.count_nonzero(ref)
    return 2 * tp / d if d else 1.0


Distance = Callable[[np.ndarray, np.ndarray, tuple[float, ...]], float]


def decide_postprocessing(pairs: list[tuple[np.ndarray, np.ndarray]], classes: list[int],
                          distance: Distance | None = None,
                          spacings: Sequence[tuple[float, ...]] | None = None) -> Postprocessing:
    """For each class, compare its mean Dice over ``(prediction, reference)`` pairs with and without keeping only
    its largest component; adopt it where the mean strictly improves. With ``distance`` (HD95 of two masks at
    a spacing, mm) and each pair's ``spacings``, also adopt it where the mean Dice drops by at most
    :data:`DICE_TOLERANCE` and the mean distance drops."""
    before, after, hd_before, hd_after, adopted = {}, {}, {}, {}, []
    for c in classes:
        kept = [keep_largest_component(p, c) for p, _ in pairs]
        before[c] = float(np.mean([_dice(p == c, r == c) for p, r in pairs]))
        after[c] = float(np.mean([_dice(k == c, r == c) for k, (_, r) in zip(kept, pairs)]))
        better = after[c] > before[c]
        if distance is not None and spacings is not None:
            hd_before[c] = float(np.mean([distance(p == c, r == c, sp) for (p, r), sp in zip(pairs, spacings)]))
            hd_after[c] = float(np.mean([distance(k == c, r == c, sp) for k, (_, r), sp in zip(kept, pairs, spacings)]))
            better = better or (after[c] >= before[c] - DICE_TOLERANCE and hd_after[c] < hd_before[c])
        if better:
            adopted.append(c)
    return Postprocessing(adopted, before, after, len(pairs), hd_before, hd_after)


def load_postprocessing(run_dir: Path) -> Postprocessing | None:
    path = run_dir / POSTPROCESSING_FILE
    return from_jsonable(Postprocessing, read_json(path)) if path.is_file() else None


def save_postprocessing(pp: Postprocessing, run_dir: Path) -> None:
    write_json_atomic(pp, run_dir / POSTPROCESSING_FILE)
