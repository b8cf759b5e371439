"""Post-processing in nnU-Net's manner: keep only the largest connected component of a class, adopted per
class when it raises that class's cross-validation Dice (removed voxels become background, so other classes
cannot get worse). The decision is written to ``RUN_DIR/postprocessing.json`` and applied by ``predict``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.typedjson import from_jsonable, read_json, write_json_atomic

__all__ = ["Postprocessing", "keep_largest_component", "apply_postprocessing", "decide_postprocessing",
           "load_postprocessing", "save_postprocessing", "POSTPROCESSING_FILE"]

POSTPROCESSING_FILE = "postprocessing.json"


@dataclass
class Postprocessing:
    """Classes reduced to their largest component, with the cross-validation Dice that decided it."""

    largest_component_classes: list[int]
    dice_before: dict[int, float]
    dice_after: dict[int, float]
    n_cases: int


def keep_largest_component(labels: np.ndarray, cls: int) -> np.ndarray:
    """``labels`` with every face-connected component of ``cls`` but the largest set to background."""
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


def decide_postprocessing(pairs: list[tuple[np.ndarray, np.ndarray]], classes: list[int]) -> Postprocessing:
    """For each class, compare its mean Dice over ``(prediction, reference)`` pairs with and without
    keeping only its largest component; adopt it where the mean strictly improves."""
    before, after, adopted = {}, {}, []
    for c in classes:
        b = [_dice(p == c, r == c) for p, r in pairs]
        a = [_dice(keep_largest_component(p, c) == c, r == c) for p, r in pairs]
        before[c], after[c] = float(np.mean(b)), float(np.mean(a))
        if after[c] > before[c]:
            adopted.append(c)
    return Postprocessing(adopted, before, after, len(pairs))


def load_postprocessing(run_dir: Path) -> Postprocessing | None:
    path = run_dir / POSTPROCESSING_FILE
    return from_jsonable(Postprocessing, read_json(path)) if path.is_file() else None


def save_postprocessing(pp: Postprocessing, run_dir: Path) -> None:
    write_json_atomic(pp, run_dir / POSTPROCESSING_FILE)
