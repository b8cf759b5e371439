"""What ``autoseg predict`` runs by default: find-best's choice (one configuration, or the mean of two
configurations' probabilities) with the post-processing decided for it, from ``RUN_DIR/best_configuration.json``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.inference.postprocessing import Postprocessing
from autoseg.inference.predictor import Predictor
from autoseg.typedjson import from_jsonable, read_json, write_json_atomic

__all__ = ["CandidateScore", "Choice", "CHOICE_FILE", "load_choice", "save_choice", "ConfigurationEnsemble",
           "predictor_for_run"]

CHOICE_FILE = "best_configuration.json"


@dataclass
class CandidateScore:
    """One configuration or ensemble, scored over the cross-validation cases find-best compared on.

    ``relative_cost``: prediction compute per voxel, relative to the cheapest single configuration (an
    ensemble costs the sum of its members)."""

    configurations: list[str]
    dice: dict[str, float]
    mean_dice: float
    hd95_mm: float
    relative_cost: float


@dataclass
class Choice:
    """find-best's decision: what to predict with, on which folds' validation cases it was decided, and why.

    ``mirroring``: whether prediction mirrors (test-time augmentation); ``mirroring_gain``: the mean Dice
    mirroring added on the compared cases (None: not measured, e.g. folds validated without mirroring), and
    ``mirroring_reason`` the decision in words. Choices written before these fields existed mirror.
    ``whole_volume``: whether a patch-free configuration of the choice segments a scan in one pass where its plan
    allows it (else by tiles of its training region); ``whole_volume_change``: the mean Dice of the one pass minus
    that of tiles on the compared cases, both unmirrored (None: not measured), ``whole_volume_reason`` in words
    (empty when no configuration of the choice predicts in one pass)."""

    configurations: list[str]
    folds: list[str]
    n_cases: int
    postprocessing: Postprocessing
    candidates: list[CandidateScore]
    reason: str
    mirroring: bool = True
    mirroring_gain: float | None = None
    mirroring_reason: str = ""
    whole_volume: bool = True
    whole_volume_change: float | None = None
    whole_volume_reason: str = ""


def load_choice(run_dir: Path) -> Choice | None:
    path = Path(run_dir) / CHOICE_FILE
    return from_jsonable(Choice, read_json(path)) if path.is_file() else None


def save_choice(choice: Choice, run_dir: Path) -> None:
    write_json_atomic(choice, Path(run_dir) / CHOICE_FILE)


class ConfigurationEnsemble(Predictor):
    """Several configurations of one plan as one predictor: each predicts with its own folds, patch and mirror
    axes, their probabilities on the shared preprocessed grid are averaged (configurations weigh the same,
    whatever their fold counts), then taken back to the scan's grid with ``postprocessing``."""

    def __init__(self, members: list[Predictor], postprocessing: Postprocessing | None):
        first = members[0]
        super().__init__(first.plans, [n for m in members for n in m.networks], first.device,
                         bool(first.mirror_axes), first.step, postprocessing,
                         bfloat16=any(m.bfloat16 for m in members), keep_layout=True)
        self.members = members

    def predict_preprocessed(self, data: np.ndarray) -> np.ndarray:
        total = self.members[0].predict_preprocessed(data)
        for m in self.members[1:]:
            total += m.predict_preprocessed(data)
        total /= len(self.members)
        return total


def predictor_for_run(run_dir: Path, folds: list[str] | None = None, checkpoint: str = "final",
                      device: str = "auto", tta: bool | None = None, step: float | None = None,
                      configuration: str | None = None, whole_volume: bool | None = None,
                      bfloat16: bool | None = None) -> tuple[Predictor, str]:
    """The predictor ``autoseg predict`` uses, and a few words saying which: ``configuration`` when given
    (with its own ``postprocessing.json``); else find-best's choice when the run has one; else the plan's
    default configuration. ``tta`` None: mirror as find-best's choice decided (always, without a choice).
    ``whole_volume`` None: a patch-free configuration predicts in one pass as find-best's choice decided (as its
    plan says, without a choice); else as given (:class:`Predictor`). ``bfloat16`` as in :class:`Predictor`.

    Raises:
        ValueError: see :meth:`Predictor.from_run`.
    """
    choice = None if configuration is not None else load_choice(run_dir)
    if choice is None:
        p = Predictor.from_run(run_dir, folds, checkpoint, device, tta is not False, step, configuration,
                               whole_volume is not False, bfloat16)
        return p, f"configuration {p.plans.configuration}"
    mirror = choice.mirroring if tta is None else tta
    whole = choice.whole_volume if whole_volume is None else whole_volume
    members = [Predictor.from_run(run_dir, folds, checkpoint, device, mirror, step, c, whole, bfloat16)
               for c in choice.configurations]
    what = f"find-best's choice {' + '.join(choice.configurations)} ({CHOICE_FILE}; --config NAME overrides)"
    if tta is None and not choice.mirroring:
        what += f", without mirroring ({choice.mirroring_reason}; --tta mirrors)"
    if whole_volume is None and not choice.whole_volume:
        what += f", by tiles ({choice.whole_volume_reason}; --one-pass overrides)"
    if len(members) == 1:
        members[0].postprocessing = choice.postprocessing
        return members[0], what
    return ConfigurationEnsemble(members, choice.postprocessing), what
