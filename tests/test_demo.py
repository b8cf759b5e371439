"""``autoseg demo``, the README's first command: the whole pipeline end to end (on generated data here; the
shipped real scans are checked for completeness and licence, and run by hand: docs/report.md has the figures)."""

from __future__ import annotations

import hashlib
import json
import re

from autoseg.cli import main
from autoseg.demo import demo_dataset


def test_demo_runs_the_pipeline_and_segments_held_out_cases(tmp_path, capsys, step_time_fixed):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--synthetic", "-o", str(out_dir), "--cases", "8", "--minutes", "1"]) == 0
    out = capsys.readouterr().out
    for step in ("autoseg plan", "autoseg preprocess", "autoseg train 0", "autoseg predict", "autoseg evaluate",
                 "autoseg summarize", "autoseg report"):
        assert f"$ {step}" in out, step
    dice = float(re.search(r"mean Dice on the 4 held-out cases: ([0-9.]+)", out).group(1))
    assert dice > 0.8, out[-3000:]
    metrics = json.loads((out_dir / "predictions" / "metrics.json").read_text())
    assert metrics["n_cases"] == 4 and abs(metrics["mean"]["dice"] - dice) < 1e-3
    assert sorted(p.name for p in (out_dir / "overlays").iterdir()) == [f"case_{i:03d}.png" for i in range(4)]
    assert (out_dir / "report.html").stat().st_size > 10_000
    # a second demo reuses everything that is done
    assert main(["demo", "--synthetic", "-o", str(out_dir), "--cases", "8", "--minutes", "1"]) == 0
    out = capsys.readouterr().out
    assert "wrote a synthetic dataset" not in out and "already trained" in out and "skipped 4 already done" in out


def test_the_shipped_real_scans_are_complete_licensed_and_verify(capsys):
    data = demo_dataset()
    meta = json.loads((data / "dataset.json").read_text())
    train = sorted(p.name for p in (data / "imagesTr").iterdir())
    held = sorted(p.name for p in (data / "imagesTs").iterdir())
    assert len(train) == meta["numTraining"] == 30 and len(held) == meta["numTest"] == 6
    assert not set(train) & set(held)
    assert sorted(p.name for p in (data / "labelsTr").iterdir()) == train
    assert sorted(p.name for p in (data / "labelsTs").iterdir()) == held
    assert "CC BY-SA 4.0" in (data / "DATA_LICENSE.md").read_text() and (data / "SOURCE.md").is_file()
    sums = dict(reversed(line.split()) for line in (data / "SHA256SUMS").read_text().splitlines())
    assert len(sums) == 72
    for name, digest in list(sums.items())[:5]:
        assert hashlib.sha256((data / name).read_bytes()).hexdigest() == digest
    assert sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) < 4 * 2**20  # a small wheel
    assert main(["verify", str(data)]) == 0, capsys.readouterr()
