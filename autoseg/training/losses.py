"""Soft Dice + cross-entropy with deep supervision, and the pseudo-Dice counts of validation batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoseg import defaults

__all__ = ["soft_dice", "DiceCELoss", "DeepSupervisionLoss", "downsample_target", "dice_counts"]


def soft_dice(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool,
              smooth: float = defaults.DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice per foreground class: ``(2 tp + s) / (|pred| + |gt| + s)`` with softmax probabilities.

    Args:
        logits: ``(B, K, *spatial)``.
        target: ``(B, *spatial)`` integer labels in ``0..K-1``.
        batch_dice: sum over the batch as one volume (shape ``(K-1,)``), else per sample (``(B, K-1)``).
    """
    probs = torch.softmax(logits.float(), 1)[:, 1:]
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
    dims = tuple(range(2, probs.ndim))
    if batch_dice:
        dims = (0, *dims)
    intersect = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return (2 * intersect + smooth) / torch.clamp(denominator + smooth, min=1e-8)


class DiceCELoss(nn.Module):
    """``CE + (1 - weighted mean Dice over foreground classes)``, weighted 1:1 as in nnU-Net.

    Args:
        class_weights: one weight per foreground class (seed 001's weighted Dice); equal weights give the
            plain mean.
    """

    weights: torch.Tensor

    def __init__(self, class_weights: list[float], batch_dice: bool):
        super().__init__()
        self.register_buffer("weights", torch.tensor(class_weights, dtype=torch.float32), persistent=False)
        self.batch_dice = batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target.long())
        if self.weights.numel() == 0:
            return ce
        dice = soft_dice(logits, target, self.batch_dice)
        w = self.weights.to(dice.device)
        mean_dice = (dice * w).sum(-1) / w.sum()
        return ce + (1 - mean_dice.mean())


def downsample_target(target: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Nearest-neighbour label map ``(B, *spatial)`` at a deep-supervision output's spatial ``shape``."""
    if tuple(target.shape[1:]) == tuple(shape):
        return target
    return F.interpolate(target[:, None].float(), size=tuple(shape), mode="nearest")[:, 0].to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the network's outputs (full resolution first); zero weights are skipped."""

    def __init__(self, loss: nn.Module, weights: list[float]):
        super().__init__()
        self.loss, self.weights = loss, weights

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(self.weights, outputs):
            if w:
                total = total + w * self.loss(out, downsample_target(target, out.shape[2:]))
            else:  # keep the output in the graph with zero gradient: DDP needs every parameter to get one
                total = total + 0.0 * out.float().sum()
        return total


@torch.no_grad()
def dice_counts(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """True positives, false positives and false negatives per foreground class of the arg-max prediction:
    ``(3, K-1)`` int64, summed over the batch (the pseudo-Dice of nnU-Net is ``2tp / (2tp + fp + fn)``)."""
    k = logits.shape[1]
    pred = logits.argmax(1)
    out = torch.zeros(3, k - 1, dtype=torch.int64)
    for c in range(1, k):
        p, t = pred == c, target == c
        out[0, c - 1] = (p & t).sum()
        out[1, c - 1] = (p & ~t).sum()
        out[2, c - 1] = (~p & t).sum()
    return out
