"""Target spacing: the per-axis median, with nnU-Net's rule for strongly anisotropic data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoseg import defaults

__all__ = ["target_spacing", "resampled_shape"]


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> list[float]:
    """Per-axis median spacing, except for strongly anisotropic data.

    When the coarsest axis has a spacing over :data:`defaults.ANISO_THRESHOLD` times the next coarsest and
    over that many times fewer voxels than the smallest other axis, its target is the 10th percentile of its
    spacings (but not finer than the other axes): interpolating many thin slices out of few thick ones
    only invents data.

    Args:
        spacings: ``(n_cases, 3)`` voxel spacing in mm, array order.
        shapes: ``(n_cases, 3)`` shapes in voxels, array order.
    """
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > defaults.ANISO_THRESHOLD * max(target[others])
    aniso_voxels = median_shape[worst] * defaults.ANISO_THRESHOLD < min(median_shape[others])
    if aniso_spacing and aniso_voxels:
        target[worst] = max(float(np.percentile(spacings[:, worst], 10)), float(max(target[others])))
    return [float(round(v, 6)) for v in target]


def resampled_shape(shape: Sequence[int] | np.ndarray, spacing: Sequence[float] | np.ndarray,
                    target: Sequence[float] | np.ndarray) -> list[int]:
    """Shape (voxels) of an image of ``shape`` at ``spacing`` after resampling to ``target`` (mm)."""
    return [int(round(s * sp / t)) for s, sp, t in zip(shape, spacing, target)]
