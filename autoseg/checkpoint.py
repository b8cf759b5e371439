"""Checkpoints: tensors and plain values only, written atomically, loaded with ``weights_only=True``.

Nothing in a checkpoint executes code on load (nnU-Net's pickled checkpoints broke with PyTorch 2.6's
``weights_only`` default). The plan and the run configuration sit beside them as JSON. A shared artefact:
training writes them, prediction reads them.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from autoseg.atomic import atomic_path
from autoseg.device import first_line, is_out_of_memory

__all__ = ["TrainState", "save_checkpoint", "load_checkpoint", "restore_rng", "CHECKPOINTS", "CheckpointError",
           "CHECKPOINT_FORMAT"]

#: checkpoint names: ``latest`` (periodic and on interruption), ``best`` (EMA pseudo-Dice), ``final``
CHECKPOINTS = ("latest", "best", "final")
#: the layout of the checkpoint's dictionary; a checkpoint with a larger number comes from a newer autoseg
CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used (the message names the file, the cause and what to do)."""


@dataclass
class TrainState:
    """Where training stands: stage index, optimiser steps done in it, and the epoch log so far.

    ``epoch_*`` carry a partly done epoch across an interruption. ``history`` has one list per logged
    quantity, one entry per finished epoch (both stages).
    """

    stage: int = 0
    step: int = 0
    ema: float = -1.0
    best_ema: float = -1.0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    epoch_data_wait: float = 0.0
    epoch_seconds: float = 0.0
    #: optimiser steps skipped in this epoch because the gradients were not finite (AMP overflow)
    epoch_skipped: int = 0
    #: early stopping: EMA pseudo-Dice per foreground class (NaN: never seen), and this stage's best mean EMA
    #: with the epochs since it
    class_ema: list[float] = field(default_factory=list)
    stage_best_ema: float = -1.0
    epochs_without_gain: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)

    def log(self, **values: float) -> None:
        for k, v in values.items():
            self.history.setdefault(k, []).append(float(v))


def _cuda_rng_states() -> list[torch.Tensor]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(torch.cuda.get_rng_state_all())
    return []


def save_checkpoint(path: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: Any, state: TrainState) -> None:
    """Write weights, optimiser and grad-scaler state, the :class:`TrainState` and the RNG states of torch
    (CPU, and every CUDA device that was used)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "network": network.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "state": asdict(state),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": _cuda_rng_states(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint's contents; ``state`` as a :class:`TrainState`. The network's tensors are moved to
    ``device``; everything else (optimiser state, RNG states) stays on the CPU: ``load_state_dict`` of an
    optimiser moves its state to its parameters' device, and torch's RNG setters want CPU byte tensors.

    Raises:
        CheckpointError: the file cannot be used; the message says why and advises deleting it only when it is
            truly corrupt or truncated (a newer format, pickled objects, permissions or memory are told apart).
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (MemoryError, RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(f"{path}: {_load_failure(path, e)}") from None
    except Exception as e:  # torch's reader of old, non-zip files raises anything on garbage (KeyError, IndexError...)
        if zipfile.is_zipfile(path):
            raise
        raise CheckpointError(f"{path}: {_load_failure(path, e)}") from None
    if not isinstance(payload, dict) or not {"network", "state"} <= set(payload):
        raise CheckpointError(f"{path}: not an autoseg checkpoint (no network weights and training state); "
                              "if it came from another program, move it away")
    version = payload.get("format", 1)
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: written by a newer autoseg (checkpoint format {version}; this version reads "
                              f"up to {CHECKPOINT_FORMAT}); upgrade autoseg (pip install -U autoseg) to use it")
    try:
        payload["state"] = TrainState(**payload["state"])
    except TypeError as e:
        raise CheckpointError(f"{path}: its training state does not match this autoseg version ({e}); it was "
                              "probably written by another version: use that one, or train with --restart") from None
    payload.setdefault("cuda_rng", [])
    payload["network"] = {k: v.to(device) for k, v in payload["network"].items()}
    return payload


def _load_failure(path: Path, e: BaseException) -> str:
    """Why ``torch.load`` failed, in words, with advice that fits the cause."""
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, PermissionError):
        return "cannot be read: permission denied (check the file's owner and mode; the file itself may be fine)"
    if isinstance(e, MemoryError) or is_out_of_memory(e):
        return "not enough memory to load it; close other programs or load on a machine with more RAM (the file " \
            "itself is fine)"
    size = path.stat().st_size if path.is_file() else 0
    whole = zipfile.is_zipfile(path)  # torch writes a zip archive: a cut file has no central directory
    if isinstance(e, OSError) and whole:
        return f"cannot be read ({e.strerror or e}); the file itself may be fine"
    if isinstance(e, pickle.UnpicklingError) and whole:
        return ("holds Python objects that autoseg refuses to load, because loading them could run code "
                "(autoseg writes tensors and plain values only): not an autoseg checkpoint; move it away")
    what = f"{first_line(e)[:120]}" if whole else "not a complete checkpoint archive"
    return (f"corrupt or truncated ({size} bytes: {what}), for example by a crash while it was copied; delete it, "
            "or train with --restart")


def restore_rng(payload: dict) -> None:
    """Set torch's CPU RNG, and the CUDA RNGs where this process has as many devices as were saved, to a
    checkpoint's states (CPU byte tensors whatever device they were loaded to)."""
    torch.set_rng_state(payload["torch_rng"].to("cpu", torch.uint8))
    cuda = payload.get("cuda_rng") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all([t.to("cpu", torch.uint8) for t in cuda])
