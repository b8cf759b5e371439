"""What MONAI's SegResNetDS, AttentionUnet and UNETR cost per training sample, counted without building them.

The planner used to measure these networks with a forward pass on PyTorch's ``meta`` device
(:mod:`autoseg.planning.measured`), which needs MONAI imported (seconds: its package imports its transforms
and their dependencies) and PyTorch's meta kernels (their first normalisation imports ``torch._dynamo``). Here
each network's layers are walked in the order :mod:`autoseg.networks.monai_nets` builds and MONAI (1.6) runs
them, and counted as that measurement counts (``tests/networks/test_monai_costs.py`` checks every term against
it, exactly, on all three networks and several shapes):

- kept for backward, each tensor once: a convolution or linear layer keeps its input; a batch or instance norm
  its input and per-channel statistics (batch norm: 4 per channel, the running ones included; instance norm
  with affine parameters 3, without 2); an in-place LeakyReLU, a ReLU and a sigmoid their output; a PReLU its
  input and a view of its weight; GELU its input; layer norm its input and 2 statistics per token; a matrix
  product of the attention both operands (as views, so again when the same tensor was kept before) and
  softmax its output; a linear layer also a transposed view of its weight (a view only, but the measurement
  counts it, so this does too: at most a few MB); additions, concatenations and dropout with p=0 nothing;
- FLOPs of the forward pass as ``torch.utils.flop_counter`` counts them: convolutions ``2 x weight elements x
  output voxels`` (input voxels for a transposed one), matrix products ``2 m n k``, nothing else;
- parameters, with UNETR's position embedding left out (the caller adds it for the patch it is sized for).
"""

from __future__ import annotations

from math import ceil, prod
from typing import TYPE_CHECKING

from autoseg.networks.monai_nets import UNETR_TOKEN, segresnet_resolution, segresnet_strides
from autoseg.networks.resunet import NetworkCost

if TYPE_CHECKING:
    from autoseg.plans import NetworkPlan

__all__ = ["monai_costs", "UNETR_LAYERS"]

#: transformer blocks in MONAI's UNETR (fixed there)
UNETR_LAYERS = 12
#: UNETR's transformer outputs that feed its encoders 2-4 (MONAI's choice)
_UNETR_SKIPS = 3


class _Tally:
    """Running totals of a network's walk: elements kept for backward, forward FLOPs, parameters, logits."""

    def __init__(self) -> None:
        self.saved = self.flops = self.params = self.outputs = 0

    def keep(self, elements: int) -> None:
        self.saved += elements

    def conv(self, cin: int, cout: int, kernel: list[int], voxels: int, bias: bool) -> None:
        """A convolution's FLOPs over ``voxels`` (its output's; a transposed one's input's) and its parameters."""
        self.flops += 2 * cin * cout * prod(kernel) * voxels
        self.params += cin * cout * prod(kernel) + (cout if bias else 0)

    def linear(self, tokens: int, fin: int, fout: int, bias: bool) -> None:
        """A linear layer: FLOPs, parameters, and its input and weight view kept."""
        self.flops += 2 * tokens * fin * fout
        self.params += fin * fout + (fout if bias else 0)
        self.keep(tokens * fin + fin * fout)


