"""``autoseg find-best``: score every trained configuration and every pair's ensemble on the cross-validation
cases, choose the best, decide its post-processing, and write the choice that ``autoseg predict`` follows.

Each fold's validation saved its cases' class probabilities on the preprocessed grid, which every configuration
of a plan shares; an ensemble is their mean. Every candidate goes back to the scan's grid by the prediction path
and is scored against the original labels. Candidates are compared on the folds that all of them validated; the
best mean Dice over foreground classes wins, and a tie (within :data:`TIE`) goes to the cheaper at prediction
(fewer networks, fewer FLOPs per voxel). Mirroring at prediction is kept only where the folds' validations
measured that it raised the chosen configurations' Dice by :data:`~autoseg.defaults.MIRRORING_MIN_GAIN` or more.
A patch-free configuration that segments scans in one pass keeps doing so unless the folds' validations measured
that tiles of its training region raised its Dice by :data:`~autoseg.defaults.TILES_MIN_GAIN` or more (both
unmirrored). Its candidate scores, the mirroring decision and the post-processing come from the one pass's
validation: tiles, when chosen, scored better unmirrored, and those decisions are not re-measured on them.
"""

from __future__ import annotations

import itertools
import json
from math import prod
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from autoseg.atomic import remove_temporaries
from autoseg.defaults import MIRRORING_MIN_GAIN, TILES_MIN_GAIN
from autoseg.evaluation.distances import hd95
from autoseg.evaluation.evaluate import score_case
from autoseg.inference.choice import CandidateScore, Choice, save_choice
from autoseg.inference.postprocessing import Postprocessing, decide_postprocessing
from autoseg.io import read_image
from autoseg.plans import PLANS_FILE, Plans, configuration_names, load_plans, select_configuration
from autoseg.preprocessing.run import PREPROCESSED_DIR
from autoseg.preprocessing.storage import read_properties
from autoseg.preprocessing.transform import CaseProperties, probabilities_to_labels
from autoseg.runconfig import model_dir
from autoseg.workflows.validate import (
    PROBABILITIES_DIR,
    VALIDATION_DIR,
    load_grid_probabilities,
    reference_labels,
    unmirrored_dice,
    validated_folds,
)

__all__ = ["find_best", "TIE", "mirroring_gain", "decide_mirroring", "one_pass_change", "decide_whole_volume",
           "OnePassComparison"]

#: mean Dice differences below this are ties, decided by prediction cost
TIE = 1e-4


#: a fold's validation ``metrics.json``, parsed
Metrics = dict[str, Any]


def _validated_folds(run_dir: Path, name: str) -> dict[str, Metrics]:
    """Fold folder name -> its validation metrics, for the folds of configuration ``name`` that were validated."""
    return {f.name: json.loads((f / VALIDATION_DIR / "metrics.json").read_text())
            for f in validated_folds(model_dir(run_dir, name))}


def _probabilities_path(run_dir: Path, name: str, fold: str, case_id: str) -> Path:
    """Where fold validation saved ``case_id``'s probabilities for configuration ``name``."""
    return model_dir(run_dir, name) / fold / VALIDATION_DIR / PROBABILITIES_DIR / f"{case_id}.npz"


def _cost_per_voxel(p: Plans) -> float:
    """Forward FLOPs per voxel of the configuration ``p`` shows, from its zoom-out stage's planned step."""
    st = p.stages[-1]
    return st.estimated_step_gflops / (st.batch_size * prod(st.patch_size))


def _compared(run_dir: Path,
              plans: Plans) -> tuple[list[str], list[str], dict[str, str], dict[str, dict[str, Metrics]]]:
    """The trained configurations, the folds all of them validated, each compared case's fold, and the validated
    folds' metrics per configuration.

    Raises:
        ValueError: nothing validated, no fold in common, or a validated case without saved probabilities.
    """
    folds = {n: _validated_folds(run_dir, n) for n in configuration_names(plans)}
    trained = [n for n, f in folds.items() if f]
    if not trained:
        raise ValueError(f"{run_dir}: no configuration has a validated fold; train some first (autoseg train FOLD "
                         f"--run {run_dir} --config NAME, for the plan's {', '.join(configuration_names(plans))})")
    common = sorted(set.intersection(*(set(folds[n]) for n in trained)))
    if not common:
        have = "; ".join(f"{n}: {', '.join(folds[n])}" for n in trained)
        raise ValueError(f"{run_dir}: no fold is validated in every trained configuration ({have}); train the "
                         "same folds of each")
    missing = {f"{n}/{f}": [c for c in sorted(folds[n][f]["cases"])
                            if not _probabilities_path(run_dir, n, f, c).is_file()] for n in trained for f in common}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        what = "; ".join(f"{k}: {len(v)} of {len(folds[k.split('/')[0]][k.split('/')[1]]['cases'])} cases, e.g. "
                         f"{VALIDATION_DIR}/{PROBABILITIES_DIR}/{v[0]}.npz" for k, v in missing.items())
        raise ValueError(f"fold(s) {', '.join(missing)} have no saved validation probabilities ({what}; validated "
                         "by an older autoseg, or files removed); run their autoseg train command again: a trained "
                         "fold only re-validates")
    cases = {c: f for f in common for c in sorted(folds[trained[0]][f]["cases"])}
    return trained, common, cases, folds


