"""MONAI's networks through our factory: built from a plan, one real training step and one sliding-window
prediction each; SegResNet's strides as MONAI makes them; UNETR on patches of any multiple of 16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoseg.inference.sliding_window import predict_logits
from autoseg.networks import build_network
from autoseg.networks.monai_nets import segresnet_resolution, segresnet_strides
from autoseg.planning import make_plan
from autoseg.plans import select_configuration
from autoseg.training.losses import planned_loss

from ..planning.fingerprints import BRAIN, PROSTATE, device

MONAI = ["segresnet", "attention_unet", "unetr"]


@pytest.fixture(scope="module")
def brain_plan():
    return make_plan(BRAIN, device("cpu", 16), configurations=["3d", *MONAI])


@pytest.mark.parametrize("spacing", [[1.0, 1.0, 1.0], [3.6, 0.6, 0.6], [5.0, 0.8, 0.8], [2.0, 1.0, 0.5],
                                     [7.7, 1.25, 1.25]])
@pytest.mark.parametrize("n_stages", [3, 4, 5])
def test_segresnet_strides_are_monais(spacing, n_stages):
    from monai.networks.nets.segresnet_ds import scales_for_resolution

    ours = segresnet_strides(spacing, n_stages)
    theirs = [list(map(int, s)) for s in scales_for_resolution(spacing, n_stages)][:n_stages - 1]
    assert ours == [[1, 1, 1]] + theirs
    # and back: the spacing we hand MONAI for a plan's strides gives the same strides
    assert segresnet_strides(list(segresnet_resolution(ours)), n_stages) == ours


@pytest.mark.parametrize("name", MONAI)
def test_each_architecture_trains_a_step_and_predicts_a_volume(brain_plan, name):
    p = select_configuration(brain_plan, name)
    assert p.network.architecture == name
    k, c = len(p.labels), len(p.channel_names)
    torch.manual_seed(0)
    net = build_network(p.network, c, k).train()
    st = p.stages[0]
    x = torch.randn(st.batch_size, c, *st.patch_size)
    y = torch.randint(0, k, (st.batch_size, *st.patch_size))
    out = net(x)
    if p.network.deep_supervision:  # full resolution first, one output per decoder resolution
        assert isinstance(out, list) and len(out) == len(p.training.deep_supervision_weights) > 1
        assert out[0].shape == (st.batch_size, k, *st.patch_size)
        assert list(out[1].shape[2:]) == [e // s for e, s in zip(st.patch_size, p.network.strides[1])]
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (st.batch_size, k, *st.patch_size)
        assert p.training.deep_supervision_weights == [1.0]
    loss = planned_loss(p.training)(out, y)
    assert torch.isfinite(loss)
    before = [t.detach().clone() for t in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    loss.backward()
    unused = [n for n, t in net.named_parameters() if t.grad is None]
    assert not unused, unused  # DistributedDataParallel refuses parameters without a gradient
    opt.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert changed > len(before) // 2
    # sliding window over a volume that is neither a patch multiple nor as large as the zoom-out patch in z
    net.eval()
    zoom_out = p.stages[-1].patch_size
    image = torch.randn(c, zoom_out[0] + 5, zoom_out[1] // 2 + 3, zoom_out[2] + 7)
    logits = predict_logits(net, image, zoom_out, 0.5, [0], 0.125, torch.device("cpu"))
    assert logits.shape == (k, *image.shape[1:]) and torch.isfinite(logits).all()


def test_unetr_zoom_in_patch_uses_the_zoom_out_embedding(brain_plan):
    """One set of weights for both stages: the position embedding is sized for the zoom-out patch and resampled
    for other token grids; at the zoom-out patch it is used as is."""
    p = select_configuration(brain_plan, "unetr")
    assert p.network.input_size == p.stages[-1].patch_size
    net = build_network(p.network, 1, len(p.labels)).eval()
    grid = [e // 16 for e in p.network.input_size]
    assert net.vit.patch_embedding.position_embeddings.shape == (1, int(np.prod(grid)), p.network.hidden_size)
    with torch.no_grad():
        for patch in ([16, 16, 16], [32, 16, 48], p.network.input_size):
            assert net(torch.randn(1, 1, *patch)).shape == (1, len(p.labels), *patch)
    # a different-size embedding is an interpolation of the stored one, not a new parameter
    assert len(list(net.parameters())) == len(list(build_network(p.network, 1, len(p.labels)).parameters()))


def test_attention_unet_takes_per_axis_strides():
    p = select_configuration(make_plan(PROSTATE, device("cpu", 16), configurations=["3d", "attention_unet"]),
                             "attention_unet")
    assert any(s[0] == 1 and s[1] == 2 for s in p.network.strides[1:])  # thick slices: in-plane pooling first
    net = build_network(p.network, len(p.channel_names), len(p.labels)).eval()
    patch = p.stages[-1].patch_size
    with torch.no_grad():
        assert net(torch.randn(1, len(p.channel_names), *patch)).shape == (1, len(p.labels), *patch)


def test_a_plan_whose_strides_monai_would_not_build_is_refused(brain_plan):
    p = select_configuration(brain_plan, "segresnet")
    bad = p.network.strides[:1] + [[1, 2, 2], [2, 2, 2], [2, 1, 2]]
    p.network.strides = bad
    with pytest.raises(ValueError, match="not what MONAI builds"):
        build_network(p.network, 1, 3)
