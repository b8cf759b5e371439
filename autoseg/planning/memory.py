"""Memory and compute of one training step, from the network's cost model.

Memory = activations + loss + parameters, each term what the step holds at its peak (the start of the backward
pass, when every activation is still kept and the loss's backward runs on top of them):

- activations (grow with batch x patch): the elements each layer keeps for backward, from
  :func:`autoseg.networks.resunet.costs`, at 4 bytes (float32) or, under CUDA mixed precision, 2 bytes:
  autocast runs convolutions and transposed convolutions in float16, and instance norm, LeakyReLU,
  concatenation and addition in their input's dtype, so every saved activation is float16 (the norms' per-channel
  statistics are float32 but only ``B x C`` elements). ``tests/networks`` checks the element count against the
  bytes PyTorch keeps.
- loss (grows with batch x patch x classes), from what :class:`autoseg.training.losses.DiceCELoss` allocates,
  per output voxel and class (``tests/planning/test_memory.py`` checks it against the loss itself):

  * the logits, ``d`` bytes (``d`` = 2 under mixed precision, else 4), and later their gradient (same size),
    on every output, scored or not; the network's cost model does not count them;
  * kept for backward on every output with a non-zero deep-supervision weight, :data:`LOSS_SAVED_BYTES` = 9:
    the float32 log-softmax (4) and softmax (4), which the loss computes in float32 whatever the logits' dtype,
    and the boolean one-hot target (1);
  * while one output's loss runs its forward, :data:`LOSS_FORWARD_TRANSIENT_BYTES` = 4 on top: the float32 copy
    of 16-bit logits (freed once log-softmax and softmax exist) or one masked float32 temporary, not both;
  * while one output's loss runs its backward, :data:`LOSS_BACKWARD_TRANSIENT_BYTES` = 8 on top: a float32
    gradient and the float32 output of the log-softmax (then softmax) backward.

  Outputs are scored full resolution first and autograd runs the most recently built branch first, so their
  backward runs coarsest first. The term is the largest of: during each scored output's forward (every output's
  logits, the saved tensors of the outputs scored so far, its transient), and during each scored output's
  backward (the saved tensors of the finer outputs not yet processed, its own saved and transient bytes, the
  logit gradients of the coarser ones). With a scored full-resolution output ``V_0`` and coarser outputs
  ``V_1, V_2, ...`` the full-resolution backward dominates: ``17 V_0 + d (V_1 + V_2 + ...)`` bytes per class.
- parameters: float32 weights, gradients and optimiser state (:data:`PARAM_COPIES`), plus under mixed
  precision the float16 copy of every weight that autocast makes for the convolutions, which they keep for
  backward (2 bytes per parameter; the instance norms' affine parameters, a negligible share, are not cast).

Not counted: the input batch (float32 images, int16 labels; the first convolution's own saved input is an
activation), the backward's gradients of activations (a few feature maps at a time), the CUDA context and
allocator slack (the planner's reserve and usable share).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from autoseg.networks.patchfree import guidance_size
from autoseg.networks.resunet import costs
from autoseg.plans import NetworkPlan

__all__ = ["StepCost", "step_cost", "loss_bytes", "output_voxels", "default_supervision_weights"]

#: bytes per output voxel and class the loss keeps for backward on a scored output: float32 log-softmax (4) and
#: softmax (4), boolean one-hot target (1)
LOSS_SAVED_BYTES = 9
#: bytes per output voxel and class on top of those while that output's loss runs its forward (the float32 copy of
#: 16-bit logits, or one masked float32 temporary)
LOSS_FORWARD_TRANSIENT_BYTES = 4
#: bytes per output voxel and class on top of those while that output's loss runs its backward (two float32
#: gradients)
LOSS_BACKWARD_TRANSIENT_BYTES = 8
#: float copies of every parameter during training: weights, gradients, one momentum buffer (SGD) / two (Adam)
PARAM_COPIES = {"sgd": 3, "adam": 4}
#: bytes per parameter of the float16 weight copies that autocast makes and the convolutions keep for backward
AMP_WEIGHT_COPY_BYTES = 2


@dataclass(frozen=True)
class StepCost:
    """Estimated cost of one training step.

    Attributes:
        activation_bytes: activations kept for backward, whole batch.
        total_bytes: activations + loss + parameters and optimiser state.
        flops: forward + backward (3x forward), whole batch.
        loss_bytes: the loss's peak (logits, their gradients, what the loss keeps and its transients), whole batch.
        parameter_bytes: weights, gradients, optimiser state and, under mixed precision, 16-bit weight copies.
    """

    activation_bytes: int
    total_bytes: int
    flops: float
    loss_bytes: int
    parameter_bytes: int


def output_voxels(net: NetworkPlan, patch: list[int]) -> list[int]:
    """Voxels of each output of one sample, full resolution first: one per decoder resolution with deep
    supervision, else the full resolution only (the shapes :class:`ResidualUNet` returns in training); none for a
    single-stage network, which has no decoder. The patch-free network's: its full-resolution guidance patch,
    then its U-Net's outputs on the region divided by ``upsample_factor``."""
    shape, vox = [a // f for a, f in zip(patch, net.upsample_factor)], []
    guide = [prod(e * f for e, f in zip(guidance_size(shape, net.guidance_share), net.upsample_factor))] \
        if net.architecture == "patch_free" else []
    for st in net.strides[:-1]:
        shape = [a // b for a, b in zip(shape, st)]
        vox.append(prod(shape))
    return guide + (vox if net.deep_supervision else vox[:1])


def default_supervision_weights(n_outputs: int) -> list[float]:
    """Which outputs the planner scores: all but the coarsest when there are several (nnU-Net's weights
    ``1/2^i`` with the last set to 0; only zero vs non-zero matters for memory)."""
    return [1.0] * n_outputs if n_outputs <= 1 else [1.0] * (n_outputs - 1) + [0.0]


def loss_bytes(voxels: list[int], weights: list[float], n_classes: int, amp: bool) -> int:
    """Peak bytes of the deep-supervision Dice + CE loss of one sample, beyond the network's activations.

    Args:
        voxels: voxels of each output, full resolution first (:func:`output_voxels`).
        weights: deep-supervision weight per output; outputs with weight 0 are not scored (only their logits and
            logit gradients count).
        n_classes: classes including background.
        amp: the logits are 16-bit (CUDA mixed precision) rather than float32.

    Returns:
        Bytes, the largest over each scored output's forward and backward (see the module docstring).

    Raises:
        ValueError: ``weights`` does not give one weight per output.
    """
    if len(weights) != len(voxels):
        raise ValueError(f"one deep-supervision weight per output needed: {len(voxels)} outputs, {len(weights)} "
                         "weights")
    logit = 2 if amp else 4
    scored = [i for i, w in enumerate(weights) if w]
    peaks = [logit * sum(voxels)]
    for i in scored:  # forward, full resolution first: every output's logits exist
        so_far = sum(voxels[j] for j in scored if j <= i)
        peaks.append(logit * sum(voxels) + LOSS_SAVED_BYTES * so_far + LOSS_FORWARD_TRANSIENT_BYTES * voxels[i])
    for i in scored:  # backward, coarsest first
        pending = sum(voxels[j] for j in scored if j < i)  # finer outputs: backward not run yet
        done = sum(voxels[i + 1:])  # coarser outputs: only their logit gradients remain
        peaks.append(LOSS_SAVED_BYTES * pending + (LOSS_SAVED_BYTES + LOSS_BACKWARD_TRANSIENT_BYTES) * voxels[i]
                     + logit * done)
    return n_classes * max(peaks)


def step_cost(net: NetworkPlan, patch: list[int], batch: int, in_channels: int, n_classes: int,
              amp: bool, optimizer: str = "sgd", deep_supervision_weights: list[float] | None = None) -> StepCost:
    """Estimate memory (bytes) and compute (FLOPs) of one training step.

    Args:
        net: the network.
        patch: patch size (z, y, x), voxels.
        batch: samples per step.
        in_channels: image channels.
        n_classes: output classes including background.
        amp: CUDA mixed precision (16-bit activations and logits, 16-bit weight copies) instead of float32.
        optimizer: ``sgd`` or ``adam`` (optimiser state per parameter).
        deep_supervision_weights: weight per output, full resolution first; default: every output but the
            coarsest is scored, as the planner's weights.

    Returns:
        The step's cost; bytes for the whole batch.

    Raises:
        ValueError: ``deep_supervision_weights`` does not give one weight per output.
        KeyError: unknown ``optimizer``.
    """
    c = costs(in_channels, n_classes, net.features, net.kernel_sizes, net.strides, net.blocks_per_stage, patch,
              net.decoder_convs, net.deep_supervision, net.architecture == "residual_unet")
    act_bytes = 2 if amp else 4
    activations = batch * c.saved_elements * act_bytes
    voxels = output_voxels(net, patch)
    weights = default_supervision_weights(len(voxels)) if deep_supervision_weights is None \
        else deep_supervision_weights
    loss = batch * loss_bytes(voxels, weights, n_classes, amp)
    params = c.parameters * (4 * PARAM_COPIES[optimizer] + (AMP_WEIGHT_COPY_BYTES if amp else 0))
    return StepCost(activations, activations + loss + params, 3.0 * batch * c.forward_flops, loss, params)