def _conv_out(shape: list[int], kernel: list[int], stride: list[int]) -> list[int]:
    """Output shape of a convolution padded by ``kernel // 2``."""
    return [(e + 2 * (k // 2) - k) // s + 1 for e, k, s in zip(shape, kernel, stride)]


def _segres_block(t: _Tally, f: int, kernel: list[int], voxels: int) -> None:
    """norm-act-conv-norm-act-conv plus the input; keeps the two norms' inputs and the two activations."""
    t.keep(4 * f * voxels + 2 * 3 * f)
    t.conv(f, f, kernel, voxels, False)
    t.conv(f, f, kernel, voxels, False)
    t.params += 2 * 2 * f


def _segresnet(net: NetworkPlan, cin: int, n_classes: int, patch: list[int]) -> _Tally:
    t, n = _Tally(), len(net.blocks_per_stage)
    # MONAI's downsampling after each of the n stages (the plan holds the first n - 1; the last one sets the
    # last stage's kernels): the strides its rule gives the spacing MONAI is built with, one stage further
    scales = segresnet_strides(list(segresnet_resolution(net.strides)), n + 1)[1:]
    kernels = [[3 if s > 1 else 1 for s in sc] for sc in scales]
    feats = [net.features[0] * 2**i for i in range(n)]
    shapes = [list(patch)]
    for sc in scales[:-1]:
        shapes.append([ceil(e / s) for e, s in zip(shapes[-1], sc)])
    vox = [prod(s) for s in shapes]
    t.keep(cin * vox[0])
    t.conv(cin, feats[0], kernels[0], vox[0], False)
    for i in range(n):
        for _ in range(net.blocks_per_stage[i]):
            _segres_block(t, feats[i], kernels[i], vox[i])
        if i < n - 1:  # the strided convolution keeps the stage's output, also its skip
            t.keep(feats[i] * vox[i])
            t.conv(feats[i], feats[i + 1], kernels[i], vox[i + 1], False)
    dsdepth = n - 1 if net.deep_supervision else 1
    headed = True  # the bottleneck's output is not kept yet: the first up-sampling keeps it
    for i in range(n - 1):
        s = n - 2 - i
        if i == 0 or not headed:
            t.keep(2 * feats[s] * vox[s + 1])
        t.conv(2 * feats[s], feats[s], kernels[s], vox[s + 1], False)  # transposed: over its input
        _segres_block(t, feats[s], kernels[s], vox[s])
        headed = n - 1 - i <= dsdepth
        if headed:
            t.keep(feats[s] * vox[s])
            t.conv(feats[s], n_classes, [1, 1, 1], vox[s], True)
            t.outputs += n_classes * vox[s]
    return t


def _batchnorm_conv_relu(t: _Tally, cin: int, cout: int, voxels: int, transposed_from: int | None = None) -> None:
    """MONAI's ``Convolution`` (bias) then batch norm and ReLU: keeps the conv's output, 4 statistics, the ReLU's
    output. ``transposed_from``: a transposed convolution from that many input voxels."""
    t.conv(cin, cout, [3, 3, 3], voxels if transposed_from is None else transposed_from, True)
    t.keep(2 * cout * voxels + 4 * cout)
    t.params += 2 * cout


def _attention_unet(net: NetworkPlan, cin: int, n_classes: int, patch: list[int]) -> _Tally:
    t, f, n = _Tally(), net.features, len(net.features)
    shapes = [list(patch)]
    for st in net.strides[1:]:
        shapes.append(_conv_out(shapes[-1], [3, 3, 3], st))
    vox = [prod(s) for s in shapes]
    t.keep(cin * vox[0])  # the first convolution's input
    _batchnorm_conv_relu(t, cin, f[0], vox[0])
    _batchnorm_conv_relu(t, f[0], f[0], vox[0])
    for lv in range(n - 1):  # down: each level's input is the previous ReLU's output, kept already
        _batchnorm_conv_relu(t, f[lv], f[lv + 1], vox[lv + 1])
        _batchnorm_conv_relu(t, f[lv + 1], f[lv + 1], vox[lv + 1])
    for lv in range(n - 2, -1, -1):  # up, from the bottom
        c, v = f[lv], vox[lv]
        if lv < n - 2:
            t.keep(f[lv + 1] * vox[lv + 1])  # the deeper merge's PReLU output, kept by the up-convolution
        _batchnorm_conv_relu(t, f[lv + 1], c, v, transposed_from=vox[lv + 1])
        ci = c // 2  # the attention gate: two 1x1 convolutions with batch norm, ReLU of the sum, 1x1, sigmoid
        for _ in range(2):
            t.conv(c, ci, [1, 1, 1], v, True)
            t.keep(ci * v + 4 * ci)
            t.params += 2 * ci
        t.keep(ci * v)
        t.conv(ci, 1, [1, 1, 1], v, True)
        t.keep(v + 4 + v)
        t.params += 2
        t.conv(2 * c, c, [3, 3, 3], v, True)  # merge of gated skip and up-sampled: instance norm, PReLU
        t.keep(2 * c * v + c * v + 2 * c + c * v + 1)
        t.params += 1
    t.keep(f[0] * vox[0])
    t.conv(f[0], n_classes, [1, 1, 1], vox[0], True)
    t.outputs += n_classes * vox[0]
    return t


def _res_block(t: _Tally, cin: int, cout: int, voxels: int) -> None:
    """MONAI's ``UnetResBlock`` (stride 1, no biases, instance norm without affine parameters), input kept by
    the caller: two norms' inputs, two in-place LeakyReLUs, and the 1x1 projection's norm input when the
    channels change."""
    project = cin != cout
    t.conv(cin, cout, [3, 3, 3], voxels, False)
    t.conv(cout, cout, [3, 3, 3], voxels, False)
    if project:
        t.conv(cin, cout, [1, 1, 1], voxels, False)
    t.keep((5 if project else 4) * cout * voxels + 2 * cout * (3 if project else 2))


def _unetr(net: NetworkPlan, cin: int, n_classes: int, patch: list[int]) -> _Tally:
    t = _Tally()
    f, hid, mlp, heads = net.features[0], net.hidden_size, net.mlp_dim, net.num_heads
    grid = [e // UNETR_TOKEN for e in patch]
    tok = prod(grid)
    vox = [tok * 8**k for k in range(5)]  # token grid up to full resolution, twice per axis each step
    t.keep(cin * prod(patch))  # the patch embedding's input (the first encoder's too)
    t.conv(cin, hid, [UNETR_TOKEN] * 3, tok, True)
    for _ in range(UNETR_LAYERS):
        t.keep(2 * (hid * tok + 2 * tok))  # two layer norms: input and 2 statistics per token
        t.params += 2 * 2 * hid
        t.linear(tok, hid, 3 * hid, False)  # q, k, v
        t.keep(3 * tok * hid + 2 * heads * tok * tok)  # q, k, v as the products keep them; softmax, its view
        t.flops += 2 * 2 * tok * tok * hid
        t.linear(tok, hid, hid, True)
        t.linear(tok, hid, mlp, True)
        t.keep(tok * mlp)  # GELU's input
        t.linear(tok, mlp, hid, True)
    t.keep(hid * tok + 2 * tok)  # the final layer norm
    t.params += 2 * hid
    t.keep((_UNETR_SKIPS + 1) * hid * tok)  # the token maps as volumes, kept by the transposed convolutions
    _res_block(t, cin, f, vox[4])  # encoder 1 at full resolution
    for level, layers in ((1, 2), (2, 1), (3, 0)):  # encoders 2-4: up from the tokens to their resolution
        c = f * 2**level
        t.conv(hid, c, [2, 2, 2], tok, False)
        for j in range(layers):
            if j == 0:
                t.keep(c * vox[1])
            t.conv(c, c, [2, 2, 2], vox[j + 1], False)
            t.keep(c * vox[j + 2])
            _res_block(t, c, c, vox[j + 2])
    cprev = hid
    for level in (3, 2, 1, 0):  # decoders 5-2: up, concatenate the skip, residual block
        c, v = f * 2**level, vox[4 - level]
        t.conv(cprev, c, [2, 2, 2], vox[3 - level], False)
        t.keep(2 * c * v)
        _res_block(t, 2 * c, c, v)
        cprev = c
    t.conv(f, n_classes, [1, 1, 1], vox[4], True)
    t.outputs += n_classes * vox[4]
    return t


def monai_costs(net: NetworkPlan, in_channels: int, n_classes: int, patch: list[int]) -> NetworkCost:
    """One float32 training sample of ``net`` (a MONAI architecture) at ``patch``: elements kept for backward,
    forward FLOPs, parameters (UNETR's without its position embedding), logits.

    Raises:
        ValueError: not a MONAI architecture.
    """
    walks = {"segresnet": _segresnet, "attention_unet": _attention_unet, "unetr": _unetr}
    if net.architecture not in walks:
        raise ValueError(f"no MONAI cost model for {net.architecture!r}; known: {', '.join(walks)}")
    t = walks[net.architecture](net, in_channels, n_classes, patch)
    return NetworkCost(t.saved, t.flops, t.params, t.outputs)
