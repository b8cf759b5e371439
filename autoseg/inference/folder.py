"""``autoseg predict`` over a folder: find the cases; while the network works on one case, a reader thread
reads and preprocesses the next and a writer thread takes the previous back to its grid and writes it;
failures are reported by name and the other cases go on, except a sticky GPU error (the CUDA context is
broken, every later case would fail the same way), which stops the run after the finished cases are written.

Input naming: nnU-Net's ``<case>_0000.nii.gz, _0001, ...`` (one file per channel) or MSD's ``<case>.nii.gz``
(one file, 4D for several channels). Outputs: ``<case>`` + the input's ending, a label map on the input's
exact grid; with probabilities also ``<case>.npz`` (``probabilities`` float16 ``(K, z, y, x)`` + geometry).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from autoseg.atomic import WriteError, atomic_path, remove_temporaries
from autoseg.device import is_out_of_memory
from autoseg.inference.predictor import Prediction, Predictor, fill_nonfinite, first_line
from autoseg.io import Geometry, ImageReadError, read_image, strip_suffix, write_image
from autoseg.overlays import OverlayRow, largest_structure_slices, render_overlays
from autoseg.parallel import CaseError
from autoseg.preprocessing.transform import CaseProperties
from autoseg.verify import geometry_mismatch

__all__ = ["ScanCase", "find_scans", "predict_folder", "FolderReport", "save_probabilities", "load_probabilities",
           "RunStoppedError", "DeviceFailedError", "OutputFailedError", "is_sticky_device_error", "share_by_size"]

log = logging.getLogger(__name__)
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass(frozen=True)
class ScanCase:
    """One scan to predict: its files (one per channel, or one 4D file) and the output's ending."""

    case_id: str
    files: tuple[Path, ...]
    ending: str


