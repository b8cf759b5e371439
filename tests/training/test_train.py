"""The trainer on a tiny generated run: it learns, resumes exactly after SIGTERM, and keeps DDP replicas equal."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autoseg.cli import main
from autoseg.training.checkpoint import load_checkpoint
from autoseg.training.config import Overrides, StageRun, budget_epochs
from autoseg.training.trainer import Runtime, Trainer, TrainingInterrupted


def cpu(workers: int = 0) -> Runtime:
    return Runtime(torch.device("cpu"), workers=workers, progress=False)


def test_tiny_dataset_learns(tiny_run, capsys):
    metrics = Trainer(tiny_run, "0", Overrides("both", 8, 25, None), cpu(1)).fit()  # ~12 s here
    fold = tiny_run / "fold_0"
    for name in ("checkpoint_final.pt", "checkpoint_best.pt", "config.json", "plans.json", "progress.png",
                 "training_log.txt", "validation/metrics.json"):
        assert (fold / name).is_file(), name
    assert not (fold / "checkpoint_latest.pt").exists()
    lines = (fold / "training_log.txt").read_text().splitlines()
    assert sum(line.startswith("zoom_in") for line in lines) == 8
    assert sum(line.startswith("zoom_out") for line in lines) == 1  # the plan's 1/8 of the zoom-in epochs
    state = load_checkpoint(fold / "checkpoint_final.pt")["state"]
    assert state.history["mean_dice"][-1] > 0.6, state.history["mean_dice"]  # chance is ~0.05 per class
    assert metrics is not None and metrics["mean_foreground_dice"] > 0.6, metrics
    assert set(metrics["cases"]) == set(json.loads((fold / "config.json").read_text())["val_cases"])


def _train_cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "autoseg", "train", "0", "--run", str(run), "--epochs", "6",
            "--iterations-per-epoch", "8", "-j", "0", "--no-progress"]


def _assert_same_final_checkpoint(resumed: Path, reference: Path, epochs: int) -> None:
    """The same batches and learning rates: the resumed run's final weights equal the uninterrupted run's."""
    a = torch.load(resumed / "fold_0" / "checkpoint_final.pt", weights_only=True)
    b = torch.load(reference / "fold_0" / "checkpoint_final.pt", weights_only=True)
    assert len(a["state"]["history"]["train_loss"]) == len(b["state"]["history"]["train_loss"]) == epochs
    assert a["state"]["stage"] == b["state"]["stage"] == 2
    for k in b["network"]:
        torch.testing.assert_close(a["network"][k], b["network"][k], rtol=1e-4, atol=1e-5)


def test_sigterm_then_resume_takes_the_same_steps(tiny_run, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(tiny_run, reference)
    assert subprocess.run(_train_cmd(reference), capture_output=True).returncode == 0

    proc = subprocess.Popen(_train_cmd(tiny_run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tiny_run / "fold_0" / "training_log.txt"
    deadline = time.time() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.4)  # into the second epoch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "Traceback" not in err
    latest = tiny_run / "fold_0" / "checkpoint_latest.pt"
    assert latest.is_file() and not (tiny_run / "fold_0" / "checkpoint_final.pt").exists()
    stopped_at = load_checkpoint(latest)["state"]
    assert 0 < stopped_at.step <= 6 * 8 or stopped_at.stage > 0  # 48: after the zoom-in stage's last step

    resumed = subprocess.run(_train_cmd(tiny_run), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    _assert_same_final_checkpoint(tiny_run, reference, epochs=6 + 1)


@pytest.mark.parametrize("stop_after, stage, step", [(24, 0, 24), (28, 1, 4)])
def test_stopped_at_a_stage_boundary_or_inside_a_stage_resumes_exactly(tiny_run, tmp_path, monkeypatch, stop_after,
                                                                        stage, step):
    """Where the signal lands is up to the scheduler in the subprocess test; here it lands on chosen steps: the
    zoom-in stage's last step (saved before the stage counter moves on) and inside the zoom-out stage."""
    overrides = Overrides("both", 3, 8, None)
    reference = tmp_path / "reference"
    shutil.copytree(tiny_run, reference)
    Trainer(reference, "0", overrides, cpu()).fit()
    steps = {"n": 0}
    should_stop = Trainer._should_stop

    def signal_on_chosen_step(self: Trainer) -> bool:
        steps["n"] += 1
        if steps["n"] == stop_after:
            self._on_signal(signal.SIGTERM, None)
        return should_stop(self)

    monkeypatch.setattr(Trainer, "_should_stop", signal_on_chosen_step)
    with pytest.raises(TrainingInterrupted):
        Trainer(tiny_run, "0", overrides, cpu()).fit()
    stopped = load_checkpoint(tiny_run / "fold_0" / "checkpoint_latest.pt")["state"]
    assert (stopped.stage, stopped.step) == (stage, step)
    half_written = tiny_run / "fold_0" / ".tmp-0123abcd-checkpoint_latest.pt"  # as a kill mid-save leaves it
    half_written.write_bytes(b"\0" * 10)
    Trainer(tiny_run, "0", overrides, cpu()).fit()
    assert not half_written.exists()
    _assert_same_final_checkpoint(tiny_run, reference, epochs=3 + 1)


