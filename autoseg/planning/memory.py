"""Memory and compute of one training step, from the network's cost model.

Memory = batch x (activations kept for backward + loss terms) + parameters x (weights, gradients,
optimiser state). The activation part is the one that grows with the patch; ``tests/planning`` checks it
against bytes measured with ``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoseg.networks.resunet import costs
from autoseg.plans import NetworkPlan

__all__ = ["StepCost", "step_cost"]

#: float copies of the logits kept by a softmax + cross-entropy + Dice loss (softmax, log-softmax, one-hot target)
LOSS_COPIES = 3
#: float copies of every parameter during training: weights, gradients, one momentum buffer (SGD) / two (Adam)
PARAM_COPIES = {"sgd": 3, "adam": 4}


@dataclass(frozen=True)
class StepCost:
    """Estimated cost of one training step.

    Attributes:
        activation_bytes: activations kept for backward, whole batch.
        total_bytes: activations + loss + parameters and optimiser state.
        flops: forward + backward (3x forward), whole batch.
    """

    activation_bytes: int
    total_bytes: int
    flops: float


def step_cost(net: NetworkPlan, patch: list[int], batch: int, in_channels: int, n_classes: int,
              amp: bool, optimizer: str = "sgd") -> StepCost:
    """Estimate memory (bytes) and compute (FLOPs) of one training step.

    Args:
        amp: activations in 16-bit (CUDA mixed precision) instead of 32-bit.
    """
    c = costs(in_channels, n_classes, net.features, net.kernel_sizes, net.strides, net.blocks_per_stage, patch,
              net.decoder_convs, net.deep_supervision, net.architecture == "residual_unet")
    act_bytes = 2 if amp else 4
    activations = batch * c.saved_elements * act_bytes
    loss = batch * c.output_elements * 4 * LOSS_COPIES
    params = c.parameters * 4 * PARAM_COPIES[optimizer]
    return StepCost(activations, activations + loss + params, 3.0 * batch * c.forward_flops)
