"""MONAI's SegResNet, Attention U-Net and UNETR, built from a plan so that they train and predict like ours.

What each gives our trainer (a list of logits, full resolution first, in training with deep supervision; one
tensor otherwise):

- ``segresnet``: MONAI's ``SegResNetDS`` (SegResNet with deep supervision and per-axis kernels and strides, the
  one Auto3DSeg trains), instance norm, one deep-supervision head per decoder resolution. Its strides follow a
  spacing: axes finer than the coarsest by 2x or more are downsampled first, with 1-voxel kernels across the
  coarse axis until then. The plan stores the strides; :func:`segresnet_resolution` turns them back into the
  spacing MONAI wants, and the build checks that MONAI made the same ones.
- ``attention_unet``: MONAI's ``AttentionUnet`` with the plan's per-axis strides; one output (MONAI gives it no
  deep supervision).
- ``unetr``: MONAI's ``UNETR`` (a ViT over 16-voxel tokens, a convolutional decoder); one output. MONAI sizes its
  learned position embedding for one input size; ours resamples it to each input's token grid, so the zoom-in
  stage's small patches and the zoom-out stage's large ones train the same weights (:class:`GridUNETR`); the
  layer norm MONAI builds for a cross-attention UNETR never uses is dropped, so that every parameter gets a
  gradient (DistributedDataParallel requires it).

MONAI is imported only when one of these is built: the residual U-Net never pays its import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from autoseg.networks.factory import MONAI_ARCHITECTURES
from autoseg.networks.resize import trilinear

if TYPE_CHECKING:
    from autoseg.plans import NetworkPlan

__all__ = ["build_monai_network", "segresnet_strides", "segresnet_resolution", "UNETR_TOKEN", "MONAI_ARCHITECTURES"]

#: voxels per UNETR token edge (MONAI fixes it at 16)
UNETR_TOKEN = 16


def segresnet_strides(spacing: list[float], n_stages: int) -> list[list[int]]:
    """The strides ``SegResNetDS(resolution=spacing)`` uses, ``[1, 1, 1]`` first: an axis ``k`` times finer than
    the coarsest (``2**k <= ratio``) is downsampled alone for the first ``k`` stages, then every axis is."""
    ratio = [max(spacing) / s for s in spacing]
    lead = [0] * 3
    for a in range(3):
        while 2 ** (lead[a] + 1) <= ratio[a] + 1e-9:
            lead[a] += 1
    out = [[1, 1, 1]]
    for i in range(n_stages - 1):
        out.append([2 if i < lead[a] or i >= max(lead) else 1 for a in range(3)])
    return out


def segresnet_resolution(strides: list[list[int]]) -> tuple[float, float, float]:
    """A spacing for which MONAI's rule gives ``strides`` back: ``2**(m - k_a)`` where ``k_a`` counts the leading
    stages that downsample axis ``a`` while another is kept and ``m`` is the largest count."""
    lead = [0, 0, 0]
    for s in strides[1:]:
        if min(s) == 2:
            break
        for a in range(3):
            lead[a] += s[a] == 2
    m = max(lead)
    return (float(2 ** (m - lead[0])), float(2 ** (m - lead[1])), float(2 ** (m - lead[2])))


class _GridPositionEmbedding(nn.Module):
    """MONAI's conv patch embedding plus a learned position embedding on a token grid, resampled trilinearly
    to the grid of each input. Keeps MONAI's parameter names."""

    def __init__(self, block: nn.Module, grid: list[int]):
        super().__init__()
        self.patch_embeddings: nn.Module = block.patch_embeddings  # type: ignore[assignment]
        self.position_embeddings: nn.Parameter = block.position_embeddings  # type: ignore[assignment]
        self.dropout: nn.Module = block.dropout  # type: ignore[assignment]
        self.grid = list(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(x)
        grid = list(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        pos: torch.Tensor = self.position_embeddings
        if grid != self.grid:
            pos = pos.transpose(1, 2).reshape(1, -1, *self.grid)
            pos = trilinear(pos, grid).flatten(2).transpose(1, 2)
        return self.dropout(x + pos.to(x.dtype))


def _grid_unetr(in_channels: int, n_classes: int, net: NetworkPlan) -> nn.Module:
    from monai.networks.nets import UNETR

    class GridUNETR(UNETR):  # type: ignore[misc]
        """UNETR that accepts any input whose edges are multiples of 16 voxels (see the module docstring)."""

        def forward(self, x_in: torch.Tensor) -> torch.Tensor:
            self.proj_view_shape = [s // UNETR_TOKEN for s in x_in.shape[2:]] + [self.hidden_size]
            return super().forward(x_in)

    img_size = net.input_size
    model = GridUNETR(in_channels, n_classes, tuple(img_size), feature_size=net.features[0],
                      hidden_size=net.hidden_size, mlp_dim=net.mlp_dim, num_heads=net.num_heads,
                      norm_name="instance", res_block=True)
    model.vit.patch_embedding = _GridPositionEmbedding(  # type: ignore[assignment]
        model.vit.patch_embedding, [s // UNETR_TOKEN for s in img_size])
    for block in model.vit.blocks:  # MONAI builds a cross-attention norm it never uses without cross-attention;
        if not getattr(block, "with_cross_attention", False):  # DDP refuses parameters that get no gradient
            block.norm_cross_attn = nn.Identity()
    return model


def build_monai_network(net: NetworkPlan, in_channels: int, n_classes: int) -> nn.Module:
    """The MONAI network ``net`` names.

    Raises:
        ValueError: unknown architecture, or a plan whose strides MONAI would not build.
    """
    if net.architecture == "segresnet":
        from monai.networks.nets import SegResNetDS

        model = SegResNetDS(3, net.features[0], in_channels, n_classes, act=("leakyrelu", {"negative_slope": 0.01}),
                            norm="instance", blocks_down=tuple(net.blocks_per_stage),
                            dsdepth=len(net.features) - 1 if net.deep_supervision else 1,
                            resolution=segresnet_resolution(net.strides))
        made = [int(v) for v in model.shape_factor()]
        if made != net.total_stride:
            raise ValueError(f"segresnet: the plan's strides {net.strides} (total {net.total_stride}) are not what "
                             f"MONAI builds ({made}); re-run autoseg plan")
        return model
    if net.architecture == "attention_unet":
        from monai.networks.nets import AttentionUnet

        return AttentionUnet(3, in_channels, n_classes, channels=tuple(net.features),
                             strides=[tuple(s) for s in net.strides[1:]],  # type: ignore[misc]  # per axis
                             kernel_size=3, up_kernel_size=3)
    if net.architecture == "unetr":
        return _grid_unetr(in_channels, n_classes, net)
    raise ValueError(f"unknown MONAI architecture {net.architecture!r}; known: {', '.join(MONAI_ARCHITECTURES)}")
