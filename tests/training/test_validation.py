"""A fold's validation scores each case with and without mirroring, so find-best can decide whether mirroring
pays for itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.evaluation.evaluate import dice_score
from autoseg.inference.predictor import Predictor
from autoseg.io import read_image
from autoseg.plans import load_plans
from autoseg.preprocessing.storage import read_case_arrays, read_properties
from autoseg.workflows.validate import VALIDATION_DIR, reference_labels, validate_fold

CPU = torch.device("cpu")


class Ramp(nn.Module):
    """Class scores from the intensity plus a ramp along the last axis: mirroring along that axis averages the
    ramp away, so the mirrored and the unmirrored predictions differ (by a known cause)."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-2, 2, x.shape[-1]).expand_as(x[:, :1])
        return torch.cat([torch.zeros_like(x[:, :1])] + [x[:, :1] * k + ramp for k in range(1, self.classes)], 1)


@pytest.mark.parametrize("tta", [True, False])
def test_mirrored_validation_also_scores_the_unmirrored_prediction(tiny_run, tta):
    plans = load_plans(tiny_run / "plans.json")
    cases = plans.folds[0].val
    fold = tiny_run / "fold_0"
    fold.mkdir()
    net, patch = Ramp(len(plans.labels)), list(plans.stages[-1].patch_size)
    metrics = validate_fold(tiny_run, fold, plans, cases, net, patch, CPU, progress=False, tta=tta)
    assert json.loads((fold / VALIDATION_DIR / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["mirroring"] is tta
    assert "tiled_without_mirroring" not in metrics  # no case went through the network in one pass
    if not tta:
        assert "without_mirroring" not in metrics
        return
    plain = Predictor(plans, [(net, patch)], CPU, tta=False)
    names = {k: plans.labels[k] for k in sorted(plans.labels)[1:]}
    refs = reference_labels(tiny_run)
    want = {}
    for cid in cases:
        probs = plain.predict_preprocessed(np.asarray(read_case_arrays(tiny_run / "preprocessed", cid)[0][:]))
        seg = plain.finish(probs, read_properties(tiny_run / "preprocessed", cid)).labels
        ref = read_image(refs[cid])[0][0]
        want[cid] = {name: dice_score(seg, ref, k) for k, name in names.items()}
    got = metrics["without_mirroring"]
    assert set(got["cases"]) == set(want)
    for cid in cases:
        assert got["cases"][cid] == pytest.approx(want[cid])
    means = {n: float(np.mean([want[c][n] for c in cases])) for n in names.values()}
    assert got["mean_per_class"] == pytest.approx(means)
    assert got["mean_foreground_dice"] == pytest.approx(np.mean(list(means.values())))
    mirrored = {c: {n: v["dice"] for n, v in per.items()} for c, per in metrics["cases"].items()}
    # the ramp makes the two predictions differ: the test sees both
    assert any(mirrored[c] != pytest.approx(want[c]) for c in cases)


def test_dice_score_convention():
    a = np.array([0, 1, 1, 2])
    b = np.array([0, 1, 2, 2])
    assert dice_score(a, b, 1) == pytest.approx(2 / 3)
    assert dice_score(a, b, 3) == 1.0  # absent from both
    assert dice_score(a, np.zeros(4, int), 1) == 0.0
