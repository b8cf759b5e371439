"""Checkpoints: tensors and plain values only, written atomically, loaded with ``weights_only=True``.

Nothing in a checkpoint executes code on load (nnU-Net's pickled checkpoints broke with PyTorch 2.6's
``weights_only`` default). The plan and the run configuration sit beside them as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from autoseg.atomic import atomic_path

__all__ = ["TrainState", "save_checkpoint", "load_checkpoint", "CHECKPOINTS"]

#: checkpoint names: ``latest`` (periodic and on interruption), ``best`` (EMA pseudo-Dice), ``final``
CHECKPOINTS = ("latest", "best", "final")


@dataclass
class TrainState:
    """Where training stands: stage index, optimiser steps done in it, and the epoch log so far.

    ``epoch_loss_sum``/``epoch_loss_count`` carry a partly done epoch across an interruption.
    ``history`` has one list per logged quantity, one entry per finished epoch (both stages).
    """

    stage: int = 0
    step: int = 0
    ema: float = -1.0
    best_ema: float = -1.0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    epoch_data_wait: float = 0.0
    epoch_seconds: float = 0.0
    history: dict[str, list[float]] = field(default_factory=dict)

    def log(self, **values: float) -> None:
        for k, v in values.items():
            self.history.setdefault(k, []).append(float(v))


def save_checkpoint(path: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: Any, state: TrainState) -> None:
    """Write weights, optimiser and grad-scaler state, the :class:`TrainState` and torch's RNG state."""
    payload = {
        "network": network.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "state": asdict(state),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint's contents; ``state`` as a :class:`TrainState`.

    Raises:
        ValueError: unreadable or not an autoseg checkpoint (names the file).
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
        payload["state"] = TrainState(**payload["state"])
    except Exception as e:  # torch raises many types for corrupt files
        raise ValueError(f"{path}: not a readable autoseg checkpoint ({type(e).__name__}: {e}); delete it or "
                         "train with --restart") from None
    return payload
