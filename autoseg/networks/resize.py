"""Trilinear resizing inside a network, with a deterministic backward when PyTorch is asked for one.

``F.interpolate(mode="trilinear")`` is what the patch-free network (its low-resolution logits brought to full
resolution) and UNETR (its position embedding brought to each patch's token grid) resize with, in training too.
Its forward is deterministic on every device, but on CUDA its backward adds the gradients of neighbouring
outputs with atomic operations, whose order varies between runs; ``torch.use_deterministic_algorithms`` lists it
as non-deterministic and, in the warn-only mode ``autoseg train --deterministic`` uses, only warns. So a resumed
run of those networks on a GPU would not end at the weights of an uninterrupted one.

Linear interpolation is separable: along each axis it is a matrix of at most two non-zeros per row, the same
for every line of voxels. Three matrix products compute the same values, and their backward is matrix products
too (cuBLAS is deterministic with the workspace setting ``--deterministic`` makes). That costs more arithmetic
than PyTorch's kernel, so :func:`trilinear` takes this path only when deterministic algorithms are on and a
gradient is needed (training with ``--deterministic``), on any device, so that the CPU tests reach it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["trilinear", "separable_trilinear", "linear_matrix"]


def linear_matrix(n_in: int, n_out: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n_out, n_in)`` weights of 1-D linear interpolation from ``n_in`` to ``n_out`` samples, as
    ``F.interpolate(..., align_corners=False)`` computes it: output ``i`` reads source position
    ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the first sample below 0 and to the last above ``n_in - 1``."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    w.index_put_((rows, lo), 1 - frac, accumulate=True)
    w.index_put_((rows, hi), frac, accumulate=True)
    return w.to(device=device, dtype=dtype)


def separable_trilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` ``(B, C, D, H, W)`` resized to ``size`` by one matrix product per axis (equal to PyTorch's
    trilinear interpolation up to float rounding)."""
    for axis, n_out in zip((2, 3, 4), size):
        n_in = x.shape[axis]
        if n_in != n_out:
            w = linear_matrix(n_in, int(n_out), x.device, x.dtype)
            x = torch.movedim(torch.movedim(x, axis, -1) @ w.T, -1, axis)
    return x


def trilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` ``(B, C, D, H, W)`` resized to ``size``, trilinear with ``align_corners=False``: PyTorch's kernel,
    or :func:`separable_trilinear` when deterministic algorithms are on and ``x`` needs a gradient (module
    docstring)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if torch.is_grad_enabled() and x.requires_grad and torch.are_deterministic_algorithms_enabled():
        return separable_trilinear(x, size)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)
