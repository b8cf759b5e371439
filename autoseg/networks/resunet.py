"""A 3D U-Net with a residual encoder, deep supervision at native resolution, and what it costs.

Why our own and not MONAI's DynUNet: DynUNet upsamples every deep-supervision output to full resolution
and stacks them (extra memory and compute per step, measured +10 % saved activations on a 4-stage
16->128 net), and a planner needs a cost model that mirrors the forward pass exactly. Both live here:
:class:`ResidualUNet` and :func:`costs` must change together, and ``tests/networks`` checks one against
the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import nn

__all__ = ["ResidualUNet", "NetworkCost", "costs"]


Triple = tuple[int, int, int]


def _t3(v: list[int]) -> Triple:
    """torch wants a (z, y, x) tuple where plans hold lists."""
    return (int(v[0]), int(v[1]), int(v[2]))


def _pad(kernel: list[int]) -> Triple:
    return _t3([k // 2 for k in kernel])


class _ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: list[int], stride: list[int] | None = None):
        super().__init__(
            nn.Conv3d(cin, cout, _t3(kernel), _t3(stride or [1, 1, 1]), _pad(kernel)),
            nn.InstanceNorm3d(cout, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class _ResidualBlock(nn.Module):
    """conv-norm-act, conv-norm, plus the input (projected by a strided 1x1 conv when the shape changes), act."""

    def __init__(self, cin: int, cout: int, kernel: list[int], stride: list[int]):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, _t3(kernel), _t3(stride), _pad(kernel))
        self.norm1 = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        self.conv2 = nn.Conv3d(cout, cout, _t3(kernel), 1, _pad(kernel))
        self.norm2 = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.project = None
        if cin != cout or any(s != 1 for s in stride):
            self.project = nn.Sequential(nn.Conv3d(cin, cout, 1, _t3(stride)),
                                         nn.InstanceNorm3d(cout, eps=1e-5, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        skip = x if self.project is None else self.project(x)
        return self.act(out + skip)


def _plain_block(cin: int, cout: int, kernel: list[int], stride: list[int]) -> nn.Module:
    """Two conv-norm-act layers, the first strided (nnU-Net's plain encoder block)."""
    return nn.Sequential(_ConvNormAct(cin, cout, kernel, stride), _ConvNormAct(cout, cout, kernel))


class ResidualUNet(nn.Module):
    """U-Net for 3D patches with a residual (default) or plain encoder.

    Args:
        in_channels: image channels.
        n_classes: output classes including background.
        features: channels per stage, e.g. ``[16, 32, 64, 128]``.
        kernel_sizes: conv kernel per stage, e.g. ``[[1, 3, 3], [3, 3, 3], ...]``.
        strides: downsampling stride per stage; the first is ``[1, 1, 1]``.
        blocks_per_stage: residual blocks per encoder stage.
        decoder_convs: conv-norm-act layers per decoder stage.
        deep_supervision: in training mode, return logits at every decoder resolution (full first).
        residual: residual encoder blocks (seeds 000 and 003); False gives plain two-conv blocks.
        channels_last: keep the weights and every activation channels-last (``torch.channels_last_3d``): on
            the CPU the convolutions then skip their layout conversions (7-9 % faster training steps on a
            2-core AVX2 host, ``benchmarks/bench_speed.py step``). The input is converted in
            :meth:`forward`; outputs may come out channels-last (their values are the same).
    """

    def __init__(self, in_channels: int, n_classes: int, features: list[int], kernel_sizes: list[list[int]],
                 strides: list[list[int]], blocks_per_stage: list[int], decoder_convs: int = 1,
                 deep_supervision: bool = True, residual: bool = True, channels_last: bool = False):
        super().__init__()
        n = len(features)
        if not (len(kernel_sizes) == len(strides) == len(blocks_per_stage) == n):
            raise ValueError(f"features, kernel_sizes, strides and blocks_per_stage need one entry per stage ({n}); "
                             f"got {len(kernel_sizes)}, {len(strides)}, {len(blocks_per_stage)}")
        if any(s != 1 for s in strides[0]):
            raise ValueError(f"the first stage cannot downsample; strides[0] is {strides[0]}")
        self.deep_supervision = deep_supervision
        self.stem = _ConvNormAct(in_channels, features[0], kernel_sizes[0])
        self.encoder = nn.ModuleList()
        cin = features[0]
        for s in range(n):
            make = _ResidualBlock if residual else _plain_block
            blocks = [make(cin if b == 0 else features[s], features[s], kernel_sizes[s],
                           strides[s] if b == 0 else [1, 1, 1]) for b in range(blocks_per_stage[s])]
            self.encoder.append(nn.Sequential(*blocks))
            cin = features[s]
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(n - 2, -1, -1):
            up = _t3(strides[s + 1])
            self.up.append(nn.ConvTranspose3d(features[s + 1], features[s], up, up))
            layers = [_ConvNormAct(2 * features[s] if i == 0 else features[s], features[s], kernel_sizes[s])
                      for i in range(decoder_convs)]
            self.decoder.append(nn.Sequential(*layers))
            self.heads.append(nn.Conv3d(features[s], n_classes, 1))
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's stubs lack it

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        logits = self.decode(x)[1]
        return logits if self.deep_supervision and self.training else logits[0]

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last decoder stage's features ``(B, features[0], *spatial)`` and the logits: every decoder
        resolution's in training with deep supervision, else the full resolution's only (full first)."""
        skips = []
        out = self.stem(x)
        for stage in self.encoder:
            out = stage(out)
            skips.append(out)
        logits = []
        for i, (up, dec, head) in enumerate(zip(self.up, self.decoder, self.heads)):
            out = dec(torch.cat([up(out), skips[-2 - i]], dim=1))
            if self.deep_supervision and self.training or i == len(self.up) - 1:
                logits.append(head(out))
        return out, logits[::-1]


@dataclass(frozen=True)
class NetworkCost:
    """Costs of one training sample (batch 1) of :class:`ResidualUNet` for a patch.

    Attributes:
        saved_elements: activation elements kept for the backward pass (parameters excluded).
        forward_flops: floating-point operations of the forward pass (multiply-adds count as 2).
        parameters: number of trainable parameters.
        output_elements: elements of all logits (full resolution and deep-supervision outputs).
    """

    saved_elements: int
    forward_flops: int
    parameters: int
    output_elements: int


def costs(in_channels: int, n_classes: int, features: list[int], kernel_sizes: list[list[int]],
          strides: list[list[int]], blocks_per_stage: list[int], patch: list[int], decoder_convs: int = 1,
          deep_supervision: bool = True, residual: bool = True) -> NetworkCost:
    """Walk the same layers as :meth:`ResidualUNet.forward` and count what each keeps for backward.

    Per op, in float terms: a conv keeps its input; instance norm keeps its input (the conv output); an
    in-place LeakyReLU keeps its output, which is also the next conv's input (counted once); concatenation
    and addition keep nothing.
    """
    saved = flops = params = outputs = 0

    def conv(cin: int, cout: int, k: list[int], vox_out: int) -> None:
        nonlocal flops, params
        flops += 2 * cin * cout * prod(k) * vox_out
        params += cin * cout * prod(k) + cout

    def norm(c: int) -> None:
        nonlocal params
        params += 2 * c

    shapes = []
    shape = list(patch)
    for st in strides:
        shape = [a // b for a, b in zip(shape, st)]
        shapes.append(shape)
    vox = [prod(s) for s in shapes]
    saved += in_channels * vox[0]  # the input, kept by the stem conv
    conv(in_channels, features[0], kernel_sizes[0], vox[0])
    norm(features[0])
    saved += 2 * features[0] * vox[0]  # conv output (norm), activation output
    cin = features[0]
    for s, f in enumerate(features):
        for b in range(blocks_per_stage[s]):
            c_in = cin if b == 0 else f
            conv(c_in, f, kernel_sizes[s], vox[s])
            conv(f, f, kernel_sizes[s], vox[s])
            norm(f)
            norm(f)
            saved += 4 * f * vox[s]  # conv1 out, act1 out, conv2 out, act2 out (residual: act(out + skip))
            if residual and b == 0 and (c_in != f or any(x != 1 for x in strides[s])):
                conv(c_in, f, [1, 1, 1], vox[s])
                norm(f)
                saved += f * vox[s]  # projection conv output, kept by its norm
        cin = f
    n = len(features)
    for s in range(n - 2, -1, -1):
        k_up = strides[s + 1]
        flops += 2 * features[s + 1] * features[s] * prod(k_up) * vox[s + 1]
        params += features[s + 1] * features[s] * prod(k_up) + features[s]
        saved += 2 * features[s] * vox[s]  # the concatenation, kept by the first decoder conv
        for i in range(decoder_convs):
            conv(2 * features[s] if i == 0 else features[s], features[s], kernel_sizes[s], vox[s])
            norm(features[s])
            saved += 2 * features[s] * vox[s]  # conv output (norm), activation output
        conv(features[s], n_classes, [1, 1, 1], vox[s])
        if deep_supervision or s == 0:
            outputs += n_classes * vox[s]
    return NetworkCost(saved, flops, params, outputs)