def find_best(run_dir: Path, progress: bool = True) -> Choice:
    """Score the trained configurations and their pairs, choose, decide post-processing, write
    ``RUN_DIR/best_configuration.json``; returns the choice with every candidate's scores.

    Raises:
        ValueError: see :func:`_compared`.
    """
    run_dir = Path(run_dir)
    remove_temporaries(run_dir)
    if not (run_dir / PLANS_FILE).is_file():
        raise ValueError(f"{run_dir}: not a planned run (no {PLANS_FILE}); give the folder autoseg plan -o wrote")
    plans = load_plans(run_dir / PLANS_FILE)
    trained, common, cases, metrics = _compared(run_dir, plans)
    combos = [(n,) for n in trained] + list(itertools.combinations(trained, 2))
    refs = reference_labels(run_dir)
    classes = sorted(plans.labels)[1:]
    dice: dict[tuple[str, ...], dict[int, list[float]]] = {c: {k: [] for k in classes} for c in combos}
    hd: dict[tuple[str, ...], list[float]] = {c: [] for c in combos}
    for cid in tqdm(sorted(cases), desc="find-best", unit="case", disable=not progress, leave=False):
        props = read_properties(run_dir / PREPROCESSED_DIR, cid)
        probs = {n: load_grid_probabilities(_probabilities_path(run_dir, n, cases[cid], cid)) for n in trained}
        ref = read_image(refs[cid])[0][0]
        for combo in combos:
            seg = _labels(plans, [probs[n] for n in combo], props)
            for k in classes:
                s = score_case(cid, seg, ref, k, props.geometry.spacing_zyx)
                dice[combo][k].append(s.dice)
                hd[combo].append(s.hd95_mm)
    costs = {n: _cost_per_voxel(select_configuration(plans, n)) for n in trained}
    cheapest = min(costs.values()) or 1.0
    scores = [CandidateScore(list(c), {plans.labels[k]: float(np.mean(dice[c][k])) for k in classes},
                             float(np.mean([np.mean(dice[c][k]) for k in classes])), float(np.nanmean(hd[c])),
                             round(sum(costs[n] for n in c) / cheapest, 3)) for c in combos]
    top = max(s.mean_dice for s in scores)
    best = min((s for s in scores if s.mean_dice >= top - TIE), key=lambda s: (s.relative_cost, -s.mean_dice))
    pp = _postprocessing(run_dir, plans, best.configurations, cases, refs)
    reason = (f"highest mean Dice {best.mean_dice:.4f} of {len(scores)} candidates over {len(cases)} cases of "
              f"{', '.join(common)}" + (f" (ties within {TIE:g} go to the cheaper prediction)"
                                        if sum(s.mean_dice >= top - TIE for s in scores) > 1 else ""))
    gain = mirroring_gain(metrics, best.configurations, cases)
    mirroring, why = decide_mirroring(gain, len(cases))
    one_pass = [n for n in best.configurations if _predicts_whole(select_configuration(plans, n))]
    compared = one_pass_change(metrics, one_pass, cases)
    whole, why_whole = decide_whole_volume(compared) if one_pass else (True, "")
    choice = Choice(best.configurations, common, len(cases), pp, scores, reason, mirroring,
                    None if gain is None else round(gain, 5), why, whole,
                    None if compared.change is None or not one_pass else round(compared.change, 5), why_whole)
    save_choice(choice, run_dir)
    return choice


def mirroring_gain(metrics: dict[str, dict[str, Metrics]], configs: list[str], cases: dict[str, str]) -> float | None:
    """Mean over ``configs``, ``cases`` (case id -> fold) and foreground classes of the Dice with mirroring minus
    the Dice without, from the folds' validation ``metrics`` (configuration -> fold -> ``metrics.json``); None when
    a fold was validated without mirroring or by an autoseg that did not score the unmirrored prediction."""
    gains = []
    for name in configs:
        for fold in sorted(set(cases.values())):
            m = metrics[name][fold]
            plain = m.get("without_mirroring")
            if not m.get("mirroring") or plain is None:
                return None
            gains += [m["cases"][cid][k]["dice"] - d for cid, per in plain["cases"].items() if cid in cases
                      for k, d in per.items()]
    return float(np.mean(gains)) if gains else None


