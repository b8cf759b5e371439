"""Losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from autoseg.training.losses import DeepSupervisionLoss, DiceCELoss, dice_counts, downsample_target, soft_dice


def _logits_for(probs: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax over dim 1 is ``probs``."""
    return probs.log()


def test_soft_dice_by_hand():
    # one sample, 2 classes, 4 voxels; class-1 probabilities 0.9, 0.2, 0.6, 0.1; ground truth 1, 0, 1, 0
    p1 = torch.tensor([0.9, 0.2, 0.6, 0.1])
    probs = torch.stack([1 - p1, p1])[None, :, :, None, None]  # (1, 2, 4, 1, 1)
    target = torch.tensor([1, 0, 1, 0])[None, :, None, None]
    # tp = 0.9 + 0.6 = 1.5; |pred| = 1.8; |gt| = 2 -> (3 + s) / (3.8 + s)
    d = soft_dice(_logits_for(probs), target, batch_dice=True, smooth=0.0)
    assert d.shape == (1,)
    assert float(d) == pytest.approx(3.0 / 3.8, rel=1e-6)


def test_batch_dice_pools_samples_and_per_sample_does_not():
    p = torch.tensor([[0.9, 0.1], [0.5, 0.5]])  # class-1 probability, two samples of 2 voxels
    probs = torch.stack([1 - p, p], 1)[..., None, None]  # (2, 2, 2, 1, 1)
    target = torch.tensor([[1, 0], [0, 0]])[..., None, None]
    per_sample = soft_dice(_logits_for(probs), target, batch_dice=False, smooth=0.0)
    assert per_sample.shape == (2, 1)
    assert float(per_sample[0, 0]) == pytest.approx(1.8 / 2.0)  # 2*0.9 / (1.0 + 1)
    assert float(per_sample[1, 0]) == pytest.approx(0.0)  # no tp, no gt: 0 / 1.0
    pooled = soft_dice(_logits_for(probs), target, batch_dice=True, smooth=0.0)
    assert float(pooled) == pytest.approx(1.8 / (2.0 + 1.0))  # tp 0.9, |pred| 2.0, |gt| 1


def test_dice_ce_is_ce_plus_one_minus_weighted_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6)
    target = torch.randint(0, 3, (2, 4, 5, 6))
    dice = soft_dice(logits, target, batch_dice=True)
    ce = F.cross_entropy(logits, target)
    equal = DiceCELoss([1.0, 1.0], batch_dice=True)(logits, target)
    assert float(equal) == pytest.approx(float(ce + 1 - dice.mean()), rel=1e-6)
    weighted = DiceCELoss([1.0, 3.0], batch_dice=True)(logits, target)
    assert float(weighted) == pytest.approx(float(ce + 1 - (dice[0] + 3 * dice[1]) / 4), rel=1e-6)


def test_deep_supervision_weights_and_downsampled_targets():
    torch.manual_seed(1)
    target = torch.randint(0, 2, (1, 8, 8, 8))
    full, half, quarter = torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 2, 2, 2)
    base = DiceCELoss([1.0], batch_dice=True)
    loss = DeepSupervisionLoss(base, [2 / 3, 1 / 3, 0.0])([full, half, quarter], target)
    expected = 2 / 3 * base(full, target) + 1 / 3 * base(half, target[:, ::2, ::2, ::2])
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    # nearest-neighbour downsampling of a label map by 2 takes every second voxel
    assert torch.equal(downsample_target(target, torch.Size([4, 4, 4])), target[:, ::2, ::2, ::2])


def test_zero_weight_output_still_gets_a_gradient():
    """DistributedDataParallel needs every parameter in the graph; the coarsest head has weight 0."""
    coarse = torch.randn(1, 2, 2, 2, 2, requires_grad=True)
    loss = DeepSupervisionLoss(DiceCELoss([1.0], True), [1.0, 0.0])([torch.randn(1, 2, 4, 4, 4), coarse],
                                                                    torch.zeros(1, 4, 4, 4, dtype=torch.long))
    loss.backward()
    assert coarse.grad is not None and float(coarse.grad.abs().sum()) == 0.0


def test_dice_counts():
    logits = torch.zeros(1, 3, 1, 1, 6)
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    logits[0, pred, 0, 0, torch.arange(6)] = 1.0
    target = torch.tensor([0, 1, 2, 2, 0, 1])[None, None, None]
    c = dice_counts(logits, target)
    # class 1: tp 1 (voxel 1), fp 1 (voxel 2), fn 1 (voxel 5); class 2: tp 1 (voxel 3), fp 1 (4), fn 1 (2)
    assert c.tolist() == [[1, 1], [1, 1], [1, 1]]
    assert math.isclose(2 * 1 / (2 * 1 + 1 + 1), 0.5)
