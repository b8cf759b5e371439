"""N4 bias-field correction of an MRI channel (SimpleITK's N4): the smooth multiplicative intensity drift of
a receive coil, estimated on a shrunk copy for speed and divided out at full resolution."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoseg import defaults

__all__ = ["correct_bias_field", "shrink_factors"]


def shrink_factors(spacing_zyx: Sequence[float], target_mm: float = defaults.N4_SHRINK_MM) -> list[int]:
    """Per axis (x, y, z: SimpleITK's order) the integer shrink that brings the voxel near ``target_mm``,
    at least 1: thick slices are not shrunk across."""
    return [max(1, int(round(target_mm / s))) for s in reversed(spacing_zyx)]


def correct_bias_field(channel: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """``channel`` ``(z, y, x)`` divided by its N4 bias field, as float32.

    The field is fitted on a copy shrunk by :func:`shrink_factors`, inside an Otsu mask of it (the body; air
    and the zero background are left out), then evaluated on the full grid. Intensities must be non-negative
    (MRI magnitudes); zero stays zero.
    """
    import SimpleITK as sitk

    x = np.ascontiguousarray(channel, dtype=np.float32)
    image = sitk.GetImageFromArray(x)
    image.SetSpacing([float(s) for s in reversed(spacing_zyx)])
    small = sitk.Shrink(image, shrink_factors(spacing_zyx))
    small = sitk.Maximum(small, 1e-3)  # N4 fits the log of the intensities
    mask = sitk.OtsuThreshold(small, 0, 1, 200)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([defaults.N4_ITERATIONS] * defaults.N4_LEVELS)
    n4.Execute(small, mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image))
    return (x / np.exp(log_field)).astype(np.float32)