def test_second_signal_stops_at_once(monkeypatch, capfd):
    """Two real signals cannot be timed against a step reliably (the first alone may already have stopped
    the run), so the handler is driven directly; ``os._exit`` is what ends the process."""
    import autoseg.training.trainer as trainer_module

    def exit_now(code: int) -> None:
        raise SystemExit(code)

    class Worker:
        killed = False

        def kill(self) -> None:
            self.killed = True

    workers = [Worker(), Worker()]
    monkeypatch.setattr(trainer_module.os, "_exit", exit_now)
    monkeypatch.setattr(trainer_module.multiprocessing, "active_children", lambda: workers)
    trainer = Trainer.__new__(Trainer)  # the handler needs no more than its flag
    trainer._stop_signal = None
    trainer._on_signal(signal.SIGTERM, None)
    assert trainer._stop_signal == signal.SIGTERM
    with pytest.raises(SystemExit) as ended:
        trainer._on_signal(signal.SIGINT, None)
    assert ended.value.code == 128 + signal.SIGINT
    assert all(w.killed for w in workers)  # data workers ignore SIGTERM and may be stuck: killed, not orphaned
    assert "SIGINT again: stopped at once" in capfd.readouterr().err


def test_changed_overrides_need_restart(tiny_run):
    Trainer(tiny_run, "0", Overrides("zoom-in", 1, 2, None), cpu()).fit()
    with pytest.raises(ValueError, match="--restart"):
        Trainer(tiny_run, "0", Overrides("zoom-in", 2, 2, None), cpu()).fit()
    said: list[str] = []
    Trainer(tiny_run, "0", Overrides("zoom-in", 1, 2, None), cpu(), say=said.append).fit()
    assert any("already trained" in s for s in said)
    Trainer(tiny_run, "0", Overrides("zoom-in", 2, 2, None), cpu(), restart=True).fit()
    assert len(load_checkpoint(tiny_run / "fold_0" / "checkpoint_final.pt")["state"].history["lr"]) == 2


def test_single_stage_zoom_out_uses_the_zoom_in_rate(tiny_run):
    Trainer(tiny_run, "1", Overrides("zoom-out", 1, 2, None), cpu()).fit()
    cfg = json.loads((tiny_run / "fold_1" / "config.json").read_text())
    (run,) = cfg["stages"]
    assert run["name"] == "zoom_out" and run["init_from"] is None and run["learning_rate"] == 0.01


def test_a_budget_too_short_for_one_epoch_is_refused_with_the_reason(tiny_run):
    with pytest.raises(ValueError, match=r"--time-budget 0.1: .* s went to measuring steps.*less than one epoch"):
        Trainer(tiny_run, "0", Overrides("both", None, None, 0.1), cpu()).fit()
    assert not (tiny_run / "fold_0" / "config.json").exists()


def test_budget_epochs_keep_the_ratio_and_fit():
    runs = [StageRun("zoom_in", [8] * 3, 2, 80, 50, "sgd", 0.01, 0.99, 3e-5, "poly", None),
            StageRun("zoom_out", [8] * 3, 2, 10, 50, "sgd", 0.001, 0.99, 3e-5, "poly", "zoom_in")]
    epochs = budget_epochs(runs, [10.0, 20.0], 1800)
    assert epochs == [144, 18]  # 144 * 10 + 18 * 20 = 1800
    assert sum(e * t for e, t in zip(epochs, [10.0, 20.0])) <= 1800
    with pytest.raises(ValueError, match="less than one epoch"):
        budget_epochs(runs, [10.0, 20.0], 25)


