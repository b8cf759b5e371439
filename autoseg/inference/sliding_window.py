"""Sliding-window prediction of a whole volume: overlapping tiles, Gaussian importance weights, mirroring.

Logits of the tiles are weighted by a Gaussian centred on the tile (edges of a tile see less context), summed
and divided by the summed weights; with mirroring, each tile is also predicted flipped along every
combination of the mirror axes and the flipped-back logits are averaged.

The sums are float32 on every device: the Gaussian's corner weights (about 4e-11 with sigma 1/8) are below
float16's smallest subnormal, so float16 sums would drop them while the float32 normaliser kept them. Where
the sums live (GPU or RAM) and how many tiles go through the network at once are decided up front from the
free memory by the pure functions below; :class:`autoseg.inference.predictor.Predictor` applies them.
"""

from __future__ import annotations

from functools import lru_cache
from math import prod

import numpy as np
import torch
from torch import nn

from autoseg.tiling import mirror_combinations, tile_boxes

__all__ = ["gaussian_weights", "predict_logits", "padded_shape", "sums_bytes", "choose_sums_device",
           "choose_tiles_per_batch", "cpu_call_inputs", "choose_cpu_calls", "cuda_free_bytes", "division_chunk",
           "divide_sums", "SUMS_SHARE", "BATCH_SHARE", "MAX_TILES_PER_BATCH", "CPU_ITEMS_PER_CALL",
           "DIVISION_CHUNK_BYTES"]

#: share of the GPU's free memory the sums (and the input) may take; the rest is for the network's forward
SUMS_SHARE = 0.6
#: share of the GPU memory left after the sums that a batch of tiles may plan to use
BATCH_SHARE = 0.8
#: most tiles per network call on a GPU: beyond a few, a larger batch no longer speeds a GPU up
MAX_TILES_PER_BATCH = 8
#: inputs per network call on the CPU (mirrored copies of a tile first, then tiles): on a 2-core host, the 8 flips
#: of a Hippocampus tile (40x56x40, trained residual U-Net) took 1.45 s two at a time against 1.94 s one at a time
#: (4 at a time 1.46 s, 8 at a time 1.61 s): a batch of two keeps both cores busier in the small deep layers, and
#: a one-slice tile of a 2d configuration alone takes a slow convolution path that two avoid (docs/predicting.md)
CPU_ITEMS_PER_CALL = 2
#: largest chunk (bytes) of the sums divided and copied at a time at the end (extra memory of the division)
DIVISION_CHUNK_BYTES = 64 * 2**20

_FLOAT32 = 4  # bytes


