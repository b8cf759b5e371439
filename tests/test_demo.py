"""``autoseg demo``, the README's first command: the whole pipeline on generated data, end to end."""

from __future__ import annotations

import json
import re

from autoseg.cli import main


def test_demo_runs_the_pipeline_and_segments_held_out_cases(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "-o", str(out_dir), "--cases", "8", "--minutes", "1"]) == 0
    out = capsys.readouterr().out
    for step in ("autoseg plan", "autoseg preprocess", "autoseg train 0", "autoseg predict", "autoseg evaluate"):
        assert f"$ {step}" in out, step
    dice = float(re.search(r"mean Dice on the 4 held-out cases: ([0-9.]+)", out).group(1))
    assert dice > 0.8, out[-3000:]
    metrics = json.loads((out_dir / "predictions" / "metrics.json").read_text())
    assert metrics["n_cases"] == 4 and abs(metrics["mean"]["dice"] - dice) < 1e-3
    # a second demo reuses everything that is done
    assert main(["demo", "-o", str(out_dir), "--cases", "8", "--minutes", "1"]) == 0
    out = capsys.readouterr().out
    assert "wrote a synthetic dataset" not in out and "already trained" in out and "skipped 4 already done" in out
