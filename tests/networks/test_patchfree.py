"""The patch-free network: shapes at both resolutions, the guidance patch equal to the whole region's output
there, the loss it trains with, where the data loader puts the guidance patch, and its measured cost."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoseg.networks import build_network
from autoseg.networks.patchfree import PatchFreeOutput, PatchFreeUNet, guidance_size
from autoseg.networks.resize import linear_matrix
from autoseg.planning.measured import fitted_step, measure_step
from autoseg.plans import NetworkPlan
from autoseg.training.data import Guidance
from autoseg.training.losses import DeepSupervisionLoss, DiceCELoss


def _net(factor: list[int], channels: int = 2, classes: int = 3) -> PatchFreeUNet:
    torch.manual_seed(0)
    return PatchFreeUNet(channels, classes, [8, 16, 32], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                         [1, 1, 1], 1, True, factor, 0.5, 0.5)


def test_shapes_in_training_and_prediction():
    net = _net([1, 2, 2])
    x = torch.randn(2, 2, 16, 32, 48)
    out = net.train()(x)
    assert isinstance(out, PatchFreeOutput)
    assert [tuple(o.shape) for o in out.low_res] == [(2, 3, 16, 16, 24), (2, 3, 8, 8, 12)]
    # the guidance patch: half the low-resolution region per axis, at full resolution
    assert tuple(out.full_res.shape) == (2, 3, 8, 16, 24) and tuple(out.reconstruction.shape) == (2, 2, 8, 16, 24)
    assert out.corner.tolist() == [[4, 8, 12]] * 2  # centred without a guide
    torch.testing.assert_close(out.image, x[:, :, 4:12, 8:24, 12:36])
    with torch.no_grad():
        assert tuple(net.eval()(x).shape) == (2, 3, 16, 32, 48)
    with pytest.raises(ValueError, match=r"not divisible by the factor \[1, 2, 2\]"):
        net(torch.randn(1, 2, 16, 32, 47))


@pytest.mark.parametrize("factor", [[2, 2, 2], [1, 2, 2]])
def test_full_resolution_segmentation_is_the_upsampled_low_resolution_one_plus_the_head(factor):
    """With the segmentation head's last convolution zeroed, the full-resolution logits are exactly the U-Net's
    low-resolution logits up-sampled trilinearly (half-voxel centres, edges clamped), in prediction and inside
    the guidance patch in training; with the head, they differ from it by the head's output."""
    net = _net(factor)
    x = torch.randn(2, 2, 16, 32, 32)
    with torch.no_grad():
        net.seg_out.weight.zero_()
        net.seg_out.bias.zero_()
        low = net.eval().body(net.low_resolution(x))
        mz, my, mx = (linear_matrix(n, f * n) for n, f in zip(low.shape[2:], factor))
        up = torch.einsum("bkzyx,Zz,Yy,Xx->bkZYX", low, mz, my, mx)
        torch.testing.assert_close(net(x), up)
        guide = torch.tensor([[0, 0, 0], [4, 8, 8]])
        out = net.train()(x, guide)
        for i, c in enumerate(out.corner.tolist()):
            e = out.full_res.shape[2:]
            torch.testing.assert_close(out.full_res[i], up[i, :, c[0]:c[0] + e[0], c[1]:c[1] + e[1], c[2]:c[2] + e[2]])
    head_only = _net(factor)
    with torch.no_grad():
        features, logits = head_only.eval().body.decode(head_only.low_resolution(x))
        torch.testing.assert_close(head_only(x), head_only.heads(features)[0] + head_only.upsampled(logits[0]))


def test_low_resolution_input_is_the_block_mean():
    """Down-sampling keeps the geometry: low-resolution voxel i is the mean of full-resolution voxels
    factor*i .. factor*i + factor - 1 (the labels it is scored against are taken at factor*i)."""
    net = _net([1, 2, 2], channels=1)
    x = torch.arange(4 * 4 * 4, dtype=torch.float32).reshape(1, 1, 4, 4, 4)
    low = net.low_resolution(x)
    assert tuple(low.shape) == (1, 1, 4, 2, 2)
    assert float(low[0, 0, 1, 1, 0]) == float(x[0, 0, 1, 2:4, 0:2].mean())


@pytest.mark.parametrize("factor", [[2, 2, 2], [1, 2, 2]])
def test_guidance_patch_equals_the_whole_regions_output_there(factor):
    net = _net(factor).eval()
    x = torch.randn(1, 2, *[e * f for e, f in zip([16, 16, 16], factor)])
    with torch.no_grad():
        features, _ = net.body.decode(net.low_resolution(x))
        seg, rec = net.heads(features)
        corners = [[0, 0, 0], [5, 3, 7], [8, 8, 8], [1, 8, 0]]  # a corner, inside, the far corner, mixed
        s, r = net.patch_heads(features.expand(len(corners), -1, -1, -1, -1), corners, [8, 8, 8])
        for i, lo in enumerate(corners):  # one batch through the heads, each sample's box as the whole region's
            box = tuple(slice(a * f, (a + 8) * f) for a, f in zip(lo, factor))
            torch.testing.assert_close(s[i:i + 1], seg[(slice(None), slice(None), *box)], rtol=0, atol=1e-5)
            torch.testing.assert_close(r[i:i + 1], rec[(slice(None), slice(None), *box)], rtol=0, atol=1e-5)