def decide_mirroring(gain: float | None, n_cases: int) -> tuple[bool, str]:
    """Whether prediction mirrors, and why in words: only if ``gain`` reaches :data:`MIRRORING_MIN_GAIN`."""
    if gain is None:
        return True, "mirroring kept: its gain was not measured (folds validated without mirroring or by an older " \
            "autoseg)"
    measured = f"mirroring changed the mean Dice by {gain:+.4f} on {n_cases} cases"
    if gain >= MIRRORING_MIN_GAIN:
        return True, f"{measured}: kept"
    return False, f"{measured}, less than {MIRRORING_MIN_GAIN:g}: predicting without it"


def _predicts_whole(p: Plans) -> bool:
    """Whether configuration ``p`` is a patch-free network planned to segment scans in one pass."""
    return p.network.architecture == "patch_free" and p.network.whole_volume_prediction


class OnePassComparison(NamedTuple):
    """The one pass against tiles on the compared cases: ``change``, the mean Dice of the one pass minus that of
    tiles, both unmirrored, over ``cases`` cases that went in one pass (None: none compared, ``why`` says why)."""

    change: float | None
    cases: int
    why: str = ""


def one_pass_change(metrics: dict[str, dict[str, Metrics]], configs: list[str],
                    cases: dict[str, str]) -> OnePassComparison:
    """The one pass against tiles for ``configs`` over ``cases`` (case id -> fold): per case that went in one
    pass (``one_pass_cases``) and foreground class, the unmirrored Dice of the one pass minus that of tiles
    (``tiled_without_mirroring``), averaged. Nothing is compared when a fold did not record which cases went
    in one pass (validated by an older autoseg) or had one-pass cases but no tiled prediction (left out under
    its time budget), or when no case went in one pass."""
    changes, n = [], 0
    for name in configs:
        for fold in sorted(set(cases.values())):
            m = metrics[name][fold]
            if "one_pass_cases" not in m:
                return OnePassComparison(None, 0, f"{name}/{fold} was validated by an older autoseg")
            ids = [c for c in m["one_pass_cases"] if c in cases]
            if not ids:
                continue
            tiled = m.get("tiled_without_mirroring")
            if tiled is None:
                return OnePassComparison(None, 0, f"{name}/{fold} was validated without tiles (its time budget)")
            one = unmirrored_dice(m)
            changes += [one[cid][k] - d for cid in ids for k, d in tiled["cases"][cid].items()]
            n += len(ids)
    if not changes:
        return OnePassComparison(None, 0, "no validation case fitted in one pass")
    return OnePassComparison(float(np.mean(changes)), n)


def decide_whole_volume(c: OnePassComparison) -> tuple[bool, str]:
    """Whether a patch-free choice segments scans in one pass, and why in words: by tiles only if they raised
    the Dice by :data:`TILES_MIN_GAIN` or more (``c.change``, the one pass's Dice minus the tiles', is that low)."""
    if c.change is None:
        return True, f"one pass as planned: not compared with tiles ({c.why})"
    measured = f"one pass against tiles of the training region, both unmirrored: mean Dice {c.change:+.4f} on " \
        f"{c.cases} case(s)"
    if c.change > -TILES_MIN_GAIN:
        return True, f"{measured}: one pass kept"
    return False, (f"{measured}, tiles better by {TILES_MIN_GAIN:g} or more: predicting by tiles (the candidate "
                   "scores, the mirroring decision and the post-processing were measured on the one pass)")


def _labels(plans: Plans, probs: list[np.ndarray], props: CaseProperties) -> np.ndarray:
    """The mean of ``probs`` back to the scan's grid, arg-max, as prediction does."""
    mean = probs[0]
    if len(probs) > 1:
        mean = probs[0].copy()
        for p in probs[1:]:
            mean += p
        mean /= len(probs)
    return probabilities_to_labels(mean, props, plans.resampling, sorted(plans.labels))


def _postprocessing(run_dir: Path, plans: Plans, configs: list[str], cases: dict[str, str],
                    refs: dict[str, Path]) -> Postprocessing:
    """The largest-component decision for the chosen candidate, on the same cases (Dice, or HD95 at equal Dice).
    Its label maps are rebuilt from the probabilities rather than kept from the scoring pass: keeping every
    candidate's maps of every case would hold the whole cross-validation in memory."""
    pairs, spacings = [], []
    for cid in sorted(cases):
        props = read_properties(run_dir / PREPROCESSED_DIR, cid)
        probs = [load_grid_probabilities(_probabilities_path(run_dir, n, cases[cid], cid)) for n in configs]
        pairs.append((_labels(plans, probs, props), read_image(refs[cid])[0][0]))
        spacings.append(props.geometry.spacing_zyx)
    return decide_postprocessing(pairs, sorted(plans.labels)[1:], hd95, spacings)
