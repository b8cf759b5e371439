"""``autoseg evaluate``: score a folder of predicted label maps against a folder of references.

Per case and class: Dice, 95th-percentile Hausdorff distance and average symmetric surface distance (mm),
true-positive rate and precision; per class: their means and the micro-Dice over the dataset (true and false
positives and negatives summed over all cases before the ratio). Written to ``metrics.json`` and
``metrics.csv`` in the prediction folder. Conventions (never NaN): a ratio 0/0 is 1 when the class is absent
from both masks and 0 otherwise; distances are 0 when both are empty and the image diagonal when one is.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.atomic import atomic_path, remove_temporaries
from autoseg.dataset import DatasetError
from autoseg.evaluation.distances import surface_scores
from autoseg.io import ImageReadError, read_image, strip_suffix
from autoseg.typedjson import write_json_atomic
from autoseg.verify import geometry_mismatch, non_integer_voxels

__all__ = ["CaseScores", "score_case", "dice_score", "evaluate_folders", "EvaluationError", "METRICS", "format_table",
           "ratio"]

METRICS = ("dice", "hd95_mm", "assd_mm", "tpr", "precision")


class EvaluationError(DatasetError):
    """The folders cannot be evaluated; ``problems`` has one line per problem."""


def ratio(num: int, den: int, both_empty: bool) -> float:
    """``num / den``; for 0/0: 1 when the class is in neither mask, else 0."""
    if den:
        return num / den
    return 1.0 if both_empty else 0.0


@dataclass
class CaseScores:
    """One case, one class: the five metrics and the counts the micro-Dice sums."""

    case_id: str
    label: int
    dice: float
    hd95_mm: float
    assd_mm: float
    tpr: float
    precision: float
    tp: int
    fp: int
    fn: int


def _counts(pred: np.ndarray, ref: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """The masks of ``label`` and their true-positive, false-positive and false-negative voxel counts."""
    p, r = pred == label, ref == label
    tp = int(np.count_nonzero(p & r))
    return p, r, tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(r)) - tp


def dice_score(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    """The Dice of ``label`` in one case, with :func:`score_case`'s convention (1 when absent from both)."""
    _p, _r, tp, fp, fn = _counts(pred, ref, label)
    return ratio(2 * tp, 2 * tp + fp + fn, tp + fp + fn == 0)


def score_case(case_id: str, pred: np.ndarray, ref: np.ndarray, label: int,
               spacing: tuple[float, ...]) -> CaseScores:
    """The metrics of ``label`` in one case; ``spacing`` in array axis order (mm)."""
    p, r, tp, fp, fn = _counts(pred, ref, label)
    empty = tp + fp + fn == 0
    hd, mean_distance = surface_scores(p, r, spacing)
    return CaseScores(case_id, label, ratio(2 * tp, 2 * tp + fp + fn, empty), hd, mean_distance,
                      ratio(tp, tp + fn, empty), ratio(tp, tp + fp, empty), tp, fp, fn)


