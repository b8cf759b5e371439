"""The patch-free network: a low-resolution view of a large region in, a full-resolution segmentation out.

Our design from seed 004's idea (PFSeg). The network takes the full-resolution region, averages it down by the
plan's ``upsample_factor`` per axis (2, or 1 along a thick-slice axis) and runs our residual U-Net on that
low-resolution input. Its last decoder features feed two full-resolution heads:

- a segmentation head (learned up-sampling, then convolutions to the classes),
- a super-resolution head that reconstructs the full-resolution image (training only, an auxiliary task),

fused: the segmentation head's convolution reads the super-resolution head's features beside its own, so what
the network learns about restoring fine detail reaches the segmentation.

Training evaluates the full-resolution heads only inside one *guidance* patch per sample (half the
low-resolution region per axis, placed by the data loader, centred on foreground as often as patches are);
everywhere else the loss scores the U-Net's low-resolution logits against the label map taken at low
resolution (the same strided nearest-neighbour labels deep supervision uses). So a step costs about as much as
a 3D patch of the low-resolution region's voxel count, while the full-resolution output and the
reconstruction are supervised by the full-resolution label and image inside the guidance patch.

The full-resolution segmentation is the head's output added to the U-Net's low-resolution logits brought
up trilinearly: the head learns the fine correction (a residual), and what the U-Net learned from the whole
region, small classes included, reaches the full-resolution output from the first step (without it, a
15-minute run on the 4-channel brain set never segmented the smallest class at full resolution while its
enhancing and edema classes reached 0.86-0.97 pseudo-Dice). Prediction (eval mode) returns full-resolution
logits for the whole region. The heads hold no normalisation
(its statistics would depend on the region evaluated), and the guidance patch is evaluated with a margin of
low-resolution voxels that covers the heads' receptive field, so the heads give the same values on a patch
as on the whole region (``tests/networks/test_patchfree.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, prod

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.networks.resize import trilinear
from autoseg.networks.resunet import ResidualUNet

__all__ = ["PatchFreeUNet", "PatchFreeOutput", "guidance_size", "head_features", "prediction_bytes", "HEAD_CONVS",
           "HEAD_MIN_FEATURES"]

#: 3x3x3 convolutions on the way from the up-sampled features to each full-resolution output
HEAD_CONVS = 2
#: the full-resolution heads' width: half the U-Net's first stage's, at least this (their voxels are
#: ``factor**3`` times the first stage's, so at full width they would cost as much as the whole U-Net)
HEAD_MIN_FEATURES = 8


def head_features(features: list[int]) -> int:
    """The full-resolution heads' width: half the U-Net's first stage's, at least :data:`HEAD_MIN_FEATURES`."""
    return max(HEAD_MIN_FEATURES, features[0] // 2)


def prediction_bytes(features: list[int], factor: list[int], region: list[int], in_channels: int,
                     n_classes: int) -> int:
    """An upper estimate of the float32 bytes one prediction pass over ``region`` (full-resolution voxels) holds
    at its peak: at full resolution the input, the heads' largest moment (both up-sampled feature maps, the
    concatenation, a convolution's output: ``5 h`` channels), the logits and the up-sampled low-resolution
    logits they are added to; at low resolution the U-Net's
    first stage (input, skip, up-sampled, concatenation: ``6 f0`` channels)."""
    full = prod(region)
    low = full // prod(factor)
    return 4 * (full * (in_channels + 5 * head_features(features) + 2 * n_classes) + low * 6 * features[0])


def guidance_size(low_res: list[int] | tuple[int, ...], share: float) -> list[int]:
    """Edges (low-resolution voxels) of the guidance patch: ``share`` of the low-resolution region per axis, at
    least one voxel."""
    return [max(1, int(e * share)) for e in low_res]


@dataclass
class PatchFreeOutput:
    """What :class:`PatchFreeUNet` returns in training; :class:`autoseg.training.losses.DeepSupervisionLoss`
    scores it.

    Attributes:
        low_res: the U-Net's logits at low resolution, its finest first (deep supervision).
        full_res: segmentation logits inside the guidance patch, ``(B, K, *patch)`` at full resolution.
        reconstruction: the super-resolution head's image inside the guidance patch, ``(B, C, *patch)``.
        image: the input image inside the guidance patch (the reconstruction's target), ``(B, C, *patch)``.
        corner: each sample's guidance patch corner in full-resolution voxels of the region, ``(B, 3)`` int64.
        reconstruction_weight: the super-resolution loss's weight (from the plan).
    """

    low_res: list[torch.Tensor]
    full_res: torch.Tensor
    reconstruction: torch.Tensor
    image: torch.Tensor
    corner: torch.Tensor
    reconstruction_weight: float


def _triple(v: list[int]) -> tuple[int, int, int]:
    return int(v[0]), int(v[1]), int(v[2])


def _conv_act(cin: int, cout: int, kernel: list[int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, _triple(kernel), 1, _triple([k // 2 for k in kernel])),
                         nn.LeakyReLU(0.01, inplace=True))


class PatchFreeUNet(nn.Module):
    """Low-resolution U-Net with full-resolution segmentation and super-resolution heads (module docstring).

    Args:
        in_channels, n_classes, features, kernel_sizes, strides, blocks_per_stage, decoder_convs,
            deep_supervision: the low-resolution :class:`ResidualUNet`.
        factor: down-sampling factor per axis (z, y, x) between the input region and the U-Net's input.
        guidance_share: the guidance patch's edge as a share of the low-resolution region's, per axis.
        reconstruction_weight: the super-resolution loss's weight, passed on in :class:`PatchFreeOutput`.
        channels_last: weights and activations channels-last (``torch.channels_last_3d``), the U-Net's and the
            heads' alike (:class:`ResidualUNet`'s ``channels_last``). The heads' convolutions have few channels
            at full resolution, where oneDNN's contiguous kernels are slow: on an idle 2-core AVX2 host a
            training step of the brain set's CPU plan took 0.35 s instead of 0.47 (zoom-in) and 0.51 s instead
            of 0.72 (zoom-out), one pass over a brain scan 2.8-3.0 s instead of 4.4-4.5 (the same values to
            1e-6). The U-Net's input is converted after the averaging down, whose pooling returns contiguous
            output.
    """

    def __init__(self, in_channels: int, n_classes: int, features: list[int], kernel_sizes: list[list[int]],
                 strides: list[list[int]], blocks_per_stage: list[int], decoder_convs: int, deep_supervision: bool,
                 factor: list[int], guidance_share: float, reconstruction_weight: float,
                 channels_last: bool = False):
        super().__init__()
        if len(factor) != 3 or any(f < 1 for f in factor):
            raise ValueError(f"upsample_factor {factor}: expected 3 positive ints (z, y, x)")
        if not 0 < guidance_share <= 1:
            raise ValueError(f"guidance_share {guidance_share}: expected in (0, 1]")
        self.factor, self.share, self.reconstruction_weight = [int(f) for f in factor], guidance_share, \
            reconstruction_weight
        self.body = ResidualUNet(in_channels, n_classes, features, kernel_sizes, strides, blocks_per_stage,
                                 decoder_convs, deep_supervision)
        f0, k = features[0], kernel_sizes[0]
        h = head_features(features)
        up = _triple(self.factor)
        self.up_seg = nn.ConvTranspose3d(f0, h, up, up)
        self.up_sr = nn.ConvTranspose3d(f0, h, up, up)
        self.sr_convs = nn.Sequential(*[_conv_act(h, h, k) for _ in range(HEAD_CONVS)])
        self.sr_out = nn.Conv3d(h, in_channels, 1)
        self.seg_convs = nn.Sequential(_conv_act(2 * h, h, k), *[_conv_act(h, h, k) for _ in range(HEAD_CONVS - 1)])
        self.seg_out = nn.Conv3d(h, n_classes, 1)
        # low-resolution voxels of context the heads need around a patch so that it matches the whole region: the
        # segmentation output lies behind the reconstruction's convolutions and its own
        reach = [2 * HEAD_CONVS * (e // 2) for e in k]
        self.margin = [ceil(r / f) for r, f in zip(reach, self.factor)]
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's stubs lack it

    @property
    def channels_last(self) -> bool:
        """Whether :meth:`forward` (and :class:`~autoseg.inference.patch_free_tiles.LowResolutionBody`) make the
        input channels-last; kept equal to the U-Net's flag. Setting it does not convert the weights (as with
        :class:`ResidualUNet`, whoever switches it converts them)."""
        return self.body.channels_last

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        self.body.channels_last = value

    def low_resolution(self, x: torch.Tensor) -> torch.Tensor:
        """The region averaged down by ``factor`` (edges must be multiples of it)."""
        if any(s % f for s, f in zip(x.shape[2:], self.factor)):
            raise ValueError(f"patch-free input {list(x.shape[2:])} is not divisible by the factor {self.factor}")
        return F.avg_pool3d(x, tuple(self.factor)) if any(f > 1 for f in self.factor) else x

    def _fused(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The segmentation head's output and the super-resolution head's features it reads."""
        r = self.sr_convs(self.up_sr(features))
        return self.seg_out(self.seg_convs(torch.cat([self.up_seg(features), r], dim=1))), r

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-resolution segmentation logits and reconstruction from low-resolution decoder ``features``."""
        seg, r = self._fused(features)
        return seg, self.sr_out(r)

    def segmentation(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """What prediction returns: the segmentation head on the decoder ``features`` plus the low-resolution
        ``logits`` up-sampled (the reconstruction is not computed)."""
        return self._fused(features)[0] + self.upsampled(logits)

    def patch_heads(self, features: torch.Tensor, corners: list[list[int]],
                    size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`heads` of each sample of ``features`` ``(B, f0, *low)`` inside its low-resolution box at
        ``corners[i]`` of edges ``size``, equal to the whole region's heads there.

        Each box is evaluated inside a window of the same size for every sample (the box plus :attr:`margin`,
        shifted inward where it would leave the region, whose border then pads as the whole region's does), so
        the samples go through the heads as one batch: on a CPU, PyTorch's fast (oneDNN) convolution is used for
        a batch of several where a single small sample falls back to a path 3-5 times slower."""
        shape = features.shape[2:]
        window = [min(e + 2 * m, n) for e, m, n in zip(size, self.margin, shape)]
        starts = [[min(max(c - m, 0), n - w) for c, m, n, w in zip(cs, self.margin, shape, window)] for cs in corners]
        crops = torch.cat([features[i:i + 1, :, a[0]:a[0] + window[0], a[1]:a[1] + window[1], a[2]:a[2] + window[2]]
                           for i, a in enumerate(starts)])
        seg, sr = self.heads(crops)
        keep = [tuple(slice((c - a) * f, (c - a + e) * f) for c, a, e, f in zip(cs, st, size, self.factor))
                for cs, st in zip(corners, starts)]
        return (torch.cat([seg[(slice(i, i + 1), slice(None), *k)] for i, k in enumerate(keep)]),
                torch.cat([sr[(slice(i, i + 1), slice(None), *k)] for i, k in enumerate(keep)]))

    def upsampled(self, logits: torch.Tensor) -> torch.Tensor:
        """The U-Net's low-resolution logits brought to full resolution (trilinear): the base that the
        segmentation head's output is added to, so that the full-resolution segmentation starts from what the
        U-Net learned on the whole region and the head, supervised only in the guidance patches, learns the
        fine correction. Deterministic in backward under ``--deterministic`` (:mod:`autoseg.networks.resize`)."""
        return trilinear(logits, [n * f for n, f in zip(logits.shape[2:], self.factor)])

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor | PatchFreeOutput:
        """Eval: full-resolution logits ``(B, K, *x.shape[2:])``. Training: a :class:`PatchFreeOutput`, the
        full-resolution heads inside each sample's guidance patch, whose low-resolution corners ``guide``
        ``(B, 3)`` gives (None: the centred patch)."""
        low = self.low_resolution(x)
        if self.channels_last:  # pooling returns contiguous output whatever its input
            low = low.contiguous(memory_format=torch.channels_last_3d)
        features, logits = self.body.decode(low)
        if not self.training:
            return self.segmentation(features, logits[0])
        base = self.upsampled(logits[0])
        size = guidance_size(low.shape[2:], self.share)
        if guide is None:
            guide = torch.tensor([[(n - s) // 2 for n, s in zip(low.shape[2:], size)]] * x.shape[0])
        corners = [[int(v) for v in g] for g in guide.tolist()]
        seg, rec = self.patch_heads(features, corners, size)
        full = [[c * f for c, f in zip(cs, self.factor)] for cs in corners]
        edge = [s * f for s, f in zip(size, self.factor)]
        image, base = (torch.cat([t[i:i + 1, :, c[0]:c[0] + edge[0], c[1]:c[1] + edge[1], c[2]:c[2] + edge[2]]
                                  for i, c in enumerate(full)]) for t in (x, base))
        return PatchFreeOutput(logits, seg + base, rec, image, torch.tensor(full, dtype=torch.int64),
                               self.reconstruction_weight)
