"""Bytes a call keeps for backward, measured with ``torch.autograd.graph.saved_tensors_hooks``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_bytes(call: Callable[[], object], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct tensor storages that ``call()`` saves for backward, the storages of ``exclude``
    (its inputs, or a network's parameters) not counted."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    return sum(kept.values())
