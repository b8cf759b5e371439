"""Losses against values computed by hand, the previous implementation, and ``F.cross_entropy``.

Logits are chosen so that softmax probabilities are simple fractions: with two classes, logits ``(0, ln(p/(1-p)))``
give class 1 the probability ``p``; with three, one logit ``ln 2`` and two zeros give ``(1/2, 1/4, 1/4)``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoseg import defaults
from autoseg.training.losses import DeepSupervisionLoss, DiceCELoss, dice_counts, downsample_target, soft_dice

from ..autograd_bytes import saved_bytes

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
S = defaults.DICE_SMOOTH


def volume(per_voxel: list[list[float]], batch: int = 1) -> torch.Tensor:
    """Logits ``(batch, K, 1, 1, n)`` from ``n`` rows of ``K`` logits per sample (``per_voxel`` is all samples'
    rows, sample after sample)."""
    t = torch.tensor(per_voxel, dtype=torch.float32)  # (batch * n, K)
    return t.reshape(batch, -1, t.shape[1]).permute(0, 2, 1)[:, :, None, None, :].contiguous()


def labels(values: list[int], batch: int = 1) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int16).reshape(batch, 1, 1, -1)


# --- the previous implementation, kept as the reference for values and gradients ---------------------------------
def old_soft_dice(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool, smooth: float = S) -> torch.Tensor:
    probs = torch.softmax(logits.float(), 1)[:, 1:]
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
    dims = tuple(range(2, probs.ndim))
    if batch_dice:
        dims = (0, *dims)
    intersect = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return (2 * intersect + smooth) / torch.clamp(denominator + smooth, min=1e-8)


def old_dice_ce(logits: torch.Tensor, target: torch.Tensor, weights: list[float], batch_dice: bool) -> torch.Tensor:
    ce = F.cross_entropy(logits.float(), target.long())
    dice = old_soft_dice(logits, target, batch_dice)
    w = torch.tensor(weights)
    return ce + (1 - ((dice * w).sum(-1) / w.sum()).mean())


# --- soft Dice ---------------------------------------------------------------------------------------------------
def test_soft_dice_two_classes_by_hand():
    # class-1 probabilities 0.8, 0.5, 0.2, 0.25 (logits ln 4, 0, -ln 4 and, against class 0, ln 3); labels 1 1 0 0
    logits = volume([[0, LN4], [0, 0], [0, -LN4], [LN3, 0]])
    target = labels([1, 1, 0, 0])
    # tp = 0.8 + 0.5 = 1.3; |pred| = 0.8 + 0.5 + 0.2 + 0.25 = 1.75; |gt| = 2
    d = soft_dice(logits, target, batch_dice=True, smooth=0.0)
    assert d.shape == (1,)
    assert float(d) == pytest.approx(2 * 1.3 / (1.75 + 2), rel=1e-6)  # 0.69333
    d = soft_dice(logits, target, batch_dice=True)  # default smoothing 1e-5 on both sides
    assert float(d) == pytest.approx((2.6 + S) / (3.75 + S), rel=1e-6)


def test_batch_dice_pools_samples_per_sample_does_not():
    # sample 0: p1 = 0.8, 0.2 with labels 1, 0; sample 1: p1 = 0.5, 0.5 with labels 0, 0 (class 1 absent)
    logits = volume([[0, LN4], [0, -LN4], [0, 0], [0, 0]], batch=2)
    target = labels([1, 0, 0, 0], batch=2)
    per_sample = soft_dice(logits, target, batch_dice=False, smooth=0.0)
    assert per_sample.shape == (2, 1)
    assert float(per_sample[0, 0]) == pytest.approx(2 * 0.8 / (1.0 + 1), rel=1e-6)  # tp .8, |pred| 1, |gt| 1
    assert float(per_sample[1, 0]) == 0.0  # no tp: 0 / (|pred| 1.0 + |gt| 0)
    pooled = soft_dice(logits, target, batch_dice=True, smooth=0.0)
    assert pooled.shape == (1,)
    assert float(pooled) == pytest.approx(2 * 0.8 / (2.0 + 1), rel=1e-6)  # tp .8, |pred| 2.0, |gt| 1
    # with smoothing, the empty sample scores s / (1 + s), not 0/0
    assert float(soft_dice(logits, target, batch_dice=False)[1, 0]) == pytest.approx(S / (1 + S), rel=1e-6)


# three classes, class 2 absent: probabilities (1/2, 1/4, 1/4), (1/4, 1/2, 1/4) twice, (1/3, 1/3, 1/3); labels 0 1 1 0
EMPTY_LOGITS = [[LN2, 0, 0], [0, LN2, 0], [0, LN2, 0], [0, 0, 0]]
EMPTY_LABELS = [0, 1, 1, 0]
DICE_1 = 2 * (1 / 2 + 1 / 2) / ((1 / 4 + 1 / 2 + 1 / 2 + 1 / 3) + 2)  # 2 / (19/12 + 2) = 24/43
DICE_2 = S / ((1 / 4 + 1 / 4 + 1 / 4 + 1 / 3) + S)  # tp 0, |gt| 0, |pred| 13/12
CE = -(math.log(1 / 2) * 3 + math.log(1 / 3)) / 4  # true-class probabilities 1/2, 1/2, 1/2, 1/3


def test_empty_class_by_hand():
    d = soft_dice(volume(EMPTY_LOGITS), labels(EMPTY_LABELS), batch_dice=True)
    assert DICE_1 == pytest.approx(24 / 43, rel=1e-5)
    assert d.tolist() == [pytest.approx(DICE_1, rel=1e-5), pytest.approx(DICE_2, rel=1e-5)]
    # the empty class's gradient lowers its logit wherever it is predicted (Dice can only rise by predicting less)
    x = volume(EMPTY_LOGITS).requires_grad_()
    (grad,) = torch.autograd.grad(-soft_dice(x, labels(EMPTY_LABELS), batch_dice=True)[1], x)
    assert bool((grad[0, 2] > 0).all())


def test_dice_ce_by_hand_with_class_weights():
    logits, target = volume(EMPTY_LOGITS), labels(EMPTY_LABELS)
    assert float(DiceCELoss([1.0, 1.0], True)(logits, target)) == pytest.approx(CE + 1 - (DICE_1 + DICE_2) / 2,
                                                                                 rel=1e-6)
    assert float(DiceCELoss([1.0, 3.0], True)(logits, target)) == pytest.approx(CE + 1 - (DICE_1 + 3 * DICE_2) / 4,
                                                                                 rel=1e-6)
    assert float(DiceCELoss([], True)(logits, target)) == pytest.approx(CE, rel=1e-6)  # no weights: CE alone


def test_per_sample_dice_loss_averages_samples():
    # sample 0 is the 4-voxel volume above; sample 1 the same with labels all 0 (classes 1 and 2 absent)
    logits = volume(EMPTY_LOGITS * 2, batch=2)
    target = labels(EMPTY_LABELS + [0, 0, 0, 0], batch=2)
    dice_1b = S / (19 / 12 + S)  # sample 1, class 1: no tp, no gt, |pred| 19/12
    ce = (CE * 4 - (math.log(1 / 4) * 2 + math.log(1 / 2) + math.log(1 / 3))) / 8  # sample 1 true class is 0
    expected = ce + 1 - ((DICE_1 + DICE_2) / 2 + (dice_1b + DICE_2) / 2) / 2
    assert float(DiceCELoss([1.0, 1.0], batch_dice=False)(logits, target)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_matches_torch(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 4, 5, 6, 7)).to(dtype)
    target = torch.randint(0, 4, (2, 5, 6, 7), dtype=torch.int16)
    ce = DiceCELoss([], batch_dice=True)(logits, target)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, F.cross_entropy(logits.float(), target.long()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_classes", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_values_and_gradients_equal_the_previous_implementation(n_classes, dtype, batch_dice):
    """The memory-saving rewrite changes no value: loss and gradient within 1e-6 (one float16 ulp at most)."""
    torch.manual_seed(n_classes)
    logits = (3 * torch.randn(2, n_classes, 6, 8, 10)).to(dtype)
    target = torch.randint(0, n_classes, (2, 6, 8, 10), dtype=torch.int16)
    target[1][target[1] == n_classes - 1] = 0  # the last class absent from sample 1
    weights = [float(c) for c in range(1, n_classes)]
    x_new, x_old = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    new = DiceCELoss(weights, batch_dice)(x_new, target)
    old = old_dice_ce(x_old, target, weights, batch_dice)
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
    (g_new,), (g_old,) = torch.autograd.grad(new, x_new), torch.autograd.grad(old, x_old)
    assert g_new.dtype == dtype
    torch.testing.assert_close(g_new.float(), g_old.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(soft_dice(logits, target, batch_dice), old_soft_dice(logits, target, batch_dice),
                               rtol=0, atol=0)  # same sums in the same order: bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loss_keeps_less_for_backward(dtype):
    """Old: log-softmax and softmax (4 + 4 bytes per voxel and class), a float one-hot of the foreground (4 per
    voxel and foreground class) and an int64 copy of the labels (8 per voxel). New: log-softmax, softmax and a
    boolean one-hot, 9 bytes per voxel and class."""
    k, b, v = 3, 2, 16 * 16 * 16
    logits = torch.randn(b, k, 16, 16, 16).to(dtype).requires_grad_()
    target = torch.randint(0, k, (b, 16, 16, 16), dtype=torch.int16)
    old = saved_bytes(lambda: old_dice_ce(logits, target, [1.0, 1.0], True), [logits, target])
    new = saved_bytes(lambda: DiceCELoss([1.0, 1.0], True)(logits, target), [logits, target])
    assert old == pytest.approx(b * v * (4 * k + 4 * k + 4 * (k - 1) + 8), abs=1024)  # 40 bytes per voxel
    assert new == pytest.approx(b * v * 9 * k, abs=1024)  # 27 bytes per voxel


def test_labels_out_of_range_are_an_error():
    logits = volume([[0, 0], [0, 0]])
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        DiceCELoss([1.0], True)(logits, labels([0, 2]))
    with pytest.raises(ValueError, match="got -1..0"):
        soft_dice(logits, labels([-1, 0]), True)


# --- deep supervision --------------------------------------------------------------------------------------------
class Probe(nn.Module):
    """A loss whose value is the sum of the logits, recording the targets it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[torch.Tensor] = []

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.targets.append(target)
        return logits.float().sum()


