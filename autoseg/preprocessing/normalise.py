"""Per-channel intensity normalisation as the plan says (z-score per case, CT dataset-wide, or none)."""

from __future__ import annotations

import numpy as np

from autoseg.plans import ChannelNormalization

__all__ = ["normalise"]


def normalise(image: np.ndarray, schemes: list[ChannelNormalization], mask: np.ndarray | None) -> np.ndarray:
    """Normalise ``image`` ``(C, z, y, x)`` channel by channel, into a new float32 array.

    Args:
        schemes: one per channel, from ``plans.normalization``.
        mask: voxels that belong to the body (non-zero in some channel); used by z-score with ``use_mask``,
            which also sets the voxels outside it to 0.

    Raises:
        ValueError: the number of schemes does not match the channels.
    """
    if len(schemes) != image.shape[0]:
        raise ValueError(f"image has {image.shape[0]} channel(s) but the plan normalises {len(schemes)}")
    out = np.empty(image.shape, dtype=np.float32)
    for c, s in enumerate(schemes):
        x = image[c].astype(np.float32, copy=False)
        if s.scheme == "ct":
            assert s.clip is not None and s.mean is not None and s.std is not None  # guaranteed by the planner
            out[c] = (np.clip(x, s.clip[0], s.clip[1]) - s.mean) / max(s.std, 1e-8)
        elif s.scheme == "zscore":
            use = mask if s.use_mask and mask is not None and mask.any() else None
            values = x[use] if use is not None else x
            mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
            out[c] = (x - mean) / max(std, 1e-8)
            if use is not None:
                out[c][~use] = 0
        else:
            out[c] = x
    return out
