"""Training and preprocessing against faults: a second process on the same fold or run, a run moved without its
dataset, a preprocessed case deleted between epochs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from autoseg.cli import main
from autoseg.demo import make_synthetic_dataset
from autoseg.locking import JobLock, fold_lock_path
from autoseg.training.trainer import Trainer

TRAIN = ["--stage", "zoom-in", "--epochs", "2", "--iterations-per-epoch", "3", "-j", "0", "--no-progress",
         "--device", "cpu"]


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_a_second_training_of_a_fold_or_preprocessing_of_a_run_is_refused(tiny_run, capsys):
    with JobLock(fold_lock_path(tiny_run / "fold_0"), "training of fold_0"):
        assert main(["train", "0", "--run", str(tiny_run), *TRAIN]) == 1
        line = _one_error_line(capsys)
        assert "is already running: process " in line and "lock: " in line, line
        assert main(["train", "1", "--run", str(tiny_run), *TRAIN]) == 0  # another fold is free
    assert not (tiny_run / "fold_0").exists() and not fold_lock_path(tiny_run / "fold_0").exists()
    with JobLock(tiny_run / ".preprocess.lock", "autoseg preprocess"):
        assert main(["preprocess", str(tiny_run), "--no-progress"]) == 1
        assert f"autoseg preprocess {tiny_run} is already running: process " in _one_error_line(capsys)


def test_a_run_moved_without_its_dataset_trains_and_validates(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "data", n_cases=6, shape=(16, 20, 18))
    run = tmp_path / "run"
    assert main(["plan", str(data), "-o", str(run), "--device", "cpu", "--folds", "3", "--no-progress"]) == 0
    assert main(["preprocess", str(run), "--no-progress"]) == 0
    moved = tmp_path / "cluster" / "run"
    shutil.copytree(run, moved)
    data.rename(tmp_path / "elsewhere")
    assert main(["train", "0", "--run", str(moved), *TRAIN]) == 0
    assert (moved / "fold_0" / "validation" / "metrics.json").is_file()
    assert main(["summarize", "--run", str(moved)]) == 0
    # a run from before the copies were kept, without its dataset: refused before any training
    for ref in (moved / "preprocessed").glob("*_reference.*"):
        ref.unlink()
    capsys.readouterr()
    assert main(["train", "1", "--run", str(moved), *TRAIN]) == 1
    line = _one_error_line(capsys)
    assert "no original label for 2 validation case(s)" in line and "put it back there" in line, line
    assert not (moved / "fold_1").exists()


def test_a_case_deleted_between_epochs_keeps_the_steps_and_resumes_exactly(tiny_run, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    shutil.copytree(tiny_run, reference)
    assert main(["train", "0", "--run", str(reference), *TRAIN]) == 0
    end_epoch = Trainer._end_epoch

    def delete_cases_after_epoch_1(self, *args):
        reason = end_epoch(self, *args)
        for f in (self.folder).glob("*_data.b2nd"):
            f.unlink()
        return reason

    monkeypatch.setattr(Trainer, "_end_epoch", delete_cases_after_epoch_1)
    capsys.readouterr()
    assert main(["train", "0", "--run", str(tiny_run), *TRAIN]) == 1
    line = _one_error_line(capsys)
    assert "checkpoint_latest.pt written at zoom_in step 3" in line and "autoseg preprocess" in line, line
    monkeypatch.setattr(Trainer, "_end_epoch", end_epoch)
    assert main(["preprocess", str(tiny_run), "--no-progress"]) == 0
    assert main(["train", "0", "--run", str(tiny_run), *TRAIN]) == 0
    a = torch.load(tiny_run / "fold_0" / "checkpoint_final.pt", weights_only=True)["network"]
    b = torch.load(reference / "fold_0" / "checkpoint_final.pt", weights_only=True)["network"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("what", ["truncated", "pickled"])
def test_a_damaged_latest_checkpoint_is_one_line_with_the_right_advice(tiny_run, capsys, what):
    fold = tiny_run / "fold_0"
    assert main(["train", "0", "--run", str(tiny_run), *TRAIN]) == 0
    latest = fold / "checkpoint_latest.pt"
    if what == "truncated":
        latest.write_bytes(Path(fold / "checkpoint_final.pt").read_bytes()[:1000])
    else:
        torch.save({"network": {}, "state": {}, "x": Path("x")}, latest)
    (fold / "checkpoint_final.pt").unlink()
    capsys.readouterr()
    assert main(["train", "0", "--run", str(tiny_run), *TRAIN]) == 1
    line = _one_error_line(capsys)
    assert str(latest) in line
    assert ("delete it, or train with --restart" in line) == (what == "truncated"), line