def _gaussian_1d(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """What scipy's ``gaussian_filter1d`` (``mode="constant"``, default ``truncate``) makes of an impulse at
    ``size // 2``: the normalised Gaussian kernel's weights out to ``int(truncate * sigma + 0.5)`` voxels, 0
    beyond. Written out so that prediction need not import ``scipy.ndimage`` (~0.4 s of every command's start)."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 / (sigma * sigma) * offsets ** 2)
    kernel /= kernel.sum()
    d = np.arange(size) - size // 2
    return np.where(np.abs(d) <= radius, kernel[np.clip(d + radius, 0, 2 * radius)], 0.0)


@lru_cache(maxsize=8)
def _gaussian(patch: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    g = np.ones((1,) * len(patch), dtype=np.float64)
    for axis, p in enumerate(patch):  # a separable Gaussian of an impulse: the outer product of the axes' kernels
        shape = [1] * len(patch)
        shape[axis] = p
        g = g * _gaussian_1d(p, p * sigma_scale).reshape(shape)
    g = g / g.max()
    g[g == 0] = g[g > 0].min()  # no zero weights at the corners (a voxel covered only there would divide by 0)
    return g.astype(np.float32)


def gaussian_weights(patch: list[int], sigma_scale: float) -> torch.Tensor:
    """Importance of each voxel of a tile: a Gaussian with sigma ``sigma_scale`` x edge, peak 1, no zeros."""
    return torch.from_numpy(_gaussian(tuple(patch), float(sigma_scale)))


def padded_shape(spatial: list[int], patch: list[int]) -> list[int]:
    """The volume's shape after zero-padding every edge shorter than the patch up to the patch's edge."""
    return [max(s, p) for s, p in zip(spatial, patch)]


def sums_bytes(n_classes: int, in_channels: int, padded: list[int]) -> int:
    """Bytes of what sliding-window prediction keeps for a whole volume on the device of its sums: the
    K weighted logit sums, the summed weights and the input, all float32, on the ``padded`` shape."""
    return (n_classes + 1 + in_channels) * prod(padded) * _FLOAT32


def choose_sums_device(needed_bytes: int, free_bytes: int, share: float = SUMS_SHARE) -> str:
    """``"cuda"`` when ``needed_bytes`` (:func:`sums_bytes`) fit ``share`` of the GPU's ``free_bytes``, else
    ``"cpu"`` (the sums in RAM; each batch of tile logits is copied there, the network stays on the GPU)."""
    return "cuda" if needed_bytes <= share * free_bytes else "cpu"


def cuda_free_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on the GPU ``device``: the driver's free memory plus what
    PyTorch's caching allocator holds but does not use."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def choose_tiles_per_batch(bytes_per_tile: int, free_bytes: int, n_tiles: int, device_type: str,
                           cap: int = MAX_TILES_PER_BATCH, share: float = BATCH_SHARE) -> int:
    """How many tiles go through the network in one call.

    On a GPU: as many as ``share`` of ``free_bytes`` holds at ``bytes_per_tile`` each (the memory of one
    tile's forward pass), at least 1, at most ``cap`` and ``n_tiles``. On the CPU 1: there a call holds at most
    two inputs (:func:`cpu_call_inputs`, :func:`choose_cpu_calls`), as a convolution's work grows linearly with
    the batch, so a large batch saves no work (one thread, 8 tiles of 64^3: 10.0 s one at a time and four at a
    time) while the activation memory grows with it (peak 430 -> 840 MiB); RAM is what a CPU run of a large
    scan runs out of. Measurements: ``docs/predicting.md``.

    Args:
        bytes_per_tile: memory of one tile's forward pass (bytes), an upper bound.
        free_bytes: memory free for the forward passes (bytes), after the sums.
        n_tiles: tiles of the volume.
        device_type: ``"cuda"`` or ``"cpu"``.

    Raises:
        ValueError: ``bytes_per_tile`` or ``n_tiles`` not positive.
    """
    if bytes_per_tile <= 0 or n_tiles <= 0:
        raise ValueError(f"bytes_per_tile {bytes_per_tile} and n_tiles {n_tiles} must be positive")
    if device_type != "cuda":
        return 1
    return max(1, min(cap, n_tiles, int(share * max(free_bytes, 0)) // bytes_per_tile))


def cpu_call_inputs(tile: list[int], trained_patch: list[int], training_batch: int,
                    most: int = CPU_ITEMS_PER_CALL) -> int:
    """Most inputs (mirrored copies, tiles) in one network call on the CPU: ``most``, and no more than the plan's
    ``training_batch`` when the tile is the ``trained_patch`` (a forward pass of that many tiles without gradients
    holds less memory than the training step the plan fitted to its memory budget); 1 for a tile larger than
    the trained patch (a patch-free network's whole volume).

    Raises:
        ValueError: ``training_batch`` not positive.
    """
    if training_batch <= 0:
        raise ValueError(f"training_batch {training_batch} must be positive")
    return max(1, min(most, training_batch)) if list(tile) == list(trained_patch) else 1


def choose_cpu_calls(inputs: int, n_flips: int, n_tiles: int) -> tuple[int, int]:
    """``(tiles, flips)`` per network call on the CPU for calls of up to ``inputs`` inputs
    (:func:`cpu_call_inputs`): mirrored copies of a tile first, then, where they leave room (no mirroring), several
    tiles. The GPU batches tiles by its free memory instead (:func:`choose_tiles_per_batch`).

    Raises:
        ValueError: an argument not positive.
    """
    if min(inputs, n_flips, n_tiles) <= 0:
        raise ValueError(f"inputs {inputs}, n_flips {n_flips} and n_tiles {n_tiles} must be positive")
    flips = min(inputs, n_flips)
    return min(inputs // flips, n_tiles), flips


def division_chunk(n_classes: int, plane_voxels: int, budget_bytes: int = DIVISION_CHUNK_BYTES) -> int:
    """Slices along the first spatial axis per chunk of the final division: as many as keep the chunk's
    K float32 planes of ``plane_voxels`` voxels within ``budget_bytes``, at least 1."""
    return max(1, budget_bytes // (n_classes * plane_voxels * _FLOAT32))


def divide_sums(acc: torch.Tensor, norm: torch.Tensor, crop: tuple[slice, ...], chunk: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``acc[crop] / norm[crop[1:]]`` as float32 on the CPU, with at most one chunk of extra memory.

    The division runs in place in ``acc``, ``chunk`` slices of the first spatial axis at a time, and each
    divided chunk is copied into ``out`` right away; on a GPU that bounds the extra device memory by one
    chunk, where ``acc[crop].float() / norm[...]`` would allocate a second K x volume tensor.

    Args:
        acc: weighted logit sums ``(K, *padded)``, float32, any device; overwritten.
        norm: summed weights ``(*padded)``, float32, on ``acc``'s device.
        crop: ``(slice(None), z, y, x)``: the region to return.
        chunk: slices of the first spatial axis per step (>= 1).
        out: CPU float32 tensor of the cropped shape to fill. Default: a new one, except for sums already on
            the CPU, which are divided in place and returned as a view of ``acc`` (no second copy in RAM).

    Raises:
        ValueError: ``chunk`` below 1 or ``out`` of the wrong shape.
    """
    if chunk < 1:
        raise ValueError(f"chunk {chunk}: expected at least one slice")
    region = acc[crop]
    weights = norm[crop[1:]]
    if out is None:
        out = region if acc.device.type == "cpu" else torch.empty(region.shape, dtype=torch.float32)
    elif out.shape != region.shape:
        raise ValueError(f"out of shape {list(out.shape)}; the cropped sums are {list(region.shape)}")
    for z in range(0, region.shape[1], chunk):
        part = region[:, z:z + chunk]
        part.div_(weights[z:z + chunk])
        if out is not region:
            out[:, z:z + chunk].copy_(part)
    return out


@torch.no_grad()
def predict_logits(net: nn.Module, image: torch.Tensor, patch: list[int], step: float, mirror_axes: list[int],
                   sigma_scale: float, device: torch.device, tiles_per_batch: int = 1,
                   amp: bool = False, accumulate_on: torch.device | None = None,
                   chunk: int | None = None, flips_per_call: int = 1, cpu_bfloat16: bool = False) -> torch.Tensor:
    """Gaussian-weighted, mirrored logits ``(K, *spatial)`` (float32, on the CPU) of ``image`` ``(C, *spatial)``.

    The network runs on ``device``, ``tiles_per_batch`` tiles x ``flips_per_call`` of their mirrored copies per
    call (the same sums as one at a time, up to float rounding in the convolutions). The weighted sums, the
    summed weights and the (padded) input live on ``accumulate_on`` (default ``device``), all float32 whatever
    the device, so a GPU sums exactly as the CPU does. A volume smaller than the patch is zero-padded symmetrically and
    the result cropped back. The result is divided ``chunk`` slices at a time (:func:`divide_sums`; default
    :func:`division_chunk`); sums kept on the CPU are divided in place and returned without a copy. The network
    runs under float16 autocast on CUDA with ``amp``, under bfloat16 autocast on the CPU with ``cpu_bfloat16``.

    Raises:
        ValueError: ``tiles_per_batch`` or ``flips_per_call`` below 1.
    """
    if tiles_per_batch < 1 or flips_per_call < 1:
        raise ValueError(f"tiles_per_batch {tiles_per_batch}, flips_per_call {flips_per_call}: expected at least 1")
    acc_device = accumulate_on or device
    spatial = list(image.shape[1:])
    padded = padded_shape(spatial, patch)
    lo = [(p - s) // 2 for s, p in zip(spatial, padded)]
    if padded != spatial:
        full = image.new_zeros((image.shape[0], *padded))
        full[(slice(None), *(slice(a, a + s) for a, s in zip(lo, spatial)))] = image
        image = full
    image = image.to(acc_device)
    weights = gaussian_weights(patch, sigma_scale).to(acc_device)
    acc: torch.Tensor | None = None
    norm = torch.zeros(padded, dtype=torch.float32, device=acc_device)
    flips = mirror_combinations(mirror_axes)
    boxes = tile_boxes(padded, patch, step)
    for i in range(0, len(boxes), tiles_per_batch):
        group = boxes[i:i + tiles_per_batch]
        x = torch.stack([image[(slice(None), *b)] for b in group]).to(device, non_blocking=True)
        out: torch.Tensor | None = None
        for j in range(0, len(flips), flips_per_call):
            dims = [[d + 2 for d in flip] for flip in flips[j:j + flips_per_call]]
            xs = [torch.flip(x, d) if d else x for d in dims]
            with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16,
                                enabled=amp and device.type == "cuda" or cpu_bfloat16 and device.type == "cpu"):
                y = net(xs[0] if len(xs) == 1 else torch.cat(xs)).float()
            for d, yi in zip(dims, y.split(len(group))):
                yi = torch.flip(yi, d) if d else yi
                out = yi if out is None else out.add_(yi)
        assert out is not None
        out = out.div_(len(flips)).to(acc_device)
        if acc is None:
            acc = torch.zeros((out.shape[1], *padded), dtype=torch.float32, device=acc_device)
        for b, o in zip(group, out):
            acc[(slice(None), *b)].addcmul_(o, weights)
            norm[b] += weights
    assert acc is not None
    crop = (slice(None), *(slice(a, a + s) for a, s in zip(lo, spatial)))
    if chunk is None:
        chunk = division_chunk(acc.shape[0], prod(spatial[1:]))
    return divide_sums(acc, norm, crop, chunk)