def _cases(folder: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(folder.iterdir()):
        cid = strip_suffix(f.name)
        if cid is not None and not f.name.startswith("."):
            out[cid] = f
    return out


def evaluate_folders(pred_dir: Path, ref_dir: Path, labels: list[int] | None = None) -> dict:
    """Score every reference case that has a prediction; write ``metrics.json`` and ``metrics.csv``.

    Raises:
        EvaluationError: a folder is missing or empty, a reference has no prediction, a file cannot be read,
            a prediction's shape, spacing, origin or direction differs from its reference, a label map holds
            non-integer values (NaN included), or no case holds a foreground label to score (all problems at
            once).
    """
    problems = [f"{d}: not a folder" for d in (pred_dir, ref_dir) if not d.is_dir()]
    if problems:
        raise EvaluationError(problems)
    remove_temporaries(pred_dir)  # a metrics file a killed run was writing
    preds, refs = _cases(pred_dir), _cases(ref_dir)
    if not refs:
        raise EvaluationError([f"{ref_dir}: no images (.nii.gz, .nii, .nrrd, .mha) found"])
    problems = [f"{ref_dir / refs[c].name}: no prediction {c}.* in {pred_dir}" for c in refs if c not in preds]
    loaded = {}
    for cid, ref_path in refs.items():
        if cid not in preds:
            continue
        try:
            ref, g_ref = read_image(ref_path)
        except ImageReadError as e:
            problems.append(f"case {cid}: {ref_path}: {e}")
            continue
        try:
            pred, g_pred = read_image(preds[cid])
        except ImageReadError as e:
            problems.append(f"case {cid}: {preds[cid]}: {e}")
            continue
        if ref.shape != pred.shape or not np.allclose(g_ref.spacing_zyx, g_pred.spacing_zyx, rtol=1e-3):
            problems.append(f"case {cid}: prediction {preds[cid].name} has shape {list(pred.shape[1:])} and spacing "
                            f"{list(g_pred.spacing_zyx)}, the reference {list(ref.shape[1:])} and "
                            f"{list(g_ref.spacing_zyx)}")
            continue
        diff = geometry_mismatch(g_pred, g_ref)
        if diff:
            problems.append(f"case {cid}: prediction {preds[cid].name}: {diff} of the reference {ref_path.name}; "
                            "they must cover the same voxels")
            continue
        wrong = [f"case {cid}: {path}: {bad[0]} voxel(s) hold non-integer values such as {bad[1]:g}; expected "
                 "integer labels" for path, bad in ((preds[cid], non_integer_voxels(pred)),
                                                    (ref_path, non_integer_voxels(ref))) if bad]
        if wrong:
            problems += wrong
            continue
        loaded[cid] = (np.rint(pred[0]).astype(np.int64), np.rint(ref[0]).astype(np.int64), g_ref.spacing_zyx)
    if problems:
        raise EvaluationError(problems)
    if labels is None:
        labels = sorted({int(v) for p, r, _ in loaded.values() for v in np.union1d(np.unique(p), np.unique(r))} - {0})
    if not labels:
        raise EvaluationError([f"{pred_dir} and {ref_dir}: every prediction and reference is background only; "
                               "nothing to score (give --labels to score classes absent from both)"])
    scores = [score_case(cid, p, r, lab, tuple(sp)) for cid, (p, r, sp) in loaded.items() for lab in labels]
    result = _summarise(scores, labels)
    write_json_atomic(result, pred_dir / "metrics.json")
    _write_csv(scores, pred_dir / "metrics.csv")
    return result


def _summarise(scores: list[CaseScores], labels: list[int]) -> dict:
    per_class = {}
    for lab in labels:
        rows = [s for s in scores if s.label == lab]
        tp, fp, fn = (sum(getattr(s, k) for s in rows) for k in ("tp", "fp", "fn"))
        per_class[str(lab)] = {**{m: float(np.mean([getattr(s, m) for s in rows])) for m in METRICS},
                               "micro_dice": ratio(2 * tp, 2 * tp + fp + fn, tp + fp + fn == 0)}
    cases: dict[str, dict] = {}
    for s in scores:
        cases.setdefault(s.case_id, {})[str(s.label)] = {m: getattr(s, m) for m in METRICS}
    mean = {m: float(np.mean([c[m] for c in per_class.values()])) for m in (*METRICS, "micro_dice")}
    return {"conventions": "0/0 ratios: 1 if the class is absent from both masks, else 0; distances: 0 if both "
            "empty, the image diagonal (mm) if one is", "labels": labels, "n_cases": len(cases),
            "mean_per_class": per_class, "mean": mean, "cases": cases}


def _write_csv(scores: list[CaseScores], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", "label", *METRICS])
    for s in scores:
        w.writerow([s.case_id, s.label, *(f"{getattr(s, m):.6g}" for m in METRICS)])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def format_table(result: dict) -> str:
    """Per-class means and the mean over classes, one row each."""
    head = f"{'label':>8} " + " ".join(f"{m:>10}" for m in (*METRICS, "micro_dice"))
    rows = [head]
    for lab, v in result["mean_per_class"].items():
        rows.append(f"{lab:>8} " + " ".join(f"{v[m]:>10.4f}" for m in (*METRICS, "micro_dice")))
    rows.append(f"{'mean':>8} " + " ".join(f"{result['mean'][m]:>10.4f}" for m in (*METRICS, "micro_dice")))
    return "\n".join(rows)
