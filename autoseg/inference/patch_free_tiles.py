"""Tiled prediction of a patch-free network: its U-Net slid over the low-resolution scan, its full-resolution
heads run once per mirrored copy over the blended features.

Sliding the whole network over full-resolution tiles runs its full-resolution heads on every voxel as often as
tiles overlap it (about 8 times at a step of half a tile), and in a profile of a 4-channel brain scan the heads
were half of the network's time. The heads are local (a few convolutions, no normalisation) and their input is
the U-Net's last decoder features, so here the U-Net alone is slid over the scan averaged down by the network's
factor: its features and low-resolution logits are blended with the Gaussian weights of
:func:`autoseg.inference.sliding_window.predict_logits`, at low resolution, and the heads then run once per voxel,
block by block, over the blended features. The result is the network's full-resolution output (heads plus the
up-sampled low-resolution logits) with the features rather than the outputs averaged over tiles; the
low-resolution grid is one for the whole scan instead of one per tile. Mirroring repeats all of it per mirrored
copy and averages the outputs (:func:`mirrored_patch_free`).
"""

from __future__ import annotations

from collections.abc import Callable
from math import ceil, isqrt, prod

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.inference.sliding_window import padded_shape, predict_logits
from autoseg.networks.patchfree import PatchFreeUNet
from autoseg.tiling import mirror_combinations, tile_boxes

__all__ = ["predict_patch_free_tiles", "mirrored_patch_free", "heads_by_blocks", "low_resolution_input",
           "low_resolution_tiles", "LowResolutionBody", "HEADS_BLOCK_BYTES", "HEADS_FALLBACK_SHARE",
           "HEADS_CHANNELS_LAST_ON_CPU"]

#: float32 bytes the heads may hold at full resolution per block, margins included (their input, the up-sampled
#: and concatenated features and one convolution's output: about ``5 h`` channels, ``h`` the heads' width)
HEADS_BLOCK_BYTES = 256 * 2**20
#: on a GPU that ran out of memory in the heads, the share of :data:`HEADS_BLOCK_BYTES` the blocks are tried
#: with once more before the heads run on the CPU
HEADS_FALLBACK_SHARE = 1 / 16
#: the heads' input channels-last on the CPU: their convolutions have few channels (8 on CPU plans) at full
#: resolution, where oneDNN's channels-last kernels ran a 16x120x120-voxel slab 2.3x faster on a 2-core host
#: (1.18 s against 2.71 s; the same values to 1e-7)
HEADS_CHANNELS_LAST_ON_CPU = True


class LowResolutionBody(nn.Module):
    """The patch-free network's U-Net on low-resolution input: its last decoder features and logits, one tensor
    ``(B, f0 + K, *low)``, so that the sliding window blends both."""

    def __init__(self, net: PatchFreeUNet):
        super().__init__()
        self.net = net

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        if self.net.channels_last:  # as the network's own forward: weights and input in one layout
            low = low.contiguous(memory_format=torch.channels_last_3d)
        features, logits = self.net.body.decode(low)
        return torch.cat([features, logits[0]], dim=1)


