"""Which tiles and which mirrorings cover a volume in sliding-window prediction: shared by prediction (which
runs them) and training's time budget (which counts them to estimate the final validation)."""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["tile_starts", "mirror_combinations", "tile_boxes"]


def tile_starts(shape: list[int], patch: list[int], step: float) -> list[list[int]]:
    """Start of every tile per axis: evenly spread, at most ``step`` x patch (but at least one voxel) apart,
    first at 0 and last flush with the end; a one-voxel patch edge (2d) visits every slice once. ``shape`` must
    be at least ``patch`` on every axis.

    Raises:
        ValueError: an edge of ``shape`` is smaller than the patch's.
    """
    out = []
    for s, p in zip(shape, patch):
        if s < p:
            raise ValueError(f"volume edge {s} is smaller than the patch edge {p}; pad first")
        n = int(np.ceil((s - p) / max(p * step, 1.0))) + 1
        out.append([int(round(x)) for x in np.linspace(0, s - p, n)] if n > 1 else [0])
    return out


def tile_boxes(shape: list[int], patch: list[int], step: float) -> list[tuple[slice, ...]]:
    """Every tile of :func:`tile_starts` as a tuple of spatial slices, in C order."""
    return [tuple(slice(a, a + p) for a, p in zip(start, patch))
            for start in itertools.product(*tile_starts(shape, patch, step))]


def mirror_combinations(axes: list[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` (0..2), the empty one first."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(sorted(axes), r)]
