"""A tiny run with one briefly trained fold, shared by the prediction tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoseg.cli import main
from autoseg.demo import make_synthetic_dataset
from autoseg.runconfig import Overrides
from autoseg.training.runtime import Runtime
from autoseg.workflows.fold import train_fold


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    data = make_synthetic_dataset(root / "data", n_cases=6, shape=(20, 24, 22), spacing_xyz=(1.0, 1.0, 1.5))
    run = root / "run"
    assert main(["plan", str(data), "-o", str(run), "--device", "cpu", "--folds", "3", "--no-progress"]) == 0
    assert main(["preprocess", str(run), "--no-progress"]) == 0
    rt = Runtime(torch.device("cpu"), workers=0, progress=False)
    for fold in ("0", "1"):
        train_fold(run, fold, Overrides("both", 2, 5, None), rt, say=lambda s: None)
    return run
