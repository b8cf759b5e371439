"""Seeded k-fold cross-validation splits over case ids."""

from __future__ import annotations

import numpy as np

from autoseg.plans import Fold

__all__ = ["kfold_splits"]


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