def test_training_output_follows_the_guide_and_every_parameter_learns():
    net = _net([2, 2, 2]).train()
    x = torch.randn(2, 2, 32, 32, 32)
    guide = torch.tensor([[0, 0, 0], [8, 4, 2]])
    out = net(x, guide)
    assert out.corner.tolist() == [[0, 0, 0], [16, 8, 4]]
    torch.testing.assert_close(out.image[1], x[1, :, 16:32, 8:24, 4:20])
    y = torch.randint(0, 3, (2, 32, 32, 32))
    DeepSupervisionLoss(DiceCELoss([1.0, 1.0], True), [0.6, 0.4])(out, y).backward()
    assert all(p.grad is not None for p in net.parameters())
    # every weight moves (a bias before an instance norm has a zero gradient by construction: not checked)
    silent = [n for n, p in net.named_parameters() if p.dim() > 1 and not bool(p.grad.abs().sum() > 0)]
    assert not silent, silent


def test_channels_last_computes_the_same_values_and_gradients():
    """The channels-last patch-free network (CPU plans) is the same function with the same gradients as the
    contiguous one, in training (guidance patch, reconstruction) and in prediction; its weights, the heads'
    included, are channels-last, its U-Net gets channels-last input, and switching the flag on a contiguous
    network (as the predictor does after converting the weights) makes its forward convert the input."""
    plain = _net([2, 2, 2])
    torch.manual_seed(0)
    last = PatchFreeUNet(2, 3, [8, 16, 32], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [1, 1, 1], 1, True,
                         [2, 2, 2], 0.5, 0.5, channels_last=True)
    last.load_state_dict(plain.state_dict())
    convs = [m.weight for m in last.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert last.channels_last and last.body.channels_last and not plain.channels_last
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)
    assert any(w is last.seg_convs[0][0].weight for w in convs)  # the full-resolution heads too
    x, guide = torch.randn(2, 2, 32, 32, 32), torch.tensor([[0, 0, 0], [8, 4, 2]])
    y = torch.randint(0, 3, (2, 32, 32, 32))
    loss = DeepSupervisionLoss(DiceCELoss([1.0, 1.0], True), [0.6, 0.4])
    out_plain, out_last = plain.train()(x, guide), last.train()(x, guide)
    assert out_last.full_res.is_contiguous(memory_format=torch.channels_last_3d)
    for a, b in [(out_plain.full_res, out_last.full_res), (out_plain.reconstruction, out_last.reconstruction),
                 *zip(out_plain.low_res, out_last.low_res)]:
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    loss(out_plain, y).backward()
    loss(out_last, y).backward()
    for (name, p), q in zip(plain.named_parameters(), last.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)
    seen: list[bool] = []  # whether the U-Net's first convolution got channels-last input
    for net in (last, plain):
        net.body.stem.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    with torch.no_grad():
        torch.testing.assert_close(last.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)
        plain.channels_last = True  # the flag alone: the forward converts the input
        assert plain.body.channels_last
        plain(x)
    assert seen[-3:] == [True, False, True]


def test_loss_is_low_resolution_plus_guidance_patch_plus_weighted_reconstruction():
    net = _net([2, 2, 2]).train()
    x = torch.randn(2, 2, 32, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32, 32))
    guide = torch.tensor([[1, 2, 3], [8, 0, 5]])
    with torch.no_grad():
        out = net(x, guide)
        dice_ce = DiceCELoss([1.0, 1.0], True)
        loss = DeepSupervisionLoss(dice_ce, [0.6, 0.4])(out, y)
        low = 0.6 * dice_ce(out.low_res[0], y[:, ::2, ::2, ::2]) + 0.4 * dice_ce(out.low_res[1], y[:, ::4, ::4, ::4])
        c = [[2, 4, 6], [16, 0, 10]]
        patch = torch.stack([y[i, a:a + 16, b:b + 16, d:d + 16] for i, (a, b, d) in enumerate(c)])
        expected = low + dice_ce(out.full_res, patch) + 0.5 * F.mse_loss(out.reconstruction, out.image)
    torch.testing.assert_close(loss, expected)


def test_guidance_corners_centre_on_foreground_or_spread_uniformly():
    g = Guidance([2, 2, 2], 0.5)
    labels = np.zeros((3, 32, 32, 32), dtype=np.int16)
    labels[:, 28:30, 2:4, 20:22] = 2  # a small object near a corner
    rng = np.random.default_rng(0)
    corners = g.corners(labels, 1.0, rng)
    size = guidance_size([16, 16, 16], 0.5)
    for c in corners:  # the patch (in full-resolution voxels) holds the object
        assert all(lo * 2 <= v < (lo + s) * 2 for lo, s, v in zip(c, size, (28, 2, 20)))
    assert (g.corners(labels, 1.0, np.random.default_rng(5)) == g.corners(labels, 1.0, np.random.default_rng(5))).all()
    uniform = np.concatenate([g.corners(np.zeros_like(labels), 1.0, rng) for _ in range(40)])
    assert uniform.min() == 0 and uniform.max() == 8  # every corner of the 16^3 region's 8^3 patch is possible


def test_built_from_a_plan_and_costed_by_measurement():
    plan = NetworkPlan("patch_free", [8, 16, 32], [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                       [1, 1, 1], 1, True, upsample_factor=[1, 2, 2], guidance_share=0.5, reconstruction_weight=0.5)
    assert plan.total_stride == [2, 8, 8]
    assert isinstance(build_network(plan, 1, 2), PatchFreeUNet)
    patch = [16, 64, 96]  # planned-sized: 8x the smallest patches the fit measures
    fit, real = fitted_step(plan, patch, 1, 2), measure_step(plan, patch, 1, 2)
    assert abs(fit.saved_bytes / real.saved_bytes - 1) < 0.3 and abs(fit.flops / real.flops - 1) < 0.3
    with pytest.raises(ValueError, match="guidance_share"):
        build_network(replace(plan, guidance_share=0.0), 1, 2)
    assert build_network(replace(plan, channels_last=True), 1, 2).channels_last
