"""Largest-component post-processing: by hand, the decision rule, and ``autoseg summarize`` on a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from autoseg.cli import main
from autoseg.evaluation.distances import hd95
from autoseg.inference.postprocessing import (
    DICE_TOLERANCE,
    decide_postprocessing,
    keep_largest_component,
    load_postprocessing,
)


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


def test_a_far_island_is_removed_at_equal_dice_when_it_sets_the_hd95():
    """An organ of 400 voxels predicted with one voxel missed (so in two pieces, 338 + 61) and a 72-voxel island
    500 voxels away: keeping the largest piece drops the island (Dice +) and the 61-voxel true piece (Dice -),
    a net -0.0002 that nnU-Net's Dice-only rule rejects, while the HD95 falls from 528.5 to 25.15 mm."""
    ref = np.zeros((1, 1, 1000), np.uint8)
    ref[0, 0, :400] = 1
    pred = ref.copy()
    pred[0, 0, 338] = 0
    pred[0, 0, 900:972] = 1
    dice_only = decide_postprocessing([(pred, ref)], [1])
    assert dice_only.largest_component_classes == []
    assert dice_only.dice_before[1] == 2 * 399 / (471 + 400)
    assert dice_only.dice_after[1] == 2 * 338 / (338 + 400)
    assert -DICE_TOLERANCE < dice_only.dice_after[1] - dice_only.dice_before[1] < 0
    pp = decide_postprocessing([(pred, ref)], [1], hd95, [(1.0, 1.0, 1.0)])
    assert pp.largest_component_classes == [1]
    assert pp.hd95_before[1] == 528.5 and abs(pp.hd95_after[1] - 25.15) < 1e-9
    # the same at a Dice cost above the tolerance: not adopted, whatever the distance
    pred[0, 0, 200] = 0  # now 200 + 137 + 61 voxels: keeping the largest loses much more than 0.001
    assert decide_postprocessing([(pred, ref)], [1], hd95, [(1.0, 1.0, 1.0)]).largest_component_classes == []


def test_summarize_writes_decision_and_predict_applies_it(trained_run, tmp_path, capsys):
    # a copy: the decision it writes would otherwise apply to every later test of the session's trained run
    trained_run = Path(shutil.copytree(trained_run, tmp_path / "run", symlinks=True))
    assert main(["summarize", "--run", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "fold_0" in out and "fold_1" in out and "postprocess" in out
    cv = json.loads((trained_run / "crossval.json").read_text())
    assert cv["folds"] == ["fold_0", "fold_1"] and cv["n_cases"] == 4
    pp = load_postprocessing(trained_run)
    assert pp is not None and pp.n_cases == 4
    from autoseg.inference.predictor import Predictor

    assert Predictor.from_run(trained_run, tta=False).postprocessing == pp