@dataclass
class FolderReport:
    """Case ids written in this run, skipped as already done, and failed (with a one-line reason)."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class RunStoppedError(CaseError):
    """The run stopped on a case because every later case would fail the same way.

    Attributes:
        report: what had been written, skipped and failed before the stop; every written file is complete.
    """

    def __init__(self, case_id: str, detail: str, report: FolderReport):
        super().__init__(case_id, detail)
        self.report = report


class DeviceFailedError(RunStoppedError):
    """The GPU failed on a case with a sticky error (see :func:`is_sticky_device_error`)."""


class OutputFailedError(RunStoppedError):
    """An output file could not be written (full disk, quota, permissions)."""


def is_sticky_device_error(exc: BaseException) -> bool:
    """True for a GPU error after which the CUDA context is unusable, so that every later case would fail
    the same way: a device-side assert, an illegal memory access, a lost device. PyTorch raises these as
    ``torch.AcceleratorError`` (recent versions) or as a ``RuntimeError`` whose message contains
    ``CUDA error``. Running out of memory is not sticky (the memory is back once the tensors are freed)."""
    if is_out_of_memory(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


def find_scans(folder: Path, n_channels: int) -> tuple[list[ScanCase], list[str]]:
    """The cases in ``folder`` and one problem line per file that cannot form a case.

    Files named ``<case>_NNNN`` are channels of ``<case>`` when the run has several channels or when a
    ``_0000`` file exists; anything else is a single-file case.
    """
    groups: dict[str, dict[int, Path]] = {}
    singles: dict[str, Path] = {}
    endings: dict[str, str] = {}
    cases, problems = [], []
    twice: set[str] = set()
    for f in sorted(folder.iterdir()):
        stem = strip_suffix(f.name)
        if stem is None or f.name.startswith(".") or not f.is_file():
            continue
        m = _CHANNEL.match(stem)
        if m:
            chans = groups.setdefault(m["case"], {})
            if int(m["ch"]) in chans:
                problems.append(f"case {m['case']}: two files for channel {m['ch']}, {chans[int(m['ch'])].name} and "
                                f"{f.name}; keep one")
                twice.add(m["case"])
            chans[int(m["ch"])] = f
            endings[m["case"]] = f.name[len(stem):]
        else:
            if stem in singles:
                problems.append(f"case {stem}: two files, {singles[stem].name} and {f.name}; keep one")
                twice.add(stem)
            singles[stem] = f
            endings[stem] = f.name[len(stem):]
    for cid in twice:
        groups.pop(cid, None)
        singles.pop(cid, None)
    as_channels = {}  # the groups read as channel files, complete or not
    for cid, chans in groups.items():
        if 0 not in chans and n_channels == 1:  # e.g. "scan_2024": not a channel suffix
            for ch, f in chans.items():
                singles[f"{cid}_{ch:04d}"] = f
            continue
        as_channels[cid] = chans
        if sorted(chans) != list(range(n_channels)):
            problems.append(f"case {cid}: channel files {[f'_{c:04d}' for c in sorted(chans)]}; the run expects "
                            f"{[f'_{c:04d}' for c in range(n_channels)]}")
            continue
        cases.append(ScanCase(cid, tuple(chans[c] for c in range(n_channels)), endings[cid]))
    clash = sorted(set(as_channels) & set(singles))  # "a.nii.gz" and "a_0000.nii.gz": one prediction for both
    problems += [f"case {cid}: both {singles[cid].name} and channel file(s) "
                 f"{', '.join(f.name for _, f in sorted(as_channels[cid].items()))}; keep one naming" for cid in clash]
    cases = [c for c in cases if c.case_id not in clash]
    cases += [ScanCase(cid, (f,), f.name[len(cid):]) for cid, f in singles.items() if cid not in clash]
    return sorted(cases, key=lambda c: c.case_id), problems


def share_by_size(cases: list[ScanCase], world: int) -> list[list[ScanCase]]:
    """The cases of each of ``world`` processes: largest first to the process with the fewest bytes so far
    (files' sizes on disk stand for the work), so that a few big scans do not all land on one process. The same
    on every process, with no communication: ties go by case id."""
    shares: list[list[ScanCase]] = [[] for _ in range(world)]
    load = [0] * world
    size = {c.case_id: sum(f.stat().st_size for f in c.files) for c in cases}
    for c in sorted(cases, key=lambda c: (-size[c.case_id], c.case_id)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(c)
        load[r] += size[c.case_id]
    return [sorted(s, key=lambda c: c.case_id) for s in shares]


def _read(case: ScanCase, n_channels: int) -> tuple[np.ndarray, Geometry]:
    """The case's image ``(C, z, y, x)`` and geometry; channels must share the geometry."""
    arrays, geos = [], []
    for f in case.files:
        try:
            a, g = read_image(f)
        except ImageReadError as e:
            raise ValueError(f"{f}: {e}") from None
        arrays.append(a)
        geos.append(g)
    for f, g in zip(case.files[1:], geos[1:]):
        msg = geometry_mismatch(g, geos[0])
        if msg:
            raise ValueError(f"{f}: {msg} than {case.files[0].name}")
    image = np.concatenate(arrays).astype(np.float32, copy=False)
    if image.shape[0] != n_channels:
        raise ValueError(f"{case.files[0]}: {image.shape[0]} channel(s); the run expects {n_channels}")
    return image, geos[0]


def save_probabilities(probs: np.ndarray, values: list[int], geometry: Geometry, path: Path) -> None:
    """``probabilities`` float16 ``(K, z, y, x)``, the label ``values`` of its K channels and the geometry,
    compressed, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, probabilities=probs.astype(np.float16), labels=np.array(values),
                            spacing=np.array(geometry.spacing), origin=np.array(geometry.origin),
                            direction=np.array(geometry.direction))


def load_probabilities(path: Path) -> tuple[np.ndarray, list[int], Geometry]:
    """Read what :func:`save_probabilities` wrote.

    Raises:
        ValueError: not such a file: unreadable, empty, truncated or corrupt, a bare ``.npy`` array, or an
            archive without these arrays.
    """
    import zipfile

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with loaded as z:
            probs = z["probabilities"].astype(np.float32)
            values = [int(v) for v in np.atleast_1d(z["labels"])]
            spacing, origin, direction = (tuple(float(v) for v in np.ravel(z[k]))
                                          for k in ("spacing", "origin", "direction"))
        if probs.ndim != 4 or len(values) != probs.shape[0] or len(spacing) != 3 or len(origin) != 3 or \
                len(direction) != 9:
            raise ValueError(f"probabilities of shape {list(probs.shape)} for labels {values}, spacing {spacing}, "
                             f"origin {origin}, direction {direction}: expected (K, z, y, x) for K labels and a 3D "
                             "geometry")
        geo = Geometry(spacing, origin, direction, tuple(probs.shape[1:]))  # type: ignore[arg-type]
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
        why = str(e) or type(e).__name__
        raise ValueError(f"{path}: not a probabilities file written by autoseg predict ({why})") from None
    return probs, values, geo


def _finish_and_write(predictor: Predictor, case: ScanCase, probs: np.ndarray, props: CaseProperties,
                      probabilities: bool, out_dir: Path, overlay_dir: Path | None) -> None:
    """Back to the scan's grid, arg-max, post-processing, then the files (in the writer thread)."""
    pred = predictor.finish(probs, props, probabilities)
    if overlay_dir is not None:
        write_overlay(case, pred.labels, predictor.plans.labels, predictor.plans.channel_names, overlay_dir)
    _write(case, pred, sorted(predictor.plans.labels), props.geometry, out_dir)


def write_overlay(case: ScanCase, labels: np.ndarray, names: dict[int, str], channel_names: list[str],
                  overlay_dir: Path) -> Path:
    """``overlay_dir/<case>.png``: the predicted ``labels`` over the scan's first channel (read again from its
    file), three planes through the largest predicted structure, at the scan's physical aspect ratio."""
    image, geometry = _read(case, len(channel_names))
    png = render_overlays([OverlayRow(f"{case.case_id}\n{channel_names[0]} (channel 0)", image[0], labels)],
                          geometry.spacing_zyx, largest_structure_slices(labels), names,
                          heading=f"{case.case_id}: autoseg prediction")
    overlay_dir.mkdir(parents=True, exist_ok=True)
    path = overlay_dir / f"{case.case_id}.png"
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return path


def _write(case: ScanCase, pred: Prediction, values: list[int], geometry: Geometry, out_dir: Path) -> None:
    if pred.probabilities is not None:
        save_probabilities(pred.probabilities, values, geometry, out_dir / f"{case.case_id}.npz")
    write_image(pred.labels, geometry, out_dir / f"{case.case_id}{case.ending}")  # last: marks the case done


def predict_folder(predictor: Predictor, in_dir: Path, out_dir: Path, overwrite: bool = False,
                   probabilities: bool = False, progress: bool = True,
                   overlay_dir: Path | None = None, fix_nonfinite: bool = False, rank: int = 0,
                   world: int = 1) -> FolderReport:
    """Predict every case of ``in_dir`` into ``out_dir``; a failing case is recorded and the others go on.
    With ``world`` processes, this one (``rank``) takes its :func:`share_by_size` of the cases; only rank 0
    reports the files that form no case.
    With ``overlay_dir``, also a PNG per case there (:func:`write_overlay`). A scan with NaN or infinite voxels
    fails, unless ``fix_nonfinite``: then they take their channel's minimum, with a warning per case.

    A sticky GPU error (:func:`is_sticky_device_error`) stops the run instead: the case before it is still
    written, nothing is written for the failing case, later cases are not attempted.

    Raises:
        ValueError: ``in_dir`` is missing, holds no images, or is ``out_dir``.
        DeviceFailedError: a sticky GPU error; its message names the case, what was written, and says to rerun.
        OutputFailedError: an output could not be written (full disk): the same, and nothing half-written.
    """
    if not in_dir.is_dir():
        raise ValueError(f"{in_dir}: not a folder")
    if out_dir.resolve() == in_dir.resolve():
        raise ValueError(f"-o {out_dir} is the input folder: its label maps would be read as new scans; give "
                         "another output folder")
    n_ch = len(predictor.plans.channel_names)
    cases, problems = find_scans(in_dir, n_ch)
    if not cases and not problems:
        raise ValueError(f"{in_dir}: no images (.nii.gz, .nii, .nrrd, .mha) found")
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, overlay_dir):  # what a killed run was writing
        if folder is not None:
            remove_temporaries(folder)
    report = FolderReport()
    for line in problems if rank == 0 else []:
        report.failed[line.split(":")[0].removeprefix("case ")] = line
    todo = []
    for c in share_by_size(cases, world)[rank]:  # shared out before skipping: every rank sees the same cases
        done = (out_dir / f"{c.case_id}{c.ending}").is_file() and (
            not probabilities or (out_dir / f"{c.case_id}.npz").is_file()) and (
            overlay_dir is None or (overlay_dir / f"{c.case_id}.png").is_file())
        (report.skipped.append(c.case_id) if done and not overwrite else todo.append(c))
    stopped: tuple[str, str, int] | None = None  # case, error and cases not attempted after a sticky device error
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        pending: list[tuple[ScanCase, Future]] = []
        cases_ready = tqdm(_prefetch(reader, predictor, todo, n_ch, fix_nonfinite), total=len(todo), unit="case",
                           desc="predict", disable=not progress)
        for i, (case, ready) in enumerate(cases_ready):
            try:
                data, props = ready.result()
                probs = predictor.predict_preprocessed(data)
            except (ValueError, RuntimeError, MemoryError) as e:
                if is_sticky_device_error(e):
                    stopped = (case.case_id, first_line(e), len(todo) - i - 1)
                    break
                report.failed[case.case_id] = f"case {case.case_id}: {_describe(e)}"
                continue
            pending.append((case, writer.submit(_finish_and_write, predictor, case, probs, props, probabilities,
                                                out_dir, overlay_dir)))
            _settle(pending, report, keep=1)  # at most one finished prediction waits for its write
        _settle(pending, report, keep=0)  # also after a stop: the previous case's prediction is complete
    if stopped is not None:
        raise _device_failed(*stopped, report)
    return report


