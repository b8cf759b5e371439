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

from autoseg.checkpoint import load_checkpoint
from autoseg.cli import main
from autoseg.runconfig import Overrides, StageRun
from autoseg.tiling import tile_boxes
from autoseg.training.budget import budget_epochs
from autoseg.training.interrupt import StopRequest, TrainingInterrupted
from autoseg.training.runtime import Runtime
from autoseg.training.trainer import Trainer
from autoseg.workflows.fold import train_fold

from .stopping import train_until_signalled


def cpu(workers: int = 0) -> Runtime:
    return Runtime(torch.device("cpu"), workers=workers, progress=False)


def test_tiny_dataset_learns(tiny_run, capsys):
    metrics = train_fold(tiny_run, "0", Overrides("both", 8, 25, None), cpu(1))  # ~12 s here
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


@pytest.mark.parametrize("stop_before, stage, step", [(24, 0, 23), (25, 1, 0), (29, 1, 4)])
def test_stopped_at_a_stage_boundary_or_inside_a_stage_resumes_exactly(tiny_run, tmp_path, monkeypatch, stop_before,
                                                                        stage, step):
    """Where the signal lands is up to the scheduler in the subprocess test; here it lands before chosen steps
    (1-based): the zoom-in stage's last step, the zoom-out stage's first (after the stage boundary's
    checkpoint) and one inside the zoom-out stage."""
    overrides = Overrides("both", 3, 8, None)
    reference = tmp_path / "reference"
    shutil.copytree(tiny_run, reference)
    Trainer(reference, "0", overrides, cpu()).fit()
    train_until_signalled(monkeypatch, tiny_run, overrides, cpu(), None, stop_before)
    stopped = load_checkpoint(tiny_run / "fold_0" / "checkpoint_latest.pt")["state"]
    assert (stopped.stage, stopped.step) == (stage, step)
    half_written = tiny_run / "fold_0" / ".tmp-0123abcd-checkpoint_latest.pt"  # as a kill mid-save leaves it
    half_written.write_bytes(b"\0" * 10)
    Trainer(tiny_run, "0", overrides, cpu()).fit()
    assert not half_written.exists()
    _assert_same_final_checkpoint(tiny_run, reference, epochs=3 + 1)


def test_a_signal_during_the_last_step_finishes_training_and_skips_validation(tiny_run, monkeypatch):
    agree = Trainer._agree_to_stop
    calls = {"n": 0}

    def signal_during_last_step(self: Trainer, batch: dict | None, where: str) -> bool:
        calls["n"] += 1
        answer = agree(self, batch, where)
        if calls["n"] == 2 * 4:  # the last of 2 epochs x 4 steps: the signal arrives while it runs
            self.stop.handle(signal.SIGINT, None)
        return answer

    monkeypatch.setattr(Trainer, "_agree_to_stop", signal_during_last_step)
    with pytest.raises(TrainingInterrupted, match="training finished .* not validated") as stopped:
        train_fold(tiny_run, "0", Overrides("zoom-in", 2, 4, None), cpu(), say=lambda s: None)
    assert stopped.value.code == 128 + signal.SIGINT
    assert (tiny_run / "fold_0" / "checkpoint_final.pt").is_file()
    assert not (tiny_run / "fold_0" / "validation").exists()
    monkeypatch.setattr(Trainer, "_agree_to_stop", agree)
    metrics = train_fold(tiny_run, "0", Overrides("zoom-in", 2, 4, None), cpu(), say=lambda s: None)
    assert metrics is not None and (tiny_run / "fold_0" / "validation" / "metrics.json").is_file()


def test_second_signal_stops_at_once(monkeypatch, capfd):
    """Two real signals cannot be timed against a step reliably (the first alone may already have stopped
    the run), so the handler is driven directly; ``os._exit`` is what ends the process."""
    import autoseg.training.interrupt as interrupt

    def exit_now(code: int) -> None:
        raise SystemExit(code)

    class Worker:
        killed = False

        def kill(self) -> None:
            self.killed = True

    workers = [Worker(), Worker()]
    monkeypatch.setattr(interrupt.os, "_exit", exit_now)
    monkeypatch.setattr(interrupt.multiprocessing, "active_children", lambda: workers)
    stop = StopRequest()
    stop.handle(signal.SIGTERM, None)
    assert stop.signum == signal.SIGTERM
    with pytest.raises(SystemExit) as ended:
        stop.handle(signal.SIGINT, None)
    assert ended.value.code == 128 + signal.SIGINT
    assert all(w.killed for w in workers)  # data workers ignore SIGTERM and may be stuck: killed, not orphaned
    assert "SIGINT again: stopped at once" in capfd.readouterr().err
    settled = StopRequest()  # the stop's checkpoint is written: a launcher's later signal says so, not "lost"
    settled.handle(signal.SIGTERM, None)
    settled.settle()
    with pytest.raises(SystemExit) as ended:
        settled.handle(signal.SIGTERM, None)
    assert ended.value.code == 128 + signal.SIGTERM
    assert "SIGTERM: checkpoint_latest.pt written" in capfd.readouterr().err


