"""The training-step memory model's loss and parameter terms against what PyTorch keeps and allocates.

The activation term is checked against measurement in ``tests/networks/test_resunet.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from autoseg.networks.resunet import ResidualUNet, costs
from autoseg.planning import make_plan
from autoseg.planning.memory import (
    AMP_WEIGHT_COPY_BYTES,
    LOSS_SAVED_BYTES,
    default_supervision_weights,
    loss_bytes,
    output_voxels,
    step_cost,
)
from autoseg.plans import NetworkPlan
from autoseg.training.losses import DeepSupervisionLoss, DiceCELoss

from ..autograd_bytes import saved_bytes
from .fingerprints import BRAIN, CT, PROSTATE, device

ISO = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
ANISO = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]]


def network(strides: list[list[int]], deep_supervision: bool = True) -> NetworkPlan:
    n = len(strides)
    return NetworkPlan("residual_unet", [4 * 2**s for s in range(n)], [[3, 3, 3]] * n, strides, [1] * n, 1,
                       deep_supervision)


def planner_weights(net: NetworkPlan) -> list[float]:
    """The deep-supervision weights the planner writes for ``net`` (nnU-Net's 1/2^i, the coarsest 0)."""
    from autoseg.planning.planner import _deep_supervision_weights

    return _deep_supervision_weights(net)


def output_shapes(net: NetworkPlan, patch: list[int]) -> list[list[int]]:
    shapes, shape = [], list(patch)
    for st in net.strides[:-1]:
        shape = [a // b for a, b in zip(shape, st)]
        shapes.append(shape)
    return shapes


def make_loss(net: NetworkPlan, n_classes: int, batch_dice: bool = True) -> DeepSupervisionLoss:
    return DeepSupervisionLoss(DiceCELoss([1.0] * (n_classes - 1), batch_dice), planner_weights(net))


def saved_loss_bytes(loss: DeepSupervisionLoss, outputs: list[torch.Tensor], target: torch.Tensor) -> int:
    """Bytes of distinct storages the loss keeps for backward, its inputs' own storages excluded."""
    return saved_bytes(lambda: loss(outputs, target), [*outputs, target])


def peak_allocated_bytes(step: Callable[[], None]) -> int:
    """Peak of the bytes the CPU allocator holds for tensors made during ``step``, over its allocations and frees
    in order (the profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    assert events, "the profiler recorded no memory events"
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


CASES = {  # network, patch, classes
    "iso-3": (network(ISO), [16, 32, 32], 3),
    "aniso-4": (network(ANISO), [8, 32, 32], 4),
    "iso-2-no-ds": (network(ISO, deep_supervision=False), [16, 32, 32], 2),
}


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "float16"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("batch_dice", [True, False])
def test_loss_saved_bytes_match_measurement(name, amp, batch_dice):
    """What the loss keeps for backward: 9 bytes per voxel and class on every scored output, float32 or 16-bit
    logits (16-bit logits mimic CUDA mixed precision, whose network outputs are float16)."""
    net, patch, k = CASES[name]
    batch = 2
    torch.manual_seed(0)
    dtype = torch.float16 if amp else torch.float32
    outputs = [torch.randn(batch, k, *s).to(dtype).requires_grad_() for s in output_shapes(net, patch)]
    if not net.deep_supervision:
        outputs = outputs[:1]
    target = torch.randint(0, k, (batch, *patch), dtype=torch.int16)
    measured = saved_loss_bytes(make_loss(net, k, batch_dice), outputs, target)
    voxels, weights = output_voxels(net, patch), planner_weights(net)
    scored = sum(v for v, w in zip(voxels, weights) if w)
    assert scored < sum(voxels) or not net.deep_supervision  # the coarsest output is not scored
    assert batch * k * LOSS_SAVED_BYTES * scored == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "float16"])
@pytest.mark.parametrize("name", list(CASES))
def test_loss_term_matches_allocated_peak(name, amp):
    """The loss term of ``step_cost`` against the allocator's peak over the loss's forward and backward, the logits
    included: made in the step, dropped after the forward as the training loop does, their gradients kept."""
    net, patch, k = CASES[name]
    batch = 2
    torch.manual_seed(0)
    dtype = torch.float16 if amp else torch.float32
    shapes = output_shapes(net, patch)[: None if net.deep_supervision else 1]
    leaves = [torch.randn(batch, k, *s).to(dtype).requires_grad_() for s in shapes]
    target = torch.randint(0, k, (batch, *patch), dtype=torch.int16)
    loss = make_loss(net, k)

    def step() -> None:
        loss([x * 1.0 for x in leaves], target).backward()  # the logits exist only inside the step

    measured = peak_allocated_bytes(step)
    estimate = step_cost(net, patch, batch, 1, k, amp).loss_bytes
    assert estimate == pytest.approx(measured, rel=0.10)


def test_output_voxels_are_the_network_outputs():
    net, patch, k = network(ANISO), [8, 32, 32], 3
    model = ResidualUNet(1, k, net.features, net.kernel_sizes, net.strides, net.blocks_per_stage).train()
    outputs = model(torch.zeros(1, 1, *patch))
    assert output_voxels(net, patch) == [prod(o.shape[2:]) for o in outputs] == [8 * 32 * 32, 8 * 16 * 16,
                                                                                  8 * 8 * 8, 4 * 4 * 4]
    c = costs(1, k, net.features, net.kernel_sizes, net.strides, net.blocks_per_stage, patch)
    assert k * sum(output_voxels(net, patch)) == c.output_elements
    assert output_voxels(network(ANISO, deep_supervision=False), patch) == [8 * 32 * 32]


@pytest.mark.parametrize("fp", [BRAIN, PROSTATE, CT], ids=lambda f: f.dataset_name)
def test_default_weights_score_what_the_planner_scores(fp):
    plan = make_plan(fp, device("cpu", 16))
    planned = plan.training.deep_supervision_weights
    assert [w != 0 for w in default_supervision_weights(len(planned))] == [w != 0 for w in planned]
    st = plan.stages[1]
    args = (plan.network, st.patch_size, st.batch_size, len(plan.channel_names), len(plan.labels), plan.amp)
    assert step_cost(*args).loss_bytes == step_cost(*args, deep_supervision_weights=planned).loss_bytes


def test_unscored_outputs_count_their_logits_only():
    voxels = [4096, 512, 64]
    # float32: only logits (4 bytes) and their gradients on unscored outputs; the full-resolution backward is the
    # peak: 17 bytes per voxel and class there, the coarser outputs' logit gradients
    assert loss_bytes(voxels, [1.0, 0.0, 0.0], 3, amp=False) == 3 * (17 * 4096 + 4 * (512 + 64))
    assert loss_bytes(voxels, [1.0, 0.5, 0.0], 3, amp=True) == 3 * (17 * 4096 + 2 * (512 + 64))
    with pytest.raises(ValueError, match="3 outputs, 2 weights"):
        loss_bytes(voxels, [1.0, 0.5], 3, amp=False)
    # a single-stage network (tried by the planner on tiny budgets) has no decoder and no output
    single = network([[1, 1, 1]])
    assert output_voxels(single, [8, 8, 8]) == [] and default_supervision_weights(0) == []
    assert step_cost(single, [8, 8, 8], 2, 1, 3, amp=True).loss_bytes == 0


def test_mixed_precision_keeps_a_16_bit_copy_of_every_weight():
    """Under autocast, each convolution keeps its input and a 16-bit copy of its weight for backward; the copies
    are ``AMP_WEIGHT_COPY_BYTES`` per parameter (CPU autocast in bfloat16 here, the same mechanism as CUDA's
    float16). The activations it keeps are 16-bit too: 2 bytes per saved element of the cost model."""
    net, patch = network(ISO), [16, 16, 16]
    model = ResidualUNet(1, 3, net.features, net.kernel_sizes, net.strides, net.blocks_per_stage).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = [tuple(p.shape) for p in model.parameters()]
    copies: dict[int, int] = {}
    activations: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() in params:
            return t
        is_copy = t.dtype == torch.bfloat16 and t.requires_grad and t.is_leaf is False and tuple(t.shape) in shapes
        (copies if is_copy else activations)[st.data_ptr()] = st.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(2, 1, *patch))
    n_params = sum(p.numel() for p in model.parameters())
    fp32 = step_cost(net, patch, 2, 1, 3, amp=False)
    amp = step_cost(net, patch, 2, 1, 3, amp=True)
    assert amp.parameter_bytes - fp32.parameter_bytes == AMP_WEIGHT_COPY_BYTES * n_params
    assert sum(copies.values()) == pytest.approx(AMP_WEIGHT_COPY_BYTES * n_params, rel=0.10)
    assert amp.activation_bytes == pytest.approx(sum(activations.values()), rel=0.30)
    assert amp.total_bytes == amp.activation_bytes + amp.loss_bytes + amp.parameter_bytes
