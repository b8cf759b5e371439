"""A fold's own validation: predict its validation cases from the preprocessed arrays with the same
sliding-window path as ``autoseg predict``, take them back to the original geometry, and score them against
the original labels with ``autoseg evaluate``'s metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from autoseg.dataset import load_dataset
from autoseg.evaluation.evaluate import METRICS, score_case
from autoseg.fingerprint import FINGERPRINT_FILE, load_fingerprint
from autoseg.inference.predictor import PredictionMemoryError, Predictor
from autoseg.io import read_image, write_image
from autoseg.plans import Plans
from autoseg.preprocessing.run import PREPROCESSED_DIR
from autoseg.preprocessing.storage import read_case_arrays, read_properties
from autoseg.typedjson import write_json_atomic

__all__ = ["validate_fold", "reference_labels", "VALIDATION_DIR"]

VALIDATION_DIR = "validation"


def reference_labels(run_dir: Path) -> dict[str, Path]:
    """Label file of every case of the run's dataset."""
    return {c.case_id: c.label for c in load_dataset(load_fingerprint(run_dir / FINGERPRINT_FILE).dataset_dir).cases}


def validate_fold(run_dir: Path, fold_dir: Path, plans: Plans, case_ids: list[str], net: nn.Module,
                  patch: list[int], device: torch.device, progress: bool = True) -> dict:
    """Predict ``case_ids`` (mirroring on, as ``predict``), write their label maps and ``metrics.json`` to
    ``fold_dir/validation``; returns the metrics: per case and class the five metrics of ``autoseg
    evaluate``, per-class mean Dice by class name, and the mean over foreground classes."""
    out_dir = fold_dir / VALIDATION_DIR
    out_dir.mkdir(exist_ok=True)
    refs = reference_labels(run_dir)
    folder = run_dir / PREPROCESSED_DIR
    classes = sorted(plans.labels)[1:]
    predictor = Predictor(plans, [(net, patch)], device, tta=True)
    cases: dict[str, dict[str, dict[str, float]]] = {}
    for cid in tqdm(case_ids, desc="validation", unit="case", disable=not progress, leave=False):
        props = read_properties(folder, cid)
        try:
            probs = predictor.predict_preprocessed(np.asarray(read_case_arrays(folder, cid)[0][:]))
        except PredictionMemoryError as e:  # one line from the CLI, like every error a user can act on
            raise ValueError(f"validation of case {cid}: {e}; the trained checkpoint_final.pt is kept: run the same "
                             "command again (with --device cpu if the GPU is too small) to validate") from None
        seg = predictor.finish(probs, props).labels
        write_image(seg, props.geometry, out_dir / f"{cid}.nii.gz")
        ref = read_image(refs[cid])[0][0]
        cases[cid] = {}
        for c in classes:
            s = score_case(cid, seg, ref, c, props.geometry.spacing_zyx)
            cases[cid][plans.labels[c]] = {m: getattr(s, m) for m in METRICS}
    means = {plans.labels[c]: float(np.mean([v[plans.labels[c]]["dice"] for v in cases.values()])) for c in classes}
    metrics = {"metric": "Dice (and autoseg evaluate's metrics per case)", "cases": cases, "mean_per_class": means,
               "mean_foreground_dice": float(np.mean(list(means.values())))}
    write_json_atomic(metrics, out_dir / "metrics.json")
    return metrics
