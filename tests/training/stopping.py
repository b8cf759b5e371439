"""Stopping a training run at a chosen step, as SIGTERM would, for the resume tests of every configuration."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from autoseg.runconfig import Overrides
from autoseg.training.interrupt import TrainingInterrupted
from autoseg.training.runtime import Runtime
from autoseg.training.trainer import Trainer


def train_until_signalled(monkeypatch: pytest.MonkeyPatch, run: Path, overrides: Overrides, rt: Runtime,
                          configuration: str | None, at_step: int) -> None:
    """Train ``configuration`` of ``run`` fold 0 (None: the plan's default) and send it SIGTERM when it reaches
    its ``at_step``-th step (counted from 1 over both stages); checks that training stops with
    :class:`TrainingInterrupted`, then restores the trainer."""
    agree, calls = Trainer._agree_to_stop, {"n": 0}

    def signal_at_step(self: Trainer, batch: dict | None, where: str) -> bool:
        calls["n"] += 1
        if calls["n"] == at_step:
            self.stop.handle(signal.SIGTERM, None)
        return agree(self, batch, where)

    monkeypatch.setattr(Trainer, "_agree_to_stop", signal_at_step)
    with pytest.raises(TrainingInterrupted):
        Trainer(run, "0", overrides, rt, configuration=configuration, say=lambda s: None).fit()
    monkeypatch.setattr(Trainer, "_agree_to_stop", agree)
