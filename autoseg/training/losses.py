"""Soft Dice + cross-entropy with deep supervision, and the pseudo-Dice counts of validation batches.

Memory: the loss runs on every output voxel of every class, so what it keeps for backward is part of each step's
peak (:mod:`autoseg.planning.memory` models it). Per voxel and class it keeps the float32 log-softmax (4 bytes,
for cross-entropy), the float32 softmax (4 bytes, for Dice) and a boolean one-hot target (1 byte, shared by both),
and makes one float32 copy of 16-bit logits (mixed precision), freed once both are computed; its backward holds
two float32 gradients at a time on top (cross-entropy's are freed before Dice's are made). The one-hot is a
broadcast comparison ``target[:, None] == classes``, never an int64 ``F.one_hot`` (8 bytes per voxel and class)
nor a float copy of it, and the label map is never widened to int64. Values and gradients equal those of the
straightforward ``F.cross_entropy`` + ``F.one_hot`` formulation to float rounding (``tests/training``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoseg import defaults
from autoseg.networks.patchfree import PatchFreeOutput
from autoseg.plans import TrainingPlan

__all__ = ["soft_dice", "DiceCELoss", "DeepSupervisionLoss", "downsample_target", "dice_counts", "one_hot_mask",
           "planned_loss"]


def one_hot_mask(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Boolean one-hot ``(B, K, *spatial)`` of a label map ``(B, *spatial)`` (1 byte per voxel and class).

    Raises:
        ValueError: a label outside ``0..K-1`` (as ``F.one_hot`` and ``F.cross_entropy`` would; checking costs
            one reduction of the label map, and on CUDA one synchronisation, as ``F.one_hot`` did).
    """
    if target.numel():
        low, high = torch.aminmax(target)
        if int(low) < 0 or int(high) >= n_classes:
            raise ValueError(f"labels must lie in 0..{n_classes - 1} for {n_classes} output classes; "
                             f"got {int(low)}..{int(high)}")
    classes = torch.arange(n_classes, device=target.device, dtype=target.dtype)
    return target[:, None] == classes.view(1, n_classes, *([1] * (target.ndim - 1)))


def _label_counts(target: torch.Tensor, n_classes: int, batch_dice: bool) -> torch.Tensor:
    """Voxels per class, ``(K,)`` over the batch or ``(B, K)`` per sample, int64 (exact).

    A histogram of the label map rather than a sum of the one-hot: reductions of a boolean tensor first convert
    it to int64, 8 bytes per voxel and class.
    """
    if batch_dice:
        return torch.bincount(target.reshape(-1), minlength=n_classes)
    return torch.stack([torch.bincount(t.reshape(-1), minlength=n_classes) for t in target])


def _dice(probs: torch.Tensor, onehot: torch.Tensor, target: torch.Tensor, batch_dice: bool,
          smooth: float) -> torch.Tensor:
    """Soft Dice per foreground class from softmax ``probs`` and the boolean ``onehot`` of ``target``, both
    ``(B, K, *spatial)``.

    Returns:
        ``(K-1,)`` with ``batch_dice``, else ``(B, K-1)``.
    """
    fg_probs, fg = probs[:, 1:], onehot[:, 1:]
    dims = tuple(range(2, probs.ndim))
    if batch_dice:
        dims = (0, *dims)
    intersect = torch.where(fg, fg_probs, 0.0).sum(dims)  # keeps only the boolean mask for backward
    gt = _label_counts(target, probs.shape[1], batch_dice)[..., 1:]
    denominator = fg_probs.sum(dims) + gt.to(probs.dtype)
    return (2 * intersect + smooth) / torch.clamp(denominator + smooth, min=1e-8)


