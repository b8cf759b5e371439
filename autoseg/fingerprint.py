"""Measure what a dataset is: geometry, intensities per channel, class sizes, cached between runs.

Reading, verifying and measuring a case happen in one pass over its files (one read per file), in worker
processes. Verification problems from all cases are collected and raised together before anything is
written.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg import defaults
from autoseg.dataset import CaseFiles, DatasetError, DatasetSpec, files_stamp
from autoseg.device import DeviceInfo
from autoseg.parallel import choose_workers, run_over_cases
from autoseg.typedjson import SchemaError, from_jsonable, read_json, write_json_atomic
from autoseg.verify import read_case

__all__ = ["ChannelStats", "ClassStats", "CaseFingerprint", "Fingerprint", "fingerprint_dataset",
           "measure_case", "aggregate", "dataset_key", "load_fingerprint", "nonzero_bbox"]

FINGERPRINT_FILE = "fingerprint.json"
SAMPLES_FILE = "fingerprint_samples.npz"


@dataclass
class ChannelStats:
    """Foreground intensity statistics of one channel. For a case, percentiles come from its samples."""

    n_voxels: int
    mean: float
    std: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass
class CaseFingerprint:
    """One case. Spacing and shapes in array-axis order (z, y, x); spacing in mm."""

    case_id: str
    spacing: list[float]
    shape: list[int]
    shape_after_crop: list[int]
    crop_bbox: list[list[int]]
    class_voxels: dict[int, int]
    class_components: dict[int, int]
    channels: list[ChannelStats]
    #: per class present, its centre of mass (voxels, array order z, y, x)
    class_centroids: dict[int, list[float]] = field(default_factory=dict)


@dataclass
class ClassStats:
    """One foreground class over the dataset."""

    value: int
    name: str
    total_voxels: int
    cases_present: int
    median_voxels: float
    median_components: float
    share_of_foreground: float


@dataclass
class Fingerprint:
    """What autoseg knows about a dataset before planning. Written to ``RUN_DIR/fingerprint.json``."""

    schema_version: int
    dataset_name: str
    dataset_dir: str
    layout: str
    dataset_key: str
    channel_names: list[str]
    labels: dict[int, str]
    n_cases: int
    median_spacing: list[float]
    median_shape: list[int]
    median_shape_after_crop: list[int]
    median_relative_size_after_crop: float
    channels: list[ChannelStats]
    classes: list[ClassStats]
    cases: list[CaseFingerprint]
    #: the device the plan was made for, set by ``autoseg plan``; the dataset's fingerprint itself does not
    #: depend on it (``autoseg verify`` leaves it unset)
    device: DeviceInfo | None = None


def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """Bounding box ``[[z0, z1], [y0, y1], [x0, x1]]`` (end exclusive) of voxels non-zero in any channel.

    The whole image when every voxel is zero. Filling holes in the mask (as nnU-Net does) cannot change
    the box, so it is skipped.
    """
    mask = np.any(image != 0, axis=0)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, mask.shape[axis]])
    return box


def _count_components(label: np.ndarray, values: list[int]) -> dict[int, int]:
    from scipy import ndimage

    structure = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
    return {v: int(ndimage.label(label == v, structure=structure)[1]) for v in values}


def _channel_stats(values: np.ndarray, samples: np.ndarray) -> ChannelStats:
    if values.size == 0:
        return ChannelStats(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    v = values.astype(np.float64)
    p_lo, p_hi = np.percentile(samples, [0.5, 99.5])
    return ChannelStats(int(v.size), float(v.mean()), float(v.std()), float(v.min()), float(v.max()),
                        float(p_lo), float(p_hi))


def measure_case(case: CaseFiles, n_channels: int, labels: dict[int, str], n_samples: int,
                 seed: int) -> tuple[CaseFingerprint | None, list[np.ndarray], list[str]]:
    """Verify and measure one case (runs in a worker process).

    Args:
        case: the case's files.
        n_channels: channels declared by dataset.json.
        labels: declared label values.
        n_samples: foreground intensity samples to keep per channel (all voxels when there are fewer).
        seed: base seed; the case id is mixed in so that results do not depend on worker order.

    Returns:
        ``(fingerprint, samples per channel, problems)``; fingerprint is None when there are problems.
    """
    loaded, problems = read_case(case, n_channels, labels)
    if loaded is None:
        return None, [], problems
    image, label = loaded.image, loaded.label
    bbox = nonzero_bbox(image)
    fg = label > 0
    rng = np.random.default_rng([seed, zlib.crc32(case.case_id.encode())])
    n_fg = int(fg.sum())
    pick = np.sort(rng.choice(n_fg, size=n_samples, replace=False)) if n_fg > n_samples else slice(None)
    samples, stats = [], []
    for c in range(image.shape[0]):
        values = image[c][fg]
        samples.append(values[pick].astype(np.float32))
        stats.append(_channel_stats(values, samples[-1]))
    counts = np.bincount(label.ravel(), minlength=max(labels) + 1)
    present = [v for v in labels if v > 0 and counts[v] > 0]
    fp = CaseFingerprint(
        case.case_id, list(loaded.geometry.spacing_zyx), list(label.shape), [b - a for a, b in bbox], bbox,
        {v: int(counts[v]) for v in labels if v > 0}, {v: 0 for v in labels if v > 0} | _count_components(
            label, present), stats, _centroids(label, present))
    return fp, samples, []


def _centroids(label: np.ndarray, present: list[int]) -> dict[int, list[float]]:
    from scipy import ndimage

    centres = ndimage.center_of_mass(np.ones(label.shape, np.uint8), label, present)
    return {v: [round(float(x), 2) for x in c] for v, c in zip(present, centres)}


def _pooled_channel(cases: list[CaseFingerprint], c: int, samples: np.ndarray) -> ChannelStats:
    stats = [cf.channels[c] for cf in cases if cf.channels[c].n_voxels > 0]
    if not stats:
        return ChannelStats(0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    n = np.array([s.n_voxels for s in stats], dtype=np.float64)
    mean = np.array([s.mean for s in stats])
    second = np.array([s.std**2 + s.mean**2 for s in stats])
    total = n.sum()
    m = float((n * mean).sum() / total)
    var = max(float((n * second).sum() / total - m * m), 0.0)
    p_lo, p_hi = np.percentile(samples, [0.5, 99.5]) if samples.size else (0.0, 0.0)
    return ChannelStats(int(total), m, float(np.sqrt(var)), min(s.min for s in stats), max(s.max for s in stats),
                        float(p_lo), float(p_hi))


def aggregate(spec: DatasetSpec, key: str, cases: list[CaseFingerprint],
              samples: dict[str, list[np.ndarray]]) -> Fingerprint:
    """Combine per-case fingerprints into the dataset fingerprint (exact mean/std/min/max; percentiles of
    the pooled samples)."""
    spacings = np.array([c.spacing for c in cases])
    shapes = np.array([c.shape for c in cases])
    cropped = np.array([c.shape_after_crop for c in cases])
    rel = np.prod(cropped, axis=1) / np.prod(shapes, axis=1)
    channels = []
    for ch in range(len(spec.channel_names)):
        pooled = [samples[c.case_id][ch] for c in cases if len(samples.get(c.case_id, []))]
        channels.append(_pooled_channel(cases, ch, np.concatenate(pooled) if pooled else np.zeros(0)))
    fg_total = sum(sum(c.class_voxels.values()) for c in cases) or 1
    classes = []
    for value, name in spec.labels.items():
        if value == 0:
            continue
        vox = [c.class_voxels.get(value, 0) for c in cases]
        comps = [c.class_components.get(value, 0) for c in cases]
        classes.append(ClassStats(value, name, int(sum(vox)), int(sum(v > 0 for v in vox)), float(np.median(vox)),
                                  float(np.median(comps)), float(sum(vox) / fg_total)))
    return Fingerprint(
        defaults.FINGERPRINT_VERSION, spec.name, str(spec.root.resolve()), spec.layout, key, spec.channel_names,
        dict(spec.labels), len(cases), [float(v) for v in np.median(spacings, axis=0)],
        [int(v) for v in np.median(shapes, axis=0)], [int(v) for v in np.median(cropped, axis=0)],
        float(np.median(rel)), channels, classes, cases)


def dataset_key(spec: DatasetSpec) -> str:
    """A hash of dataset.json, of every case file's name, size and modification time, and of the
    fingerprint version: equal keys mean the cached fingerprint is still valid."""
    h = hashlib.sha256()
    h.update(f"v{defaults.FINGERPRINT_VERSION}:{defaults.FINGERPRINT_SAMPLES_TOTAL}:centroids".encode())
    h.update((spec.root / "dataset.json").read_bytes())
    for case in spec.cases:
        h.update(files_stamp((*case.images, case.label)).encode())
    return h.hexdigest()[:32]


def load_fingerprint(path: str | Path) -> Fingerprint:
    """Read and validate ``fingerprint.json``.

    Raises:
        SchemaError: the file does not match the schema (the message names the field).
    """
    fp = from_jsonable(Fingerprint, read_json(path))
    if fp.schema_version != defaults.FINGERPRINT_VERSION:
        raise SchemaError(f"{path}: schema_version {fp.schema_version}; this autoseg reads "
                          f"{defaults.FINGERPRINT_VERSION}")
    return fp


def _cached(run_dir: Path, key: str) -> Fingerprint | None:
    path = run_dir / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        fp = load_fingerprint(path)
    except (SchemaError, TypeError, ValueError):
        return None
    return fp if fp.dataset_key == key else None


def fingerprint_dataset(spec: DatasetSpec, run_dir: Path | None = None, workers: int | None = None,
                        progress: bool = True) -> tuple[Fingerprint, bool]:
    """Verify and fingerprint every case; reuse ``run_dir/fingerprint.json`` when the dataset is unchanged.

    Nothing is written here; see :func:`save_fingerprint`. The device is the caller's to set: a reused
    fingerprint still holds the one of the plan it was saved with.

    Returns:
        ``(fingerprint, reused)``.

    Raises:
        DatasetError: with one line per problem, over all cases.
    """
    if spec.problems and not spec.cases:
        raise DatasetError(spec.problems)
    key = dataset_key(spec)
    if run_dir is not None:
        cached = _cached(run_dir, key)
        if cached is not None:
            return cached, True
    per_case = max(1, defaults.FINGERPRINT_SAMPLES_TOTAL // max(len(spec.cases), 1))
    jobs = [(c.case_id, (c, len(spec.channel_names), spec.labels, per_case, defaults.FINGERPRINT_SEED))
            for c in spec.cases]
    n_workers = choose_workers(len(jobs), _bytes_per_worker(spec), workers)
    results = run_over_cases(measure_case, jobs, n_workers, "verify + fingerprint", progress)
    problems = list(spec.problems)
    for case in spec.cases:
        problems.extend(results[case.case_id][2])
    if problems:
        raise DatasetError(problems)
    cases = [results[c.case_id][0] for c in spec.cases]
    samples = {c.case_id: results[c.case_id][1] for c in spec.cases}
    return aggregate(spec, key, cases, samples), False


def _bytes_per_worker(spec: DatasetSpec) -> int:
    """Peak memory of one worker: the largest case as float32 image + float64 temporaries + label."""
    import SimpleITK as sitk

    largest = 0
    for case in spec.cases:
        p = case.label
        if not p.exists():
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue
        largest = max(largest, int(np.prod(reader.GetSize())))
    return largest * (4 * len(spec.channel_names) + 8 + 2 * 4) + 200 * 2**20


def save_fingerprint(fp: Fingerprint, run_dir: Path) -> None:
    """Write ``fingerprint.json`` atomically."""
    write_json_atomic(fp, run_dir / FINGERPRINT_FILE)
