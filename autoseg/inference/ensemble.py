"""``autoseg ensemble``: average the saved probabilities of several predictions of the same scans (other
folds, other runs, other configurations) and write the arg-max label maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from autoseg.atomic import remove_temporaries
from autoseg.dataset import DatasetError
from autoseg.inference.folder import load_probabilities, save_probabilities
from autoseg.io import write_image

__all__ = ["ensemble_folders"]


def ensemble_folders(folders: list[Path], out_dir: Path, save_probs: bool = False, progress: bool = True) -> list[str]:
    """Average ``<case>.npz`` over ``folders`` into ``out_dir/<case>.nii.gz``; returns the case ids.

    Raises:
        DatasetError: fewer than two folders, a folder without probabilities, or a case missing from some
            folder (all problems at once, before anything is written).
        ValueError: a file that is not autoseg's probabilities, or probabilities that disagree in shape,
            labels or geometry with the first folder's; found case by case, so the message says how many
            cases were already written.
    """
    problems = []
    if len(folders) < 2:
        problems.append("give at least two prediction folders")
    cases: list[set[str]] = []
    for d in folders:
        names = {p.name[:-4] for p in d.glob("*.npz")} if d.is_dir() else set()
        if not names:
            problems.append(f"{d}: no probabilities (*.npz); predict with --save-probabilities")
        cases.append(names)
    if problems:
        raise DatasetError(problems)
    every = set.union(*cases)
    for d, names in zip(folders, cases):
        problems += [f"{d}: no {c}.npz (it is in other folders)" for c in sorted(every - names)]
    if problems:
        raise DatasetError(problems)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out_dir)  # what a killed run was writing
    done: list[str] = []
    for cid in tqdm(sorted(every), unit="case", desc="ensemble", disable=not progress):
        try:
            total, values, geo = load_probabilities(folders[0] / f"{cid}.npz")
            for d in folders[1:]:
                probs, v, g = load_probabilities(d / f"{cid}.npz")
                if probs.shape != total.shape or v != values or not np.allclose(g.spacing, geo.spacing) or \
                        not np.allclose(g.origin, geo.origin, atol=1e-2) or \
                        not np.allclose(g.direction, geo.direction, atol=1e-3):
                    raise ValueError(f"{d / (cid + '.npz')}: shape {list(probs.shape)}, labels {v} or geometry "
                                     f"differ from {folders[0] / (cid + '.npz')}")
                total += probs
        except ValueError as e:
            where = f"the {len(done)} case(s) before it are in {out_dir}" if done else "nothing was written"
            raise ValueError(f"{e}; stopped there: {where}") from None
        total /= len(folders)
        labels = np.asarray(values)[total.argmax(0)].astype(np.uint8 if max(values) < 256 else np.uint16)
        if save_probs:
            save_probabilities(total, values, geo, out_dir / f"{cid}.npz")
        write_image(labels, geo, out_dir / f"{cid}.nii.gz")
        done.append(cid)
    return done
