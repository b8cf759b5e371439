"""``autoseg demo``, the README's first command: a synthetic dataset planned and preprocessed."""

from __future__ import annotations

from autoseg.cli import main
from autoseg.plans import load_plans


def test_demo_runs_plan_and_preprocess(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "--cases", "4"]) == 0
    out = capsys.readouterr().out
    assert "wrote a synthetic dataset of 4 cases" in out and "preprocessed 4 case(s)" in out
    run = tmp_path / "demo" / "run"
    assert len(load_plans(run / "plans.json").folds) == 4
    assert len(list((run / "preprocessed").glob("*.json"))) == 4
    # a second demo reuses the dataset and skips what is done
    assert main(["demo", "-o", str(tmp_path / "demo"), "--cases", "4"]) == 0
    out = capsys.readouterr().out
    assert "wrote a synthetic dataset" not in out and "skipped 4 already done" in out
