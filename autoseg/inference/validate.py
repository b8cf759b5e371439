"""A fold's own validation: predict its validation cases from the preprocessed arrays with the full
sliding-window path, take them back to the original geometry, and score them against the original labels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from autoseg.dataset import load_dataset
from autoseg.evaluation.metrics import confusion, dice, nanmean
from autoseg.fingerprint import FINGERPRINT_FILE, load_fingerprint
from autoseg.inference.sliding_window import predict_logits
from autoseg.io import read_image, write_image
from autoseg.plans import Plans
from autoseg.preprocessing.run import PREPROCESSED_DIR
from autoseg.preprocessing.storage import read_case_arrays, read_properties
from autoseg.preprocessing.transform import probabilities_to_original
from autoseg.typedjson import write_json_atomic

__all__ = ["validate_fold", "VALIDATION_DIR"]

VALIDATION_DIR = "validation"


def validate_fold(run_dir: Path, fold_dir: Path, plans: Plans, case_ids: list[str], net: nn.Module,
                  patch: list[int], device: torch.device, progress: bool = True) -> dict:
    """Predict ``case_ids``, write their label maps and ``metrics.json`` to ``fold_dir/validation``; returns
    the metrics (per case and class Dice, per-class means, and the mean over foreground classes)."""
    out_dir = fold_dir / VALIDATION_DIR
    out_dir.mkdir(exist_ok=True)
    labels_by_case = {c.case_id: c.label for c in load_dataset(load_fingerprint(run_dir / FINGERPRINT_FILE)
                                                                 .dataset_dir).cases}
    folder = run_dir / PREPROCESSED_DIR
    classes = sorted(plans.labels)[1:]
    net.eval()
    per_case: dict[str, dict[str, float | None]] = {}
    for cid in tqdm(case_ids, desc="validation", unit="case", disable=not progress, leave=False):
        props = read_properties(folder, cid)
        data = torch.from_numpy(np.asarray(read_case_arrays(folder, cid)[0][:]))
        logits = predict_logits(net, data, patch, plans.inference.tile_step, plans.inference.mirror_axes,
                                plans.inference.gaussian_sigma_scale, device, amp=plans.amp)
        probs = torch.softmax(logits, 0).numpy()
        seg = probabilities_to_original(probs, props, plans.resampling).argmax(0).astype(np.uint8)
        write_image(seg, props.geometry, out_dir / f"{cid}.nii.gz")
        ref = read_image(labels_by_case[cid])[0][0]
        scores = [dice(*confusion(seg, ref, c)) for c in classes]
        per_case[cid] = {plans.labels[c]: (None if math.isnan(s) else s) for c, s in zip(classes, scores)}
    means = {}
    for c in classes:
        vals = [v[plans.labels[c]] for v in per_case.values()]
        means[plans.labels[c]] = nanmean([math.nan if x is None else x for x in vals])
    metrics = {"metric": "Dice", "cases": per_case, "mean_per_class": means,
               "mean_foreground_dice": nanmean(list(means.values()))}
    write_json_atomic(metrics, out_dir / "metrics.json")
    return metrics