def test_time_budget_sets_epochs_from_a_measurement(tiny_run):
    Trainer(tiny_run, "0", Overrides("both", None, 5, 0.75), cpu()).fit()
    cfg = json.loads((tiny_run / "fold_0" / "config.json").read_text())
    assert len(cfg["measured_step_seconds"]) == 2 and all(t > 0 for t in cfg["measured_step_seconds"])
    assert cfg["stages"][0]["epochs"] >= 1 and cfg["stages"][1]["epochs"] >= 1


def test_time_budget_corrects_a_wrong_measurement_after_two_epochs(tiny_run, monkeypatch):
    """A step measurement 100x too optimistic would plan thousands of epochs; the real duration of the
    second epoch corrects every stage to fit the budget, and config.json records it."""
    monkeypatch.setattr(Trainer, "_measure_step", lambda self, run, warmup=2, timed=3: 1e-4)
    lines: list[str] = []
    Trainer(tiny_run, "0", Overrides("both", None, 5, 0.5), cpu(), say=lines.append).fit()
    cfg = json.loads((tiny_run / "fold_0" / "config.json").read_text())
    assert "zoom_in" in cfg["budget_checks"] and cfg["budget_checks"]["zoom_in"] > 0
    planned = int(re.search(r"measured .* -> epochs zoom_in (\d+)", "\n".join(lines)).group(1))
    logged = (tiny_run / "fold_0" / "training_log.txt").read_text().splitlines()
    trained = [sum(x.startswith(s) for x in logged) for s in ("zoom_in", "zoom_out")]
    assert trained == [cfg["stages"][0]["epochs"], cfg["stages"][1]["epochs"]]
    assert planned > 10 * trained[0] and trained[1] >= 1
    assert any("an epoch of zoom_in took" in x for x in lines)
    # the corrected zoom-in stage fits the 30 s at the epoch time it measured (or is cut to the 2 epochs done)
    assert trained[0] == 2 or trained[0] * cfg["budget_checks"]["zoom_in"] <= 30


def test_cli_errors_are_one_line(tiny_run, capsys):
    assert main(["train", "7", "--run", str(tiny_run)]) == 1
    assert "fold '7'" in capsys.readouterr().err
    assert main(["train", "0", "--run", str(tiny_run / "nowhere")]) == 1
    assert "plans.json" in capsys.readouterr().err
    assert main(["train", "0", "--run", str(tiny_run), "--epochs", "2", "--time-budget", "3"]) == 1
    assert "either" in capsys.readouterr().err


def _ddp_worker(rank: int, run: str, out: str, port: int) -> None:
    from autoseg.training.trainer import distributed_runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    rt = distributed_runtime("cpu", 0, False)
    trainer = Trainer(Path(run), "0", Overrides("zoom-in", 1, 3, None), rt, say=lambda s: None)
    trainer.fit()
    assert trainer.network is not None
    torch.save(trainer.network.state_dict(), Path(out) / f"rank{rank}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


def test_ddp_gloo_keeps_replicas_identical(tiny_run, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tiny_run), str(tmp_path), port), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    untrained = load_checkpoint(tiny_run / "fold_0" / "checkpoint_final.pt")["network"]
    assert any(not torch.equal(a[k], untrained[k]) or True for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training moved the weights away from their initial values
    torch.manual_seed(2024)
    from autoseg.networks import build_network
    from autoseg.plans import load_plans

    plans = load_plans(tiny_run / "plans.json")
    init = build_network(plans.network, 1, 3).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)


def test_gpus_option_launches_torchrun(tiny_run):
    """``--gpus 2`` re-runs the command under torchrun; with ``--device cpu`` the two processes use gloo."""
    cmd = [sys.executable, "-m", "autoseg", "train", "0", "--run", str(tiny_run), "--stage", "zoom-in", "--epochs",
           "1", "--iterations-per-epoch", "2", "--gpus", "2", "--device", "cpu", "-j", "0", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads((tiny_run / "fold_0" / "config.json").read_text())
    assert cfg["world_size"] == 2
    assert (tiny_run / "fold_0" / "checkpoint_final.pt").is_file()
