"""Resample images, label maps and class probabilities to a new shape, as the field does it.

Images: cubic splines. Label maps: each class as a one-hot channel with linear interpolation, then the class
with the largest value wins (a running arg-max, so memory stays at two float volumes however many classes);
this keeps thin structures that nearest-neighbour would break. Probabilities: linear, renormalised.

For strongly anisotropic voxels the in-plane axes are interpolated first and the out-of-plane axis after,
separately, with a low order: splines across a few thick slices overshoot and invent structure.
Interpolation itself is scikit-image's ``resize`` (edge mode, no anti-aliasing: pixel-centre aligned, so
that forward and inverse use the same grid).
"""

from __future__ import annotations

import numpy as np

__all__ = ["out_of_plane_axis", "resize_volume", "resample_image", "resample_labels", "resample_probabilities",
           "resample_argmax"]


def out_of_plane_axis(spacing: list[float], target: list[float], threshold: float) -> int | None:
    """The axis to interpolate separately: the coarsest one when the original (else the target) spacing is
    more than ``threshold`` times anisotropic; None otherwise."""
    for sp in (spacing, target):
        if max(sp) / min(sp) > threshold:
            return int(np.argmax(sp))
    return None


def resize_volume(vol: np.ndarray, shape: tuple[int, ...], order: int, axis: int | None, axis_order: int) -> np.ndarray:
    """Resize one 3D float volume to ``shape``; ``axis`` (if any) in a second pass with ``axis_order``."""
    from skimage.transform import resize

    shape = tuple(int(s) for s in shape)
    if vol.shape == shape:
        return vol
    kw = {"mode": "edge", "anti_aliasing": False, "preserve_range": True}
    if axis is None or vol.shape[axis] == shape[axis]:
        return resize(vol, shape, order=order, **kw).astype(vol.dtype, copy=False)
    inplane = list(shape)
    inplane[axis] = vol.shape[axis]
    out = resize(vol, inplane, order=order, **kw) if tuple(inplane) != vol.shape else vol
    return resize(out, shape, order=axis_order, **kw).astype(vol.dtype, copy=False)


def resample_image(image: np.ndarray, shape: tuple[int, ...], order: int, axis: int | None,
                   axis_order: int) -> np.ndarray:
    """Resample every channel of ``image`` ``(C, z, y, x)`` to ``shape``."""
    if image.shape[1:] == tuple(shape):
        return image
    return np.stack([resize_volume(c.astype(np.float32, copy=False), shape, order, axis, axis_order)
                     for c in image])


def resample_labels(label: np.ndarray, shape: tuple[int, ...], order: int, axis: int | None, axis_order: int,
                    values: list[int]) -> np.ndarray:
    """Resample a label map via one-hot channels and a running arg-max; classes absent stay absent."""
    if label.shape == tuple(shape):
        return label
    best = np.full(tuple(shape), -1.0, dtype=np.float32)
    out = np.zeros(tuple(shape), dtype=label.dtype)
    present = [v for v in values if v == 0 or np.any(label == v)]
    for v in present:
        score = resize_volume((label == v).astype(np.float32), shape, order, axis, axis_order)
        win = score > best
        out[win] = v
        best[win] = score[win]
    return out


def resample_probabilities(probs: np.ndarray, shape: tuple[int, ...], axis: int | None,
                           axis_order: int) -> np.ndarray:
    """Resample class probabilities ``(K, z, y, x)`` linearly and renormalise each voxel to sum to one."""
    if probs.shape[1:] == tuple(shape):
        return probs
    out = np.stack([resize_volume(p.astype(np.float32, copy=False), shape, 1, axis, axis_order) for p in probs])
    np.clip(out, 0, None, out=out)
    total = out.sum(0, keepdims=True)
    total[total == 0] = 1
    return out / total


def resample_argmax(probs: np.ndarray, shape: tuple[int, ...], axis: int | None, axis_order: int,
                    values: list[int]) -> np.ndarray:
    """The label map :func:`resample_probabilities` followed by an arg-max would give, computed one class at a
    time with a running arg-max: memory stays at two float volumes of ``shape`` however many classes there
    are. ``values[k]`` is the label of channel ``k``; ties go to the lower channel, as with ``argmax``."""
    dtype = np.uint8 if max(values) < 256 else np.uint16
    if probs.shape[1:] == tuple(shape):
        return np.asarray(values, dtype=dtype)[probs.argmax(0)]
    best = np.full(tuple(shape), -1.0, dtype=np.float32)
    out = np.zeros(tuple(shape), dtype=dtype)
    for v, p in zip(values, probs):
        score = resize_volume(p.astype(np.float32, copy=False), shape, 1, axis, axis_order)
        win = score > best
        out[win] = v
        best[win] = score[win]
        del score, win
    return out
