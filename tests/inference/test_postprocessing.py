"""Largest-component post-processing: by hand, the decision rule, and ``autoseg summarize`` on a run."""

from __future__ import annotations

import json

import numpy as np

from autoseg.cli import main
from autoseg.inference.postprocessing import decide_postprocessing, keep_largest_component, load_postprocessing


def test_keep_largest_component_by_hand():
    a = np.zeros((1, 3, 10), np.uint8)
    a[0, 1, 0:4] = 1  # 4 voxels
    a[0, 1, 6:8] = 1  # 2 voxels, separate
    a[0, 0, 9] = 2
    a[0, 2, 9] = 2  # class 2: two single voxels
    out = keep_largest_component(a, 1)
    assert out[0, 1, 0:4].tolist() == [1] * 4 and out[0, 1, 6:8].tolist() == [0, 0]
    assert (out == 2).sum() == 2  # other classes untouched
    # diagonal neighbours are separate components (face connectivity)
    b = np.zeros((2, 2, 2), np.uint8)
    b[0, 0, 0] = b[1, 1, 1] = 1
    assert (keep_largest_component(b, 1) == 1).sum() == 1


def test_decision_adopts_only_what_helps():
    ref = np.zeros((1, 1, 20), np.uint8)
    ref[0, 0, 2:8] = 1
    ref[0, 0, 12:14] = 2
    ref[0, 0, 17:19] = 2  # class 2 really has two components
    pred = ref.copy()
    pred[0, 0, 10] = 1  # a spurious class-1 island: removing it helps class 1
    pp = decide_postprocessing([(pred, ref)], [1, 2])
    assert pp.largest_component_classes == [1]
    assert pp.dice_after[1] > pp.dice_before[1]
    assert pp.dice_after[2] < pp.dice_before[2]  # keeping one of class 2's two parts would hurt


def test_summarize_writes_decision_and_predict_applies_it(trained_run, capsys):
    assert main(["summarize", "--run", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "fold_0" in out and "fold_1" in out and "postprocess" in out
    cv = json.loads((trained_run / "crossval.json").read_text())
    assert cv["folds"] == ["fold_0", "fold_1"] and cv["n_cases"] == 4
    pp = load_postprocessing(trained_run)
    assert pp is not None and pp.n_cases == 4
    from autoseg.inference.predictor import Predictor

    assert Predictor.from_run(trained_run, tta=False).postprocessing == pp