def test_deep_supervision_weights_and_targets_by_hand():
    target = torch.arange(2 * 4 * 8 * 8, dtype=torch.int16).reshape(2, 4, 8, 8) % 3
    full = torch.ones(2, 3, 4, 8, 8)  # sum 1536
    half = torch.full((2, 3, 4, 4, 4), 2.0)  # anisotropic stride (1, 2, 2): sum 2 * 384 = 768
    quarter = torch.full((2, 3, 2, 2, 2), 5.0)  # weight 0: not scored
    probe = Probe()
    total = DeepSupervisionLoss(probe, [0.5, 0.25, 0.0])([full, half, quarter], target)
    assert float(total) == 0.5 * 1536 + 0.25 * 768
    assert len(probe.targets) == 2
    assert torch.equal(probe.targets[0], target)
    assert torch.equal(probe.targets[1], target[:, :, ::2, ::2])
    # a single tensor (inference-style output) is scored as is
    assert float(DeepSupervisionLoss(probe, [0.5, 0.5])(full, target)) == 1536


def test_zero_weight_output_gets_a_zero_gradient_and_cannot_spoil_the_loss():
    """DistributedDataParallel needs every parameter in the graph; the coarsest head has weight 0."""
    torch.manual_seed(0)
    head = nn.Conv3d(4, 2, 1)
    features = torch.randn(1, 4, 2, 2, 2)
    full = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    target = torch.randint(0, 2, (1, 4, 4, 4), dtype=torch.int16)
    base = DiceCELoss([1.0], True)
    loss = DeepSupervisionLoss(base, [1.0, 0.0])([full, head(features)], target)
    assert float(loss.detach()) == float(base(full, target).detach())
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None  # in the graph
    assert float(head.weight.grad.abs().sum()) == 0.0 and float(head.bias.grad.abs().sum()) == 0.0
    # a non-finite value in an unscored output does not make the loss NaN (0 * inf would)
    coarse = torch.full((1, 2, 2, 2, 2), math.inf)
    assert math.isfinite(float(DeepSupervisionLoss(base, [1.0, 0.0])([full, coarse], target).detach()))