def _device_failed(case_id: str, error: str, n_left: int, report: FolderReport) -> DeviceFailedError:
    """The error that stops the run on a sticky device error on ``case_id``, ``n_left`` cases not attempted."""
    earlier = f"; failed before it: {', '.join(report.failed)}" if report.failed else ""
    return DeviceFailedError(case_id, (
        f"the GPU failed ({error}) and stays unusable in this process, so the run stopped: {len(report.written)} "
        f"case(s) written in this run, {len(report.skipped)} done before, {n_left} not attempted{earlier}. Run the "
        f"same command again to continue (finished cases are skipped); if case {case_id} fails again, predict it "
        "with --device cpu"), report)


def _describe(exc: BaseException) -> str:
    """A per-case error as one line (an empty ``MemoryError`` says what it is)."""
    if isinstance(exc, MemoryError):
        return "out of memory (RAM)" + (f": {first_line(exc)}" if str(exc).strip() else "")
    return str(exc)


def _settle(pending: list[tuple[ScanCase, Future]], report: FolderReport, keep: int) -> None:
    """Wait for the oldest writes until ``keep`` are pending.

    Raises:
        OutputFailedError: a file could not be written (every later case would fail the same way).
    """
    while len(pending) > keep:
        case, fut = pending.pop(0)
        try:
            fut.result()
            report.written.append(case.case_id)
        except WriteError as e:
            raise OutputFailedError(case.case_id, (
                f"{e}. The run stopped: {len(report.written)} case(s) written in this run, {len(report.skipped)} done "
                "before, all complete; make room and run the same command again to continue (finished cases are "
                "skipped)"), report) from None
        except (OSError, ValueError, RuntimeError, MemoryError) as e:
            report.failed[case.case_id] = f"case {case.case_id}: writing failed: {_describe(e)}"


def _read_and_preprocess(predictor: Predictor, case: ScanCase, n_ch: int,
                         fix_nonfinite: bool) -> tuple[np.ndarray, CaseProperties]:
    image, geometry = _read(case, n_ch)
    if fix_nonfinite:
        image, notes = fill_nonfinite(image)
        for note in notes:
            log.warning("case %s: %s (--fix-nonfinite)", case.case_id, note)
    return predictor.preprocess(image, geometry=geometry)


def _prefetch(pool: ThreadPoolExecutor, predictor: Predictor, cases: list[ScanCase], n_ch: int,
              fix_nonfinite: bool) -> Iterator[tuple[ScanCase, Future]]:
    """Yield each case with its reading and preprocessing started, and start the next one (one case ahead)."""
    def start(case: ScanCase) -> Future:
        return pool.submit(_read_and_preprocess, predictor, case, n_ch, fix_nonfinite)

    upcoming = start(cases[0]) if cases else None
    for i, case in enumerate(cases):
        current = upcoming
        upcoming = start(cases[i + 1]) if i + 1 < len(cases) else None
        assert current is not None
        yield case, current
