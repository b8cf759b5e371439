"""The residual U-Net: shapes, deep supervision, and its cost model against measurement."""

from __future__ import annotations

import pytest
import torch

from autoseg.networks import build_network
from autoseg.networks.resunet import ResidualUNet, costs
from autoseg.planning import make_plan
from autoseg.planning.memory import step_cost

from ..autograd_bytes import saved_bytes
from ..planning.fingerprints import BRAIN, CT, PROSTATE, device


def saved_activation_bytes(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct tensor storages kept for backward during one forward pass, parameters excluded."""
    return saved_bytes(lambda: net(x), net.parameters())


PLANS = {
    "brain-cpu": (BRAIN, device("cpu", 16), 1),
    "prostate-cpu": (PROSTATE, device("cpu", 16), 1),
    "ct-cpu": (CT, device("cpu", 16), 1),
    "brain-gpu24": (BRAIN, device("cuda", 24), 0),
    "prostate-cpu-plain": (PROSTATE, device("cpu", 16), 1),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_memory_estimate_matches_measurement(name):
    """The planner's activation estimate is within 30 % of the bytes PyTorch keeps for backward."""
    fp, dev, stage = PLANS[name]
    plan = make_plan(fp, dev)
    if name.endswith("plain"):
        plan.network.architecture = "plain_unet"
    st = plan.stages[stage]
    torch.manual_seed(0)
    net = build_network(plan.network, len(plan.channel_names), len(plan.labels)).train()
    batch = 1 if dev.kind == "cuda" else st.batch_size  # keep the big GPU net cheap on this CPU
    x = torch.randn(batch, len(plan.channel_names), *st.patch_size)
    measured = saved_activation_bytes(net, x)
    estimate = step_cost(plan.network, st.patch_size, batch, len(plan.channel_names), len(plan.labels),
                         amp=False).activation_bytes  # measured in float32 on the CPU
    assert estimate == pytest.approx(measured, rel=0.30)


@pytest.mark.parametrize("architecture", ["residual_unet", "plain_unet"])
def test_parameter_count_matches(architecture):
    plan = make_plan(PROSTATE, device("cpu", 16))
    plan.network.architecture = architecture
    net = build_network(plan.network, 2, 3)
    c = costs(2, 3, plan.network.features, plan.network.kernel_sizes, plan.network.strides,
              plan.network.blocks_per_stage, plan.stages[1].patch_size, residual=architecture == "residual_unet")
    assert c.parameters == sum(p.numel() for p in net.parameters())


def test_deep_supervision_outputs_at_native_resolutions():
    net = ResidualUNet(1, 3, [8, 16, 32], [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                       [1, 1, 1])
    x = torch.randn(2, 1, 8, 32, 32)
    outs = net.train()(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 8, 32, 32), (2, 3, 8, 16, 16)]
    assert tuple(net.eval()(x).shape) == (2, 3, 8, 32, 32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="one entry per stage"):
        ResidualUNet(1, 2, [8, 16], [[3, 3, 3]], [[1, 1, 1], [2, 2, 2]], [1, 1])
    with pytest.raises(ValueError, match="first stage cannot downsample"):
        ResidualUNet(1, 2, [8, 16], [[3, 3, 3]] * 2, [[2, 2, 2], [2, 2, 2]], [1, 1])


@pytest.mark.parametrize("residual", [True, False])
def test_channels_last_computes_the_same_values_and_gradients(residual):
    """The channels-last network (the CPU plans' layout) is the same function with the same gradients as the
    contiguous one; only the memory layout of its weights and activations differs."""
    args = (2, 3, [8, 16, 32], [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [1, 1, 1])
    torch.manual_seed(0)
    plain = ResidualUNet(*args, residual=residual)
    last = ResidualUNet(*args, residual=residual, channels_last=True)
    last.load_state_dict(plain.state_dict())
    convs = [m.weight for m in last.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)
    x = torch.randn(2, 2, 8, 32, 32)
    outs_plain, outs_last = plain.train()(x), last.train()(x)
    for a, b in zip(outs_plain, outs_last):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert outs_last[0].is_contiguous(memory_format=torch.channels_last_3d)
    sum(o.square().mean() for o in outs_plain).backward()
    sum(o.square().mean() for o in outs_last).backward()
    for (name, p), q in zip(plain.named_parameters(), last.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)
    torch.testing.assert_close(last.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)


def test_cpu_plans_are_channels_last_and_gpu_plans_contiguous():
    from autoseg.plans import NetworkPlan

    assert make_plan(BRAIN, device("cpu", 16)).network.channels_last is True
    assert make_plan(BRAIN, device("cuda", 24)).network.channels_last is False
    assert NetworkPlan("residual_unet", [8], [[3, 3, 3]], [[1, 1, 1]], [1], 1, True).channels_last is False
    net = build_network(make_plan(PROSTATE, device("cpu", 16)).network, 1, 3)
    assert net.channels_last is True
