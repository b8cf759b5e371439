"""A small planned and preprocessed synthetic run, shared by the training tests (built once per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autoseg.cli import main
from autoseg.demo import make_synthetic_dataset


@pytest.fixture(scope="session")
def tiny_run_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    data = make_synthetic_dataset(root / "data", n_cases=10, shape=(24, 32, 28), spacing_xyz=(1.0, 1.0, 1.0))
    run = root / "run"
    assert main(["plan", str(data), "-o", str(run), "--device", "cpu", "--folds", "5", "--no-progress"]) == 0
    assert main(["preprocess", str(run), "--no-progress"]) == 0
    return run


@pytest.fixture()
def tiny_run(tiny_run_template, tmp_path) -> Path:
    """A private copy (the dataset folder it points to is shared and read-only by convention)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run_template, run)
    return run
