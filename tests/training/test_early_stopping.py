"""Early stopping (``--stop-at-dice``, ``--patience``): the rule on scripted pseudo-Dice sequences, and the
trainer stopping, recording and resuming on a tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from autoseg.checkpoint import TrainState, load_checkpoint
from autoseg.cli import main
from autoseg.runconfig import Overrides, load_config
from autoseg.training import trainer as trainer_module
from autoseg.training.runtime import Runtime
from autoseg.training.stopping import early_stop_reason, expand_bars, start_stage, update_class_ema
from autoseg.training.trainer import Trainer

NAMES = ["organ1", "organ2"]


def cpu() -> Runtime:
    return Runtime(torch.device("cpu"), workers=0, progress=False)


def test_bars_expand_to_every_class_or_are_refused():
    assert expand_bars([], NAMES) == []
    assert expand_bars([0.9], NAMES) == [0.9, 0.9]
    assert expand_bars([0.9, 0.7], NAMES) == [0.9, 0.7]
    with pytest.raises(ValueError, match="3 bars for 2 foreground classes"):
        expand_bars([0.9, 0.8, 0.7], NAMES)
    with pytest.raises(ValueError, match="not a Dice"):
        expand_bars([1.5], NAMES)


def test_class_ema_by_hand_and_unseen_classes():
    ema = update_class_ema([], [0.5, math.nan], 0.9)
    assert ema[0] == 0.5 and math.isnan(ema[1])
    ema = update_class_ema(ema, [1.0, 0.4], 0.9)
    assert ema == pytest.approx([0.9 * 0.5 + 0.1 * 1.0, 0.4])
    ema = update_class_ema(ema, [math.nan, 0.6], 0.9)
    assert ema == pytest.approx([0.55, 0.9 * 0.4 + 0.1 * 0.6])


def _run_rule(sequence: list[list[float]], bars: list[float], patience: int | None,
              momentum: float = 0.0) -> int | None:
    """The 1-based epoch at which the rule stops on ``sequence`` (the mean EMA computed as the trainer does)."""
    state = TrainState()
    start_stage(state)
    for epoch, dice in enumerate(sequence, start=1):
        mean = float(sum(dice) / len(dice))
        state.ema = mean if state.ema < 0 else momentum * state.ema + (1 - momentum) * mean
        if early_stop_reason(state, dice, momentum, bars, NAMES, patience) is not None:
            return epoch
    return None


def test_stops_at_the_first_epoch_where_every_class_passes():
    seq = [[0.5, 0.3], [0.92, 0.85], [0.95, 0.89], [0.91, 0.90], [0.99, 0.99]]
    assert _run_rule(seq, [0.9, 0.9], None) == 4  # epoch 2 and 3: one class still below
    assert _run_rule(seq, [0.9, 0.8], None) == 2  # per-class bars
    assert _run_rule(seq, [0.995, 0.995], None) is None
    # with an EMA (momentum 0.5) the bar is reached later: epoch 4 EMA = (0.9375, 0.86...) < 0.9, epoch 5 passes
    assert _run_rule(seq, [0.9, 0.9], None, momentum=0.5) == 5


def test_a_class_never_seen_never_passes():
    assert _run_rule([[0.95, math.nan]] * 4, [0.9, 0.9], None) is None


def test_patience_counts_epochs_without_a_new_best():
    seq = [[0.5, 0.5], [0.6, 0.6], [0.55, 0.55], [0.6, 0.6], [0.59, 0.59], [0.7, 0.7]]
    assert _run_rule(seq, [], 3) == 5  # best 0.6 at epoch 2; epochs 3, 4 (equal is no gain), 5 without
    assert _run_rule(seq, [], 4) is None


def _scripted_pseudo_dice(values: list[list[float]]):
    calls = {"n": 0}

    def fake(net, ds, loss_fn, rt, amp, iterations, n_fg):
        v = values[min(calls["n"], len(values) - 1)]
        calls["n"] += 1
        return 0.5, list(v)
    return fake, calls


def _no_smoothing(run) -> None:
    """The plan's EMA momentum set to 0, so that the EMA is the scripted pseudo-Dice itself."""
    plans = json.loads((run / "plans.json").read_text())
    plans["training"]["ema_momentum"] = 0.0
    (run / "plans.json").write_text(json.dumps(plans))


