"""Build the network a plan describes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from autoseg.plans import NetworkPlan

__all__ = ["build_network", "ARCHITECTURES", "MONAI_ARCHITECTURES"]

#: architectures a plan may name: our U-Net with residual (default) or plain encoder blocks, and MONAI's
#: SegResNet, Attention U-Net and UNETR (:mod:`autoseg.networks.monai_nets`), and our patch-free network
#: (:mod:`autoseg.networks.patchfree`)
ARCHITECTURES = ("residual_unet", "plain_unet", "segresnet", "attention_unet", "unetr", "patch_free")
#: the architectures built from MONAI (each is also a configuration of its own name)
MONAI_ARCHITECTURES = ("segresnet", "attention_unet", "unetr")


def build_network(net: NetworkPlan, in_channels: int, n_classes: int) -> nn.Module:
    """The ``torch.nn.Module`` for ``net``.

    Raises:
        ValueError: unknown architecture name.
    """
    if net.architecture in ("residual_unet", "plain_unet"):
        from autoseg.networks.resunet import ResidualUNet

        return ResidualUNet(in_channels, n_classes, net.features, net.kernel_sizes, net.strides,
                            net.blocks_per_stage, net.decoder_convs, net.deep_supervision,
                            residual=net.architecture == "residual_unet", channels_last=net.channels_last)
    if net.architecture == "patch_free":
        from autoseg.networks.patchfree import PatchFreeUNet

        return PatchFreeUNet(in_channels, n_classes, net.features, net.kernel_sizes, net.strides,
                             net.blocks_per_stage, net.decoder_convs, net.deep_supervision, net.upsample_factor,
                             net.guidance_share, net.reconstruction_weight, channels_last=net.channels_last)
    if net.architecture in ARCHITECTURES:
        from autoseg.networks.monai_nets import build_monai_network

        return build_monai_network(net, in_channels, n_classes)
    raise ValueError(f"unknown architecture {net.architecture!r}; known: {', '.join(ARCHITECTURES)}")