def low_resolution_tiles(shape: list[int], patch: list[int], factor: list[int], step: float) -> int:
    """How many tiles :func:`predict_patch_free_tiles` slides the U-Net over for a scan of spatial ``shape``
    (full-resolution voxels), the region ``patch`` and the network's ``factor``."""
    low = [-(-s // f) for s, f in zip(shape, factor)]
    low_patch = [p // f for p, f in zip(patch, factor)]
    return len(tile_boxes(padded_shape(low, low_patch), low_patch, step))


def _blocks(low: list[int], margin: list[int], lines: int) -> list[int]:
    """Edges (first two axes, low-resolution voxels) of the blocks the heads run on: whole planes of as many
    slices as ``lines`` lines along the last axis allow with the margins, where that keeps at least twice the
    margin per block (the margins then cost at most as much again); else square blocks of the first two axes."""
    whole_planes = lines // low[1] - 2 * margin[0]
    if whole_planes >= min(low[0], 2 * margin[0]):
        return [max(1, min(low[0], whole_planes)), low[1]]
    side = max(isqrt(max(lines, 1)) - 2 * max(margin), 2 * max(margin), 1)
    return [min(low[0], side), min(low[1], side)]


@torch.no_grad()
def heads_by_blocks(net: PatchFreeUNet, blended: torch.Tensor, device: torch.device, amp: bool = False,
                   budget_bytes: int = HEADS_BLOCK_BYTES) -> torch.Tensor:
    """Full-resolution logits ``(K, *low * factor)``, float32 on the CPU, of blended low-resolution ``blended``
    ``(f0 + K, *low)``: :meth:`PatchFreeUNet.segmentation`, as the network's eval forward gives it, computed block
    by block over the first two axes (whole planes where the budget allows), each block with
    :attr:`PatchFreeUNet.margin` (at least one) low-resolution voxels of context so that it equals the whole
    volume's result. A block and its margins hold about ``budget_bytes`` of head activations.

    On the CPU the blocks go through the heads channels-last (:data:`HEADS_CHANNELS_LAST_ON_CPU`).

    Raises:
        ValueError: ``blended`` has not the heads' plus the logits' channels.
    """
    f0, n_classes, h = net.up_seg.in_channels, net.seg_out.out_channels, net.up_seg.out_channels
    if blended.shape[0] != f0 + n_classes:
        raise ValueError(f"blended features of {blended.shape[0]} channels; the network's heads take {f0} and its "
                         f"logits have {n_classes}")
    low, factor = list(blended.shape[1:]), net.factor
    margin = [max(1, m) for m in net.margin]
    line_bytes = 4 * 5 * h * low[2] * prod(factor)  # one low-resolution line along the last axis, at full res
    edge = _blocks(low, margin, budget_bytes // line_bytes)
    out = torch.empty((n_classes, *[n * f for n, f in zip(low, factor)]), dtype=torch.float32)
    for z in range(0, low[0], edge[0]):
        for y in range(0, low[1], edge[1]):
            corner, stop = [z, y], [min(z + edge[0], low[0]), min(y + edge[1], low[1])]
            lo = [max(0, c - m) for c, m in zip(corner, margin)]
            hi = [min(n, s + m) for n, s, m in zip(low, stop, margin)]
            part = blended[:, lo[0]:hi[0], lo[1]:hi[1]].to(device).unsqueeze(0)
            features = part[:, :f0]
            if device.type == "cpu" and HEADS_CHANNELS_LAST_ON_CPU:
                features = features.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                seg = net.segmentation(features, part[:, f0:].float()).float()
            keep = [slice((c - a) * f, (s - a) * f) for c, s, a, f in zip(corner, stop, lo, factor)]
            out[:, corner[0] * factor[0]:stop[0] * factor[0], corner[1] * factor[1]:stop[1] * factor[1]] = \
                seg[0, :, keep[0], keep[1]].cpu()
    return out


@torch.no_grad()
def predict_patch_free_tiles(net: nn.Module, image: torch.Tensor, patch: list[int], step: float,
                             mirror_axes: list[int], sigma_scale: float, device: torch.device,
                             tiles_per_batch: int = 1, amp: bool = False, accumulate_on: torch.device | None = None,
                             chunk: int | None = None) -> torch.Tensor:
    """Full-resolution logits ``(K, *spatial)`` (float32, on the CPU) of ``image`` ``(C, *spatial)`` by tiles of
    the full-resolution region ``patch``, mirrored along ``mirror_axes`` (:func:`mirrored_patch_free`); the
    other arguments as :func:`predict_logits`'s, which slides the U-Net over the low-resolution scan (tiles of
    ``patch / factor``, ``tiles_per_batch`` per call).

    Raises:
        TypeError: ``net`` is not a :class:`PatchFreeUNet`.
    """
    if not isinstance(net, PatchFreeUNet):
        raise TypeError(f"tiles of the low-resolution U-Net need a PatchFreeUNet, not {type(net).__name__}")

    def slide(body: nn.Module, low: torch.Tensor, low_patch: list[int]) -> torch.Tensor:
        return predict_logits(body, low, low_patch, step, [], sigma_scale, device, tiles_per_batch, amp,
                              accumulate_on, chunk)
    return mirrored_patch_free(net, image, patch, mirror_axes, slide, lambda n, b: heads_by_blocks(n, b, device, amp))


#: ``slide(body, low, low_patch)``: the blended, unmirrored sliding window of the U-Net ``body`` over ``low``
Slide = Callable[[nn.Module, torch.Tensor, list[int]], torch.Tensor]
#: ``heads(net, blended)``: the full-resolution logits of blended features (:func:`heads_by_blocks`)
Heads = Callable[[PatchFreeUNet, torch.Tensor], torch.Tensor]


@torch.no_grad()
def mirrored_patch_free(net: PatchFreeUNet, image: torch.Tensor, patch: list[int], mirror_axes: list[int],
                        slide: Slide, heads: Heads) -> torch.Tensor:
    """Full-resolution logits ``(K, *spatial)`` of ``image`` ``(C, *spatial)``, averaged over the mirrored
    copies along ``mirror_axes`` (every combination, as :func:`predict_logits` mirrors): each copy is flipped,
    brought to low resolution (:func:`low_resolution_input`), its U-Net slid over it unmirrored (``slide``,
    tiles of ``patch / factor``), the heads run over the blended features (``heads``), the result cropped to the
    scan and flipped back.

    The heads run once per mirrored copy: averaging the flipped copies' features and running the heads once
    (eight times cheaper in the heads) scored below not mirroring at all on the brain set (mean Dice 0.963
    against 0.969 unmirrored; the heads per copy 0.977, docs/planning.md).
    """
    low_patch = [p // f for p, f in zip(patch, net.factor)]
    body = LowResolutionBody(net)
    crop = (slice(None), *(slice(0, s) for s in image.shape[1:]))
    combos = mirror_combinations(mirror_axes)
    total: torch.Tensor | None = None
    for axes in combos:
        dims = [a + 1 for a in axes]
        copy = torch.flip(image, dims) if dims else image
        logits = heads(net, slide(body, low_resolution_input(net, copy), low_patch))[crop]
        logits = torch.flip(logits, dims) if dims else logits
        total = logits.clone() if total is None else total.add_(logits)
    assert total is not None
    return total.div_(len(combos)) if len(combos) > 1 else total


@torch.no_grad()
def low_resolution_input(net: PatchFreeUNet, image: torch.Tensor) -> torch.Tensor:
    """``image`` ``(C, *spatial)`` padded at its far end to a multiple of the network's factor by repeating its
    last voxels (so that the last low-resolution voxel averages the scan, not zeros) and averaged down:
    ``(C, *ceil(spatial / factor))``."""
    spatial = list(image.shape[1:])
    padded = [ceil(s / f) * f for s, f in zip(spatial, net.factor)]
    batch = image.unsqueeze(0)
    if padded != spatial:
        batch = F.pad(batch, [p for s, q in zip(spatial[::-1], padded[::-1]) for p in (0, q - s)], mode="replicate")
    return net.low_resolution(batch)[0]