def soft_dice(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool,
              smooth: float = defaults.DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice per foreground class: ``(2 tp + s) / (|pred| + |gt| + s)`` with softmax probabilities (float32).

    Args:
        logits: ``(B, K, *spatial)``, any float dtype (computed in float32).
        target: ``(B, *spatial)`` integer labels in ``0..K-1``.
        batch_dice: sum over the batch as one volume (shape ``(K-1,)``), else per sample (``(B, K-1)``).
        smooth: added to numerator and denominator (an empty class predicted empty scores 1).

    Returns:
        Dice per foreground class, ``(K-1,)`` or ``(B, K-1)``.

    Raises:
        ValueError: a label outside ``0..K-1``.
    """
    probs = torch.softmax(logits.float(), 1)
    return _dice(probs, one_hot_mask(target, logits.shape[1]), target, batch_dice, smooth)


class DiceCELoss(nn.Module):
    """``CE + (1 - weighted mean Dice over foreground classes)``, weighted 1:1 as in nnU-Net.

    Cross-entropy is the mean over voxels of ``-log softmax`` at the true class, as ``F.cross_entropy``; it and
    Dice share one float32 copy of the logits and one boolean one-hot.

    Args:
        class_weights: one weight per foreground class (seed 001's weighted Dice); equal weights give the
            plain mean; an empty list gives cross-entropy alone.
        batch_dice: Dice over the batch as one volume, else per sample and then averaged.
    """

    weights: torch.Tensor

    def __init__(self, class_weights: list[float], batch_dice: bool):
        super().__init__()
        self.register_buffer("weights", torch.tensor(class_weights, dtype=torch.float32), persistent=False)
        self.batch_dice = batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``(B, K, *spatial)`` (any float dtype) against labels ``(B, *spatial)``: a float32
        scalar.

        Raises:
            ValueError: a label outside ``0..K-1``.
        """
        onehot = one_hot_mask(target, logits.shape[1])
        x = logits.float()  # a copy only for 16-bit logits
        dice_term = None
        if self.weights.numel():
            dice = _dice(torch.softmax(x, 1), onehot, target, self.batch_dice, defaults.DICE_SMOOTH)
            w = self.weights.to(dice.device)
            dice_term = 1 - ((dice * w).sum(-1) / w.sum()).mean()
        # cross-entropy last: autograd runs the most recently built branch first, so the backward of
        # cross-entropy (a gradient and the log-softmax backward, 8 bytes per voxel and class) is done and freed
        # before that of Dice starts; the other order holds both at once (measured: 20 instead of 17 bytes per
        # voxel and class at the peak)
        log_probs = F.log_softmax(x, 1)
        del x  # the 16-bit case's float32 copy is not needed past this point
        ce = -torch.where(onehot, log_probs, 0.0).sum() / (onehot.numel() // onehot.shape[1])
        return ce if dice_term is None else ce + dice_term


def downsample_target(target: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour label map ``(B, *spatial)`` at a deep-supervision output's spatial ``shape``.

    Integer ratios (every U-Net output) are strided views, ``target[:, ::r0, ::r1, ::r2]``, which is what
    ``F.interpolate(mode="nearest")`` picks (source index ``floor(i * in / out)``) without its float copy of
    the label map; other shapes go through ``F.interpolate``.
    """
    size = tuple(int(s) for s in shape)
    if tuple(target.shape[1:]) == size:
        return target
    if all(i % o == 0 for i, o in zip(target.shape[1:], size)):
        return target[(slice(None), *(slice(None, None, i // o) for i, o in zip(target.shape[1:], size)))]
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the network's outputs (full resolution first).

    An output with weight 0 is not scored, but it stays in the graph with a zero gradient (DistributedDataParallel
    needs every parameter to get one) through an empty slice of it: no float copy, and a non-finite value there
    cannot turn the loss into NaN as ``0 * out.sum()`` would.
    """

    def __init__(self, loss: nn.Module, weights: list[float]):
        super().__init__()
        self.loss, self.weights = loss, weights

    def forward(self, outputs: torch.Tensor | list[torch.Tensor] | PatchFreeOutput,
                target: torch.Tensor) -> torch.Tensor:
        """Float32 scalar loss of one output, a list of outputs or a patch-free network's training output
        (:meth:`patch_free`) against labels ``(B, *spatial)``."""
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        if isinstance(outputs, PatchFreeOutput):
            return self.patch_free(outputs, target)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(self.weights, outputs):
            if w:
                total = total + w * self.loss(out, downsample_target(target, out.shape[2:]))
            else:
                total = total + out[:0].sum(dtype=torch.float32)
        return total

    def patch_free(self, out: PatchFreeOutput, target: torch.Tensor) -> torch.Tensor:
        """The patch-free network's loss (:mod:`autoseg.networks.patchfree`): the deep-supervision loss of its
        low-resolution logits against the label map at their resolution, plus the loss of its full-resolution
        logits against the full-resolution labels inside each sample's guidance patch, plus
        ``reconstruction_weight`` times the mean squared error of its reconstruction of the image there."""
        edge = out.full_res.shape[2:]
        labels = torch.stack([t[c[0]:c[0] + edge[0], c[1]:c[1] + edge[1], c[2]:c[2] + edge[2]]
                              for t, c in zip(target, out.corner.tolist())])
        low = self.forward(out.low_res, target)
        full = self.loss(out.full_res, labels)
        rec = F.mse_loss(out.reconstruction.float(), out.image.float())
        return low + full + out.reconstruction_weight * rec


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


def planned_loss(t: TrainingPlan) -> DeepSupervisionLoss:
    """The loss a plan trains with: Dice + CE with its class and deep-supervision weights."""
    return DeepSupervisionLoss(DiceCELoss(t.dice_class_weights, t.batch_dice), t.deep_supervision_weights)
