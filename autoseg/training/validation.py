"""The per-epoch pseudo-Dice: validation loss and per-class Dice of the arg-max over the same fixed
validation patches every epoch, pooled over the ranks (nnU-Net's "pseudo Dice")."""

from __future__ import annotations

import math

import torch
from torch import nn

from autoseg.training.data import BatchDataset, BatchError
from autoseg.training.losses import dice_counts
from autoseg.training.runtime import Runtime

__all__ = ["pseudo_dice", "nanmean"]


@torch.no_grad()
def pseudo_dice(net: nn.Module, val_ds: BatchDataset, loss_fn: nn.Module, rt: Runtime, amp: bool,
                batches: int, n_foreground: int) -> tuple[float, list[float]]:
    """Mean validation loss and the Dice ``2tp / (2tp + fp + fn)`` of each foreground class (NaN for a class
    absent from every patch and never predicted), over ``batches`` batches of every rank.

    Raises:
        BatchError: a validation batch could not be built (names the case); in a single process.
        RankFailed: the same, on several ranks: every rank raises it, naming the rank that failed.
    """
    net.eval()
    counts = torch.zeros(3, n_foreground, dtype=torch.int64, device=rt.device)
    total = torch.zeros(1, dtype=torch.float64, device=rt.device)
    error = None
    for i in range(batches):
        batch = val_ds[i]
        if "error" in batch:
            error = f"validation batch: {batch['error']}"
            if not rt.distributed:
                raise BatchError(error)
            break
        x = batch["data"].to(rt.device)
        y = batch["seg"].to(rt.device).long()
        with torch.autocast(rt.device.type, enabled=amp):
            out = net(x)
        total += loss_fn(out, y).double()
        counts += dice_counts(out.float(), y).to(rt.device)
    net.train()
    if rt.reduce([float(error is not None)], "max")[0] > 0:  # every rank learns of a failed batch on any rank
        rt.raise_failure(error)
    counts = rt.reduce_tensor(counts).cpu()
    mean_loss = float(rt.reduce_tensor(total).cpu()) / (batches * rt.world_size)
    tp, fp, fn = counts.double()
    denom = 2 * tp + fp + fn
    dice = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.full_like(denom, math.nan))
    return mean_loss, [float(d) for d in dice]


def nanmean(values: list[float]) -> float:
    """Mean of the values that are not NaN (0 when there are none)."""
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else 0.0
