"""``autoseg summarize``: gather the folds' validation results of a run, and decide the post-processing on
all of them (see :mod:`autoseg.inference.postprocessing`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from autoseg.atomic import remove_temporaries
from autoseg.evaluation.distances import hd95
from autoseg.io import read_image
from autoseg.plans import PLANS_FILE, load_plans, select_configuration
from autoseg.runconfig import model_dir
from autoseg.typedjson import write_json_atomic

__all__ = ["summarize_run", "CROSSVAL_FILE"]

CROSSVAL_FILE = "crossval.json"


def summarize_run(run_dir: Path, configuration: str | None = None) -> dict:
    """Per-fold and pooled mean Dice per class of ``configuration`` (None: the plan's default), and the
    post-processing decision; writes ``crossval.json`` and ``postprocessing.json`` beside its folds
    (:func:`autoseg.runconfig.model_dir`).

    Raises:
        ValueError: no fold has validation results.
    """
    from autoseg.inference.postprocessing import decide_postprocessing, save_postprocessing
    from autoseg.workflows.validate import VALIDATION_DIR, reference_labels, validated_folds

    plans = select_configuration(load_plans(run_dir / PLANS_FILE), configuration)
    refs = reference_labels(run_dir)
    run_dir = model_dir(run_dir, plans.configuration)
    remove_temporaries(run_dir)
    folds = validated_folds(run_dir)
    if not folds:
        raise ValueError(f"{run_dir}: no fold has {VALIDATION_DIR}/metrics.json; train folds with autoseg train")
    per_fold, cases = {}, {}
    for f in folds:
        m = json.loads((f / VALIDATION_DIR / "metrics.json").read_text())
        per_fold[f.name] = m["mean_per_class"]
        cases.update({cid: (f, v) for cid, v in m["cases"].items()})
    names = [plans.labels[c] for c in sorted(plans.labels)[1:]]
    pooled = {n: float(np.mean([v[n]["dice"] for _, v in cases.values()])) for n in names}
    pairs, spacings = [], []
    for cid, (f, _) in sorted(cases.items()):
        ref, geometry = read_image(refs[cid])
        pairs.append((read_image(f / VALIDATION_DIR / f"{cid}.nii.gz")[0][0], ref[0]))
        spacings.append(geometry.spacing_zyx)
    pp = decide_postprocessing(pairs, sorted(plans.labels)[1:], hd95, spacings)
    save_postprocessing(pp, run_dir)
    result = {"configuration": plans.configuration, "folds": [f.name for f in folds], "n_cases": len(cases),
              "dice_per_fold": per_fold,
              "dice_pooled": pooled, "mean_foreground_dice": float(np.mean(list(pooled.values()))),
              "postprocessing": {"largest_component_classes": pp.largest_component_classes,
                                 "dice_before": {plans.labels[c]: v for c, v in pp.dice_before.items()},
                                 "dice_after": {plans.labels[c]: v for c, v in pp.dice_after.items()},
                                 "hd95_before_mm": {plans.labels[c]: v for c, v in pp.hd95_before.items()},
                                 "hd95_after_mm": {plans.labels[c]: v for c, v in pp.hd95_after.items()}}}
    write_json_atomic(result, run_dir / CROSSVAL_FILE)
    return result
