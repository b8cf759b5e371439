"""Sliding-window prediction of a whole volume: overlapping tiles, Gaussian importance weights, mirroring.

Logits of the tiles are weighted by a Gaussian centred on the tile (edges of a tile see less context), summed
and divided by the summed weights; with mirroring, each tile is also predicted flipped along every
combination of the mirror axes and the flipped-back logits are averaged.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from autoseg.tiling import mirror_combinations, tile_boxes

__all__ = ["gaussian_weights", "predict_logits"]


@lru_cache(maxsize=8)
def _gaussian(patch: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch, dtype=np.float64)
    impulse[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(impulse, [p * sigma_scale for p in patch], mode="constant", cval=0)
    g = g / g.max()
    g[g == 0] = g[g > 0].min()  # no zero weights at the corners (a voxel covered only there would divide by 0)
    return g.astype(np.float32)


def gaussian_weights(patch: list[int], sigma_scale: float) -> torch.Tensor:
    """Importance of each voxel of a tile: a Gaussian with sigma ``sigma_scale`` x edge, peak 1, no zeros."""
    return torch.from_numpy(_gaussian(tuple(patch), float(sigma_scale)))


@torch.no_grad()
def predict_logits(net: nn.Module, image: torch.Tensor, patch: list[int], step: float, mirror_axes: list[int],
                   sigma_scale: float, device: torch.device, tiles_per_batch: int = 1,
                   amp: bool = False, accumulate_on: torch.device | None = None) -> torch.Tensor:
    """Gaussian-weighted, mirrored logits ``(K, *spatial)`` (float32, on the CPU) of ``image`` ``(C, *spatial)``.

    The network runs on ``device``; the weighted sums live on ``accumulate_on`` (default ``device``), in
    float16 on a GPU (half the memory of the largest buffer, K x the volume) and float32 on the CPU. A volume
    smaller than the patch is zero-padded symmetrically and the result cropped back.
    """
    acc_device = accumulate_on or device
    acc_dtype = torch.float16 if acc_device.type == "cuda" else torch.float32
    spatial = list(image.shape[1:])
    padded = [max(s, p) for s, p in zip(spatial, patch)]
    lo = [(p - s) // 2 for s, p in zip(spatial, padded)]
    if padded != spatial:
        full = image.new_zeros((image.shape[0], *padded))
        full[(slice(None), *(slice(a, a + s) for a, s in zip(lo, spatial)))] = image
        image = full
    weights = gaussian_weights(patch, sigma_scale).to(acc_device)
    acc: torch.Tensor | None = None
    norm = torch.zeros(padded, dtype=torch.float32, device=acc_device)
    flips = mirror_combinations(mirror_axes)
    boxes = tile_boxes(padded, patch, step)
    for i in range(0, len(boxes), tiles_per_batch):
        group = boxes[i:i + tiles_per_batch]
        x = torch.stack([image[(slice(None), *b)] for b in group]).to(device, non_blocking=True)
        out: torch.Tensor | None = None
        for flip in flips:
            dims = [d + 2 for d in flip]
            xi = torch.flip(x, dims) if dims else x
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                y = net(xi)
            y = y.float()
            y = torch.flip(y, dims) if dims else y
            out = y if out is None else out + y
        assert out is not None
        out = (out / len(flips)).to(acc_device)
        if acc is None:
            acc = torch.zeros((out.shape[1], *padded), dtype=acc_dtype, device=acc_device)
        for b, o in zip(group, out):
            acc[(slice(None), *b)] += (o * weights).to(acc_dtype)
            norm[b] += weights
    assert acc is not None
    crop = (slice(None), *(slice(a, a + s) for a, s in zip(lo, spatial)))
    return (acc[crop].float() / norm[crop[1:]]).cpu()
