"""Tiled prediction of a patch-free network: its U-Net slid over the low-resolution scan, its full-resolution
heads run once over the blended features.

Sliding the whole network over full-resolution tiles runs its full-resolution heads on every voxel as often as
tiles overlap it (about 8 times at a step of half a tile), and in a profile of a 4-channel brain scan the heads
were half of the network's time. The heads are local (a few convolutions, no normalisation) and their input is
the U-Net's last decoder features, so here the U-Net alone is slid over the scan averaged down by the network's
factor: its features and low-resolution logits are blended with the Gaussian weights and mirroring of
:func:`autoseg.inference.sliding_window.predict_logits`, at low resolution, and the heads then run once per voxel,
slab by slab, over the blended features. The result is the network's full-resolution output (heads plus the
up-sampled low-resolution logits) with the features rather than the outputs averaged over tiles and mirrored
copies; the low-resolution grid is one for the whole scan instead of one per tile.
"""

from __future__ import annotations

from math import ceil, prod

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.inference.sliding_window import predict_logits
from autoseg.networks.patchfree import PatchFreeUNet

__all__ = ["predict_patch_free_tiles", "heads_by_slabs", "HEADS_SLAB_BYTES", "HEADS_CHANNELS_LAST_ON_CPU"]

#: float32 bytes the heads may hold at full resolution per slab (their input, the up-sampled and concatenated
#: features and one convolution's output: about ``5 h`` channels, ``h`` the heads' width)
HEADS_SLAB_BYTES = 256 * 2**20
#: the heads' input channels-last on the CPU: their convolutions have few channels (8 on CPU plans) at full
#: resolution, where oneDNN's channels-last kernels ran a 16x120x120-voxel slab 2.3x faster on a 2-core host
#: (1.18 s against 2.71 s; the same values to 1e-7)
HEADS_CHANNELS_LAST_ON_CPU = True


class _Body(nn.Module):
    """The patch-free network's U-Net on low-resolution input: its last decoder features and logits, one tensor
    ``(B, f0 + K, *low)``, so that the sliding window blends both."""

    def __init__(self, net: PatchFreeUNet):
        super().__init__()
        self.net = net

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        features, logits = self.net.body.decode(low)
        return torch.cat([features, logits[0]], dim=1)


def heads_by_slabs(net: PatchFreeUNet, blended: torch.Tensor, device: torch.device, amp: bool = False,
                   budget_bytes: int = HEADS_SLAB_BYTES) -> torch.Tensor:
    """Full-resolution logits ``(K, *low * factor)``, float32 on the CPU, of blended low-resolution ``blended``
    ``(f0 + K, *low)``: the segmentation head plus the up-sampled logits, as the network's eval forward gives
    them, computed slab by slab along the first axis, each with :attr:`PatchFreeUNet.margin` (at least one)
    low-resolution slices of context so that it equals the whole volume's result.

    On the CPU the slabs go through the heads channels-last (:data:`HEADS_CHANNELS_LAST_ON_CPU`)."""
    f0, n_classes, h = net.up_seg.in_channels, net.seg_out.out_channels, net.up_seg.out_channels
    if blended.shape[0] != f0 + n_classes:
        raise ValueError(f"blended features of {blended.shape[0]} channels; the network's heads take {f0} and its "
                         f"logits have {n_classes}")
    low, factor = list(blended.shape[1:]), net.factor
    plane = prod(low[1:]) * prod(factor[1:])
    rows = max(1, budget_bytes // (4 * 5 * h * plane * factor[0]))
    margin = max(1, net.margin[0])
    out = torch.empty((n_classes, *[n * f for n, f in zip(low, factor)]), dtype=torch.float32)
    for z in range(0, low[0], rows):
        a, b = max(0, z - margin), min(low[0], z + rows + margin)
        part = blended[:, a:b].to(device).unsqueeze(0)
        features = part[:, :f0]
        if device.type == "cpu" and HEADS_CHANNELS_LAST_ON_CPU:
            features = features.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            seg = net.heads(features)[0].float() + net.upsampled(part[:, f0:].float())
        keep = slice((z - a) * factor[0], (min(z + rows, low[0]) - a) * factor[0])
        out[:, z * factor[0]:min(z + rows, low[0]) * factor[0]] = seg[0, :, keep].cpu()
    return out


@torch.no_grad()
def predict_patch_free_tiles(net: nn.Module, image: torch.Tensor, patch: list[int], step: float,
                             mirror_axes: list[int], sigma_scale: float, device: torch.device,
                             tiles_per_batch: int = 1, amp: bool = False, accumulate_on: torch.device | None = None,
                             chunk: int | None = None, flips_per_call: int = 1) -> torch.Tensor:
    """Full-resolution logits ``(K, *spatial)`` (float32, on the CPU) of ``image`` ``(C, *spatial)`` by tiles of
    the full-resolution region ``patch``; the other arguments as :func:`predict_logits`'s, which slides the U-Net
    over the low-resolution scan (tiles of ``patch / factor``).

    The scan is padded at its far end to a multiple of the factor by repeating its last voxels (so that the last
    low-resolution voxel averages the scan, not zeros), averaged down, predicted, and the result cropped back.

    Raises:
        TypeError: ``net`` is not a :class:`PatchFreeUNet`.
    """
    if not isinstance(net, PatchFreeUNet):
        raise TypeError(f"tiles of the low-resolution U-Net need a PatchFreeUNet, not {type(net).__name__}")
    factor = net.factor
    spatial = list(image.shape[1:])
    padded = [ceil(s / f) * f for s, f in zip(spatial, factor)]
    if padded != spatial:
        pads = [p for s, q in zip(spatial[::-1], padded[::-1]) for p in (0, q - s)]
        image = F.pad(image.unsqueeze(0), pads, mode="replicate")[0]
    low = F.avg_pool3d(image.unsqueeze(0), tuple(factor))[0] if any(f > 1 for f in factor) else image
    low_patch = [p // f for p, f in zip(patch, factor)]
    blended = predict_logits(_Body(net), low, low_patch, step, mirror_axes, sigma_scale, device, tiles_per_batch,
                             amp, accumulate_on, chunk, flips_per_call)
    logits = heads_by_slabs(net, blended, device, amp)
    return logits[(slice(None), *(slice(0, s) for s in spatial))]

