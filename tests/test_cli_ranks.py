"""How a process of a multi-process (torchrun) command ends when it alone fails: it says why in a line and
leaves without the process group's goodbye, which would wait on peers still inside a collective."""

from __future__ import annotations

import pytest

import autoseg.cli as cli
import autoseg.training.runtime as runtime
import autoseg.workflows.fold as fold
from autoseg.cli import main

CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


class LoneRank:
    """Rank 1 of 2 whose collectives fail as they do on a GPU that a sticky error left unusable."""

    distributed, rank, world_size, main, progress = True, 1, 2, False, False

    def __init__(self) -> None:
        self.closed = False

    def gather(self, value: object) -> list[object]:
        raise RuntimeError(CUDA_ERROR)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def lone_rank(monkeypatch) -> LoneRank:
    rt = LoneRank()
    monkeypatch.setattr(runtime, "distributed_runtime", lambda *a, **k: rt)
    return rt


def test_training_rank_that_fails_with_a_cuda_error_leaves_with_its_traceback(lone_rank, monkeypatch, tmp_path,
                                                                             capsys):
    def fail(*args, **kwargs):
        raise RuntimeError(CUDA_ERROR)

    monkeypatch.setattr(fold, "train_fold", fail)
    assert main(["train", "0", "--run", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"error: rank 1 of 2: {CUDA_ERROR}" in err and "Traceback" in err
    assert not lone_rank.closed


def test_training_rank_with_one_of_our_errors_says_one_line(lone_rank, monkeypatch, tmp_path, capsys):
    def fail(*args, **kwargs):
        raise ValueError("out of memory (RAM) in zoom_in step 3")

    monkeypatch.setattr(fold, "train_fold", fail)
    assert main(["train", "0", "--run", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: rank 1 of 2: out of memory (RAM) in zoom_in step 3"
    assert not lone_rank.closed


def test_predicting_rank_whose_gpu_failed_says_its_outcome_without_the_gather(lone_rank, monkeypatch, tmp_path,
                                                                             capsys):
    stopped = "rank 1: case c7: the GPU failed (CUDA error) and stays unusable in this process"
    monkeypatch.setattr(cli, "_predict_share", lambda args, rt: {
        "written": ["c1"], "skipped": [], "failed": {}, "stopped": stopped, "networks": 1})
    assert main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--run", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"error: {stopped}" in captured.err
    assert f"error: rank 1 of 2 could not reach the other processes ({CUDA_ERROR})" in captured.err
    assert "predicted 1 case(s)" in captured.out
    assert not lone_rank.closed
