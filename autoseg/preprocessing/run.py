"""``autoseg preprocess``: every training case of a planned run, in parallel, resumable, atomic."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg import defaults
from autoseg.atomic import remove_temporaries
from autoseg.dataset import CaseFiles, DatasetError, DatasetSpec, files_stamp, load_dataset
from autoseg.fingerprint import FINGERPRINT_FILE, Fingerprint, load_fingerprint
from autoseg.locking import JobLock
from autoseg.parallel import choose_workers, run_over_cases
from autoseg.planning.spacing import resampled_shape
from autoseg.plans import PLANS_FILE, Plans, load_plans
from autoseg.preprocessing.storage import CASE_FILES, case_is_complete, store_reference, stored_references, write_case
from autoseg.preprocessing.transform import forward
from autoseg.typedjson import SchemaError, to_jsonable
from autoseg.verify import read_case

__all__ = ["PreprocessReport", "preprocess_run", "PREPROCESSED_DIR"]

PREPROCESSED_DIR = "preprocessed"
log = logging.getLogger(__name__)


@dataclass
class PreprocessReport:
    """What a run did: cases written now, cases skipped as already done, workers used, output folder."""

    written: list[str]
    skipped: list[str]
    workers: int
    folder: Path


def _settings_key(plans: Plans) -> str:
    """Hash of the plan fields that change preprocessed arrays."""
    relevant = {"v": defaults.PREPROCESSING_VERSION, "spacing": plans.target_spacing,
                "norm": to_jsonable(plans.normalization), "resampling": to_jsonable(plans.resampling),
                "labels": to_jsonable(plans.labels), "locations": defaults.CLASS_LOCATIONS_PER_CLASS,
                "patch": plans.stages[-1].patch_size}
    return json.dumps(relevant, sort_keys=True)


def _source_key(case: CaseFiles, settings: str) -> str:
    stamp = files_stamp((*case.images, case.label))
    return hashlib.sha256(f"{settings}|{stamp}".encode()).hexdigest()[:32]


def preprocess_case(case: CaseFiles, plans: Plans, folder: Path, source_key: str) -> list[int]:
    """Read, verify, transform and store one case (runs in a worker). Returns the stored shape.

    Raises:
        ValueError: the case no longer passes verification (the message names the problems).
    """
    loaded, problems = read_case(case, len(plans.channel_names), plans.labels)
    if loaded is None:
        raise ValueError("; ".join(problems))
    data, seg, locations, props = forward(loaded.image, loaded.label, loaded.geometry, plans, case.case_id,
                                          source_key)
    assert seg is not None
    store_reference(case.label, folder, case.case_id)  # before the JSON that marks the case complete
    write_case(folder, data, seg, locations, props, plans.stages[-1].patch_size)
    return props.shape_after_resampling


def _bytes_per_worker(fp: Fingerprint, plans: Plans) -> int:
    """Peak memory of one worker on the largest case: the original image and label, float copies for
    normalisation and resampling, and two float volumes for the label arg-max, at both resolutions."""
    worst = 0
    n_ch = len(plans.channel_names)
    for c in fp.cases:
        before = int(np.prod(c.shape))
        after = int(np.prod(resampled_shape(c.shape_after_crop, c.spacing, plans.target_spacing)))
        worst = max(worst, before * (4 * n_ch * 2 + 4 + 8) + after * (4 * n_ch * 2 + 4 * 3 + 2))
    return worst + 300 * 2**20  # interpreter, numpy, SimpleITK


def _remove_unplanned(folder: Path, planned: set[str]) -> None:
    """Delete stored cases that the current plan no longer has (removed from the dataset, then re-planned),
    JSON first so that a crash in between leaves no case that looks complete."""
    references = stored_references(folder)
    for props in folder.glob("*.json"):
        case_id = props.name[: -len(".json")]
        if case_id not in planned:
            for suffix in CASE_FILES[::-1]:
                (folder / f"{case_id}{suffix}").unlink(missing_ok=True)
            if case_id in references:
                references[case_id].unlink()
            log.info("removed %s: no longer in the plan", case_id)


def preprocess_run(run_dir: Path, workers: int | None = None, progress: bool = True,
                   force: bool = False) -> PreprocessReport:
    """Preprocess every training case of ``run_dir`` into ``run_dir/preprocessed``.

    Cases already complete and unchanged are skipped unless ``force``; leftovers of an interrupted run are
    removed first.

    Raises:
        SchemaError: the run has no valid plan or fingerprint.
        DatasetError: the dataset folder is gone or its cases changed beyond use.
        CaseError: a case failed (names the case).
        LockedError: another process is preprocessing this run.
    """
    run_dir = Path(run_dir)
    for name in (PLANS_FILE, FINGERPRINT_FILE):
        if not (run_dir / name).is_file():
            raise SchemaError(f"{run_dir / name}: missing; run 'autoseg plan DATASET_DIR -o {run_dir}' first")
    plans = load_plans(run_dir / PLANS_FILE)
    fp = load_fingerprint(run_dir / FINGERPRINT_FILE)
    spec = load_dataset(fp.dataset_dir)
    missing = [c.case_id for c in fp.cases if c.case_id not in {s.case_id for s in spec.cases}]
    if missing:
        raise DatasetError([f"{fp.dataset_dir}: case {m} was planned but is no longer in the dataset; "
                            "re-run autoseg plan" for m in missing])
    with JobLock(run_dir / ".preprocess.lock", f"autoseg preprocess {run_dir}"):
        return _preprocess_locked(run_dir, plans, fp, spec, workers, progress, force)


def _preprocess_locked(run_dir: Path, plans: Plans, fp: Fingerprint, spec: DatasetSpec, workers: int | None,
                       progress: bool, force: bool) -> PreprocessReport:
    """:func:`preprocess_run` once this process alone preprocesses the run."""
    folder = run_dir / PREPROCESSED_DIR
    folder.mkdir(exist_ok=True)
    removed = remove_temporaries(folder)
    if removed:
        log.info("removed %d file(s) left by an interrupted run", removed)
    settings = _settings_key(plans)
    planned = {c.case_id for c in fp.cases}
    _remove_unplanned(folder, planned)
    jobs, skipped = [], []
    references = stored_references(folder)
    for case in spec.cases:
        if case.case_id not in planned:
            continue
        key = _source_key(case, settings)
        if not force and case_is_complete(folder, case.case_id, key):
            skipped.append(case.case_id)
            if case.case_id not in references:  # preprocessed by a version that kept no copy
                store_reference(case.label, folder, case.case_id)
        else:
            jobs.append((case.case_id, (case, plans, folder, key)))
    n_workers = choose_workers(len(jobs), _bytes_per_worker(fp, plans), workers) if jobs else 0
    run_over_cases(preprocess_case, jobs, n_workers, "preprocess", progress)
    return PreprocessReport([cid for cid, _ in jobs], skipped, n_workers, folder)