def test_a_rank_waiting_for_dead_ranks_gives_up_after_the_grace(monkeypatch, capfd):
    import autoseg.training.interrupt as interrupt

    exits: list[int] = []
    monkeypatch.setattr(interrupt.os, "_exit", exits.append)
    stop = StopRequest(grace_seconds=0.05)
    stop.handle(signal.SIGTERM, None)
    time.sleep(0.5)
    assert exits == [128 + signal.SIGTERM]
    assert "did not answer within 0.05 s" in capfd.readouterr().err
    finished = StopRequest(grace_seconds=0.05)  # a stop that completes in time cancels the watchdog
    finished.handle(signal.SIGTERM, None)
    finished.done()
    time.sleep(0.3)
    assert exits == [128 + signal.SIGTERM]


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
    plan = json.loads((tiny_run / "plans.json").read_text())
    assert run["name"] == "zoom_out" and run["init_from"] is None
    assert run["learning_rate"] == plan["stages"][0]["learning_rate"] == 3e-3  # a CPU plan's Adam


def test_a_budget_too_short_for_one_epoch_is_refused_with_the_reason(tiny_run):
    with pytest.raises(ValueError, match=r"--time-budget 0.1: .* s went to measurements.*less than one epoch"):
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


def test_time_budget_corrects_a_wrong_measurement_after_two_epochs(tiny_run, monkeypatch):
    """A step measurement 100x too optimistic would plan thousands of epochs; the real duration of the
    second epoch corrects every stage to fit the budget, and config.json records it."""
    monkeypatch.setattr(Trainer, "_measure_step", lambda self, stage, cfg: 1e-4)
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
    from autoseg.training.runtime import distributed_runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    rt = distributed_runtime("cpu", 0, False)
    try:
        net = Trainer(Path(run), "0", Overrides("zoom-in", 1, 3, None), rt, say=lambda s: None).fit()
        torch.save(net.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        rt.close()


def test_ddp_gloo_keeps_replicas_identical(tiny_run, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tiny_run), str(tmp_path), port), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    final = load_checkpoint(tiny_run / "fold_0" / "checkpoint_final.pt")["network"]
    for k in a:  # rank 0 wrote the replicas' weights
        assert torch.equal(a[k], final[k]), k
    # and training moved the weights away from their initial values
    torch.manual_seed(2024)
    from autoseg.networks import build_network
    from autoseg.plans import load_plans

    plans = load_plans(tiny_run / "plans.json")
    assert plans.training.seed == 2024
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