@pytest.mark.parametrize("shape,size", [((6, 8, 10), (3, 4, 5)), ((6, 8, 10), (6, 2, 5)), ((4, 8, 8), (1, 1, 1)),
                                        ((6, 8, 10), (4, 3, 7))])
def test_downsample_target_is_nearest_neighbour(shape, size):
    target = torch.randint(0, 5, (2, *shape), dtype=torch.int16)
    expected = F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].to(torch.int16)
    out = downsample_target(target, torch.Size(size))
    assert out.dtype == torch.int16 and torch.equal(out, expected)
    if all(a % b == 0 for a, b in zip(shape, size)):  # integer ratios: a view, no copy of the label map
        assert out.untyped_storage().data_ptr() == target.untyped_storage().data_ptr()
    assert downsample_target(target, torch.Size(shape)) is target


# --- pseudo-Dice counts --------------------------------------------------------------------------------------------
def test_dice_counts_by_hand():
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    logits = F.one_hot(pred, 3).T.reshape(1, 3, 1, 1, 6).float()  # arg-max is pred
    target = torch.tensor([0, 1, 2, 2, 0, 1]).reshape(1, 1, 1, 6)
    # class 1: tp voxel 1, fp voxel 2, fn voxel 5; class 2: tp voxel 3, fp voxel 4, fn voxel 2
    assert dice_counts(logits, target).tolist() == [[1, 1], [1, 1], [1, 1]]
    # summed over the batch: a second sample predicting everything as class 1 adds 2 tp, 4 fp for class 1, 2 fn
    # for class 2
    logits2 = torch.cat([logits, F.one_hot(torch.ones(6, dtype=torch.long), 3).T.reshape(1, 3, 1, 1, 6).float()])
    target2 = torch.cat([target, target])
    assert dice_counts(logits2, target2).tolist() == [[1 + 2, 1 + 0], [1 + 4, 1 + 0], [1 + 0, 1 + 2]]