def test_trainer_moves_on_to_zoom_out_and_does_not_train_further_on_resume(tiny_run, monkeypatch):
    # zoom-in: 16 epochs planned, every class passes 0.8 at its 3rd epoch; zoom-out (2 epochs): passes at once
    _no_smoothing(tiny_run)
    fake, calls = _scripted_pseudo_dice([[0.5, 0.6], [0.85, 0.7], [0.9, 0.81], [0.95, 0.95]])
    monkeypatch.setattr(trainer_module, "pseudo_dice", fake)
    said: list[str] = []
    overrides = Overrides("both", 16, 2, None, stop_at_dice=[0.8])
    Trainer(tiny_run, "0", overrides, cpu(), say=said.append).fit()
    stops = [s for s in said if s.startswith("early stop")]
    assert len(stops) == 2
    assert stops[0].startswith("early stop   zoom_in at epoch 3/16") and "on to zoom_out" in stops[0]
    assert "zoom_out at epoch 1/2" in stops[1] and "training ends" in stops[1]
    fold = tiny_run / "fold_0"
    cfg = load_config(fold / "config.json")
    assert set(cfg.early_stops) == {"zoom_in", "zoom_out"} and cfg.early_stops["zoom_in"].startswith("epoch 3 of 16")
    assert cfg.overrides.stop_at_dice == [0.8]
    state = load_checkpoint(fold / "checkpoint_final.pt")["state"]
    assert state.history["stage"] == [0.0, 0.0, 0.0, 1.0]  # 3 zoom-in epochs, 1 zoom-out epoch
    assert "early stop   zoom_in" in (fold / "training_log.txt").read_text()
    n = calls["n"]
    again: list[str] = []
    Trainer(tiny_run, "0", overrides, cpu(), say=again.append).fit()
    assert calls["n"] == n and any("already trained" in s for s in again)


def test_patience_on_the_command_line_is_recorded(tiny_run, monkeypatch, capsys):
    fake, _ = _scripted_pseudo_dice([[0.5, 0.5], [0.4, 0.4]])
    monkeypatch.setattr(trainer_module, "pseudo_dice", fake)
    monkeypatch.setattr("autoseg.workflows.fold.validate_fold", lambda *a, **k: {"mean_foreground_dice": 0.5,
                                                                                 "mean_per_class": {}})
    assert main(["train", "0", "--run", str(tiny_run), "--stage", "zoom-in", "--epochs", "5",
                 "--iterations-per-epoch", "1", "--patience", "2", "--no-progress", "-j", "0"]) == 0
    out = capsys.readouterr().out
    assert "early stop   zoom_in at epoch 3/5: no new best EMA pseudo-Dice" in out
    cfg = json.loads((tiny_run / "fold_0" / "config.json").read_text())
    assert cfg["overrides"]["patience"] == 2 and "zoom_in" in cfg["early_stops"]


@pytest.mark.parametrize("argv, message", [
    (["--stop-at-dice", "0.9,0.8,0.7"], "3 bars for 2 foreground classes"),
    (["--stop-at-dice", "high"], "expected one Dice or a comma-separated list"),
    (["--stop-at-dice", "0"], "not a Dice in (0, 1]"),
    (["--patience", "0"], "--patience must be at least 1"),
])
def test_bad_stopping_options_are_one_line(tiny_run, capsys, argv, message):
    assert main(["train", "0", "--run", str(tiny_run), "--epochs", "1", "--no-progress", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tiny_run / "fold_0").exists()
