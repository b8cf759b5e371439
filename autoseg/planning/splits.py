"""Cross-validation splits over case ids: seeded k-fold, or read from a file (nnU-Net's splits_final.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from autoseg.plans import Fold

__all__ = ["kfold_splits", "read_splits"]


def kfold_splits(case_ids: list[str], k: int, seed: int) -> list[Fold]:
    """Shuffle the sorted case ids with ``seed`` and cut them into ``k`` validation folds of near-equal size.

    With fewer cases than ``k``, there are as many folds as cases.

    Raises:
        ValueError: ``k < 2`` or fewer than 2 cases.
    """
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise ValueError(f"cross-validation needs at least 2 cases, the dataset has {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = np.array_split(order, min(k, len(ids)))
    folds = []
    for part in parts:
        val = {ids[i] for i in part}
        folds.append(Fold(sorted(set(ids) - val), sorted(val)))
    return folds


def read_splits(path: Path, case_ids: list[str]) -> list[Fold]:
    """Folds from a JSON list of ``{"train": [...], "val": [...]}`` (nnU-Net's ``splits_final.json``), so that
    autoseg and another tool can be compared on the same validation cases.

    Raises:
        ValueError: naming the file: unreadable, not that shape, an id not in the dataset, or a case in both
            the training and the validation cases of a fold.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the splits: {e}") from None
    if not isinstance(data, list) or not data or not all(
            isinstance(f, dict) and set(f) == {"train", "val"} and all(
                isinstance(v, list) and all(isinstance(c, str) for c in v) for v in f.values()) for f in data):
        raise ValueError(f'{path}: expected a JSON list of {{"train": [case ids], "val": [case ids]}}, one per fold')
    known = set(case_ids)
    folds = []
    for i, f in enumerate(data):
        unknown = sorted(set(f["train"] + f["val"]) - known)
        if unknown:
            raise ValueError(f"{path}: fold {i} names {len(unknown)} case(s) the dataset does not have, e.g. "
                             f"{unknown[0]!r}")
        both = sorted(set(f["train"]) & set(f["val"]))
        if both:
            raise ValueError(f"{path}: fold {i}: case {both[0]!r} is in both train and val")
        if not f["val"]:
            raise ValueError(f"{path}: fold {i} has no validation case")
        folds.append(Fold(sorted(f["train"]), sorted(f["val"])))
    return folds
