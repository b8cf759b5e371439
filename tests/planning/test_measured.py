"""The measured cost of networks without a counted cost model: fitted on two or three small patches on the meta
device, checked against a real forward/backward at the planned patch; and the counted models of MONAI's networks,
which the planner uses for them, checked the same way."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from autoseg.networks import build_network
from autoseg.planning import make_plan
from autoseg.planning.measured import _FlopCount, counted_step, fitted_step, measure_step, network_step_cost
from autoseg.planning.memory import step_cost
from autoseg.plans import select_configuration

from ..autograd_bytes import saved_bytes
from .fingerprints import BRAIN, PROSTATE, device

CASES = {"brain-segresnet": (BRAIN, "segresnet"), "brain-attention_unet": (BRAIN, "attention_unet"),
         "brain-unetr": (BRAIN, "unetr"), "prostate-segresnet": (PROSTATE, "segresnet")}


@pytest.fixture(scope="module")
def plans():
    return {fp.dataset_name: make_plan(fp, device("cpu", 16), configurations=["3d", "segresnet", "attention_unet",
                                                                                "unetr", "patch_free"])
            for fp in (BRAIN, PROSTATE)}


@pytest.mark.parametrize("case", list(CASES))
def test_scaled_estimate_matches_a_real_step_at_the_planned_patch(plans, case):
    fp, name = CASES[case]
    p = select_configuration(plans[fp.dataset_name], name)
    patch = p.stages[-1].patch_size
    c, k = len(p.channel_names), len(p.labels)
    est = counted_step(p.network, patch, c, k)  # what the planner uses for MONAI's networks
    fit = fitted_step(p.network, patch, c, k)  # the meta measurement's fit, for networks without a counted model
    assert (fit.saved_bytes, fit.flops) == pytest.approx((est.saved_bytes, est.flops), rel=1e-3)
    assert fit.parameters == est.parameters
    torch.manual_seed(0)
    net = build_network(p.network, c, k).train()
    x = torch.randn(1, c, *patch)

    def step() -> None:
        out = net(x)
        outs = out if isinstance(out, list) else [out]
        torch.stack([o.sum() for o in outs]).sum().backward()

    real_bytes = saved_bytes(lambda: net(x), net.parameters())
    net.zero_grad()
    with FlopCounterMode(display=False) as counter:
        step()
    assert est.saved_bytes == pytest.approx(real_bytes, rel=0.30)
    assert est.flops == pytest.approx(counter.get_total_flops(), rel=0.30)
    assert est.parameters == sum(t.numel() for t in net.parameters())


def test_the_fit_is_exact_between_and_beyond_its_patches(plans):
    """Convolutions are affine in the voxels and attention quadratic in the tokens: the fit (on cubes of 2
    and 3 strides, UNETR also 4) reproduces a meta measurement at an anisotropic patch between them (2x3x3
    strides) and at one far larger (8x4x4)."""
    for name in ("segresnet", "unetr"):
        p = select_configuration(plans["brain"], name)
        stride = p.network.total_stride
        between = [e * k for e, k in zip(stride, (2, 3, 3))]
        big = [e * k for e, k in zip(stride, (8, 4, 4))]
        for patch in (between, big):
            m, f = measure_step(p.network, patch, 1, 3), fitted_step(p.network, patch, 1, 3)
            assert f.saved_bytes == pytest.approx(m.saved_bytes, rel=1e-3), (name, patch)
            assert f.flops == pytest.approx(m.flops, rel=1e-3), (name, patch)


def test_meta_measurement_agrees_with_our_exact_cost_model():
    """The same measurement on our own U-Net, whose cost model is exact, gives the model's numbers: the hooks
    count what a step keeps."""
    p = make_plan(BRAIN, device("cpu", 16))
    patch = p.stages[-1].patch_size
    m = measure_step(p.network, patch, 1, 2)
    model = step_cost(p.network, patch, 1, 1, 2, amp=False)
    assert m.saved_bytes == pytest.approx(model.activation_bytes, rel=0.05)
    assert m.flops == pytest.approx(model.flops, rel=0.10)


def test_step_cost_adds_batch_loss_and_optimiser_like_our_model(plans):
    p = select_configuration(plans["brain"], "attention_unet")
    patch = p.stages[-1].patch_size
    one, two = (network_step_cost(p.network, patch, b, 1, 3, amp=False) for b in (1, 2))
    assert two.activation_bytes == 2 * one.activation_bytes and two.loss_bytes == 2 * one.loss_bytes
    assert two.parameter_bytes == one.parameter_bytes == 3 * 4 * fitted_step(p.network, patch, 1, 3).parameters
    amp = network_step_cost(p.network, patch, 1, 1, 3, amp=True)
    assert amp.activation_bytes == pytest.approx(one.activation_bytes / 2, abs=1)


@pytest.mark.parametrize("name", ["3d", "segresnet", "attention_unet", "unetr"])
def test_our_flop_count_equals_torchs_flop_counter(plans, name):
    """The lean counter (no module tracking, no decomposition of uncounted ops) counts exactly what
    ``FlopCounterMode`` counts, forward and backward, on every architecture the planner measures."""
    p = select_configuration(plans["brain"], name)
    patch = [2 * s for s in p.network.total_stride]
    totals = []
    for counter_type in (_FlopCount, lambda: FlopCounterMode(display=False)):
        with torch.device("meta"):
            net = build_network(p.network, 1, 3).train()
            x = torch.zeros(1, 1, *patch)
        with counter_type() as counter:
            out = net(x)
            outs = out if isinstance(out, list) else [out]
            torch.stack([o.sum() for o in outs]).sum().backward()
        totals.append(counter.flops if isinstance(counter, _FlopCount) else counter.get_total_flops())
    assert totals[0] == totals[1] > 0


def _all_tensors(out: object) -> list[torch.Tensor]:
    """Every floating-point tensor of a training output: a tensor, a list of them, or a dataclass of those."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _all_tensors(o)]
    if dataclasses.is_dataclass(out):
        return [t for f in dataclasses.fields(out) for t in _all_tensors(getattr(out, f.name))]
    return []


@pytest.mark.parametrize("name", ["segresnet", "attention_unet", "unetr", "patch_free"])
def test_three_forwards_count_a_whole_step(plans, name):
    """The measurement runs only the forward and counts the step as three of them: within 0.5 % of counting a
    real forward and backward, on every architecture measured rather than modelled."""
    p = select_configuration(plans["brain"], name)
    patch = [3 * s for s in p.network.total_stride]
    with torch.device("meta"):
        net = build_network(p.network if name != "unetr" else dataclasses.replace(p.network, input_size=patch),
                            1, 3).train()
        x = torch.zeros(1, 1, *patch)
    with _FlopCount() as counter:
        torch.stack([o.sum() for o in _all_tensors(net(x))]).sum().backward()
    assert measure_step(p.network, patch, 1, 3).flops == pytest.approx(counter.flops, rel=0.005)