def test_a_failing_batch_ends_every_rank_with_one_line(tiny_run):
    """Two processes (``--gpus 2`` on the CPU, gloo): a case that cannot be read fails on whichever rank draws
    it; both ranks learn it in the same step, rank 0 prints one line naming the failing rank and the case,
    every process exits (no hang in a collective) and the launcher adds no traceback."""
    for f in (tiny_run / "preprocessed").glob("*_data.b2nd"):
        f.write_bytes(b"not blosc2")
    cmd = [sys.executable, "-m", "autoseg", "train", "0", "--run", str(tiny_run), "--stage", "zoom-in", "--epochs",
           "1", "--iterations-per-epoch", "2", "--gpus", "2", "--device", "cpu", "-j", "0", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and re.match(r"error: rank [01] of 2 failed: case case_\d+: ", errors[0]), out.stderr
    assert not (tiny_run / "fold_0" / "checkpoint_final.pt").exists()


def test_the_budget_measures_the_final_validation_and_scales_it(tiny_run, monkeypatch):
    """validation_seconds = every case's tiles x mirrorings x one forward pass, plus the way back to the
    scan's grid, writing and scoring, timed on the median case and scaled by voxel count; mirrored, also one
    unmirrored forward pass per tile and one more way back to the scan's grid (to score it). On the CPU two
    inputs share a call, each costing half a call of two (here one tile 0.8 s, two 1.2 s): two mirrorings, or
    unmirrored two tiles of a case; a case of one tile predicts unmirrored alone."""
    import autoseg.workflows.validate as validate_module
    from autoseg.plans import load_plans
    from autoseg.preprocessing.storage import read_properties

    plans = load_plans(tiny_run / "plans.json")
    cases = sorted(c for f in plans.folds for c in f.val)[:3]
    patch = list(plans.stages[-1].patch_size)
    # an untimed first run (first-time imports), then the median case's way back 2 s; with writing and scoring 12.5 s
    clock = iter([0.0, 40.0, 90.0, 100.0, 102.0, 112.5])
    monkeypatch.setattr(validate_module, "_clock", lambda: next(clock))
    monkeypatch.setattr(validate_module, "_forward_seconds",
                        lambda net, shape, device, amp, batch=1: 0.4 + 0.4 * batch)
    net = Trainer(tiny_run, "0", Overrides("both", 1, 2, None), cpu())._new_network()
    cost = validate_module.validation_cost(tiny_run, plans, cases, net, patch, torch.device("cpu"))
    shapes = [read_properties(tiny_run / "preprocessed", c).shape_after_resampling for c in cases]
    per_case = [len(tile_boxes([max(s, p) for s, p in zip(shape, patch)], patch, plans.inference.tile_step))
                for shape in shapes]
    tiles, lone = sum(per_case), per_case.count(1)
    flips = 2 ** len(plans.inference.mirror_axes)
    sizes = sorted(int(torch.tensor(shape).prod()) for shape in shapes)
    unmirrored = lone * 0.8 + (tiles - lone) * 0.6  # a case's tiles go in pairs; a case of one tile alone
    assert cost.seconds(True) == pytest.approx(tiles * flips * 0.6 + unmirrored + (12.5 + 2.0) * sum(sizes) / sizes[1])
    assert cost.seconds(False) == pytest.approx(unmirrored + 12.5 * sum(sizes) / sizes[1])


@pytest.mark.parametrize("tiled, tiles_kept, planned", [(5.0, True, 8.0), (30.0, False, 3.0)])
def test_a_time_budget_sets_epochs_from_measured_steps_and_validation(tiny_run, monkeypatch, step_time_fixed, tiled,
                                                                       tiles_kept, planned):
    """A validation whose mirroring would take more than a quarter of the budget (here measured as 100 tiles
    x (8 mirrorings + the unmirrored prediction it also scores) x 0.02 s + 1 s = 19 s of 45 s) runs without
    mirroring: 100 x 0.02 + 1 = 3 s planned. The tiled prediction of one-pass cases (``tiled`` s) is judged
    apart against the same quarter: kept (5 s: 8 s planned) or left out (30 s)."""
    import autoseg.workflows.fold as fold_module
    from autoseg.workflows.validate import ValidationCost

    monkeypatch.setattr(fold_module, "validation_cost",
                        lambda *args: ValidationCost(100, 8, 0.02, 1.0, tiled_seconds=tiled))
    lines: list[str] = []
    train_fold(tiny_run, "0", Overrides("both", None, 5, 0.75), cpu(), say=lines.append)
    cfg = json.loads((tiny_run / "fold_0" / "config.json").read_text())
    assert cfg["validation_tta"] is False and cfg["measured_validation_seconds"] == planned
    assert cfg["validation_tiles"] is tiles_kept
    assert any(x.startswith("validation  one pass only: also predicting its cases by tiles would take ~30 s")
               for x in lines) is not tiles_kept
    assert json.loads((tiny_run / "fold_0" / "validation" / "metrics.json").read_text())["mirroring"] is False
    assert any(x.startswith("validation  without mirroring: with it, it would take ~19 s") for x in lines)
    assert cfg["measured_step_seconds"] == [0.05, 0.05]  # step_time_fixed
    assert cfg["stages"][0]["epochs"] >= 1 and cfg["stages"][1]["epochs"] >= 1
    assert cfg["measured_validation_seconds"] > 0
    assert any("(measured on one case)" in x for x in lines)
    assert re.search(rf"validation  2 cases, .* s; the time budget planned {planned:.0f} s; no mirroring\)",
                     lines[-1]), lines[-1]
