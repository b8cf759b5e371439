"""Networks by name: plans -> ``torch.nn.Module``."""

from autoseg.networks.factory import build_network

__all__ = ["build_network"]
