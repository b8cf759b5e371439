"""Check that one case's files open and agree with each other and with dataset.json.

Every check adds one line to a list of problems instead of raising, so that a dataset with many broken
cases is reported in one go. Each line names the case, the file, what is wrong and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg import defaults
from autoseg.dataset import CaseFiles
from autoseg.io import Geometry, ImageReadError, read_image

__all__ = ["LoadedCase", "read_case", "geometry_mismatch", "label_dtype", "non_integer_voxels"]


@dataclass
class LoadedCase:
    """A verified case: image ``(C, z, y, x)`` float32, label ``(z, y, x)`` integer, shared geometry."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    geometry: Geometry


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v + 0.0:.6g}" for v in values) + ")"  # + 0.0 turns -0 into 0


def geometry_mismatch(g: Geometry, ref: Geometry) -> str | None:
    """Describe how ``g`` differs from ``ref`` beyond the tolerances in :mod:`autoseg.defaults`, or None."""
    if g.shape != ref.shape:
        return f"shape {g.shape} differs from {ref.shape}"
    if not np.allclose(g.spacing, ref.spacing, rtol=defaults.SPACING_RTOL, atol=0):
        return f"spacing {_fmt(g.spacing)} mm differs from {_fmt(ref.spacing)} mm"
    if not np.allclose(g.origin, ref.origin, rtol=0, atol=defaults.ORIGIN_ATOL_MM):
        return f"origin {_fmt(g.origin)} mm differs from {_fmt(ref.origin)} mm"
    if not np.allclose(g.direction, ref.direction, rtol=0, atol=defaults.DIRECTION_ATOL):
        return f"direction {_fmt(g.direction)} differs from {_fmt(ref.direction)}"
    return None


def non_integer_voxels(arr: np.ndarray) -> tuple[int, float] | None:
    """How many voxels of a label map are not integers (NaN and infinity included) and one of their values, or
    None when all are (always for an integer type)."""
    if not np.issubdtype(arr.dtype, np.floating):
        return None
    bad = ~np.isfinite(arr) | (arr != np.round(arr))
    return (int(bad.sum()), float(arr[bad].ravel()[0])) if bad.any() else None


def label_dtype(max_label: int) -> type:
    """The smallest integer type that holds label values up to ``max_label``."""
    return np.uint8 if max_label < 256 else np.int16 if max_label < 32768 else np.int32


def _read_channels(case: CaseFiles, n_channels: int,
                   problems: list[str]) -> list[tuple[Path, np.ndarray, Geometry]]:
    """The channel files that could be read, each with its voxels and geometry (the others become problems)."""
    read: list[tuple[Path, np.ndarray, Geometry]] = []
    single_file = len(case.images) == 1
    for path in case.images:
        try:
            arr, geom = read_image(path)
        except ImageReadError as e:
            problems.append(f"{case.case_id}: {path}: {e}")
            continue
        expected = n_channels if single_file else 1
        if arr.shape[0] != expected:
            what = f"{expected} channel(s) as declared in dataset.json" if single_file else \
                "one channel per file in nnU-Net layout"
            problems.append(f"{case.case_id}: {path}: has {arr.shape[0]} channel(s); expected {what}")
            continue
        read.append((path, arr, geom))
    return read


def _check_image_values(case_id: str, path: Path, arr: np.ndarray, problems: list[str]) -> None:
    if not np.issubdtype(arr.dtype, np.floating):
        return
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int((~finite).sum()) - n_nan
        problems.append(f"{case_id}: {path}: contains {n_nan} NaN and {n_inf} infinite voxel(s); "
                        "expected finite intensities")


def _read_label(case: CaseFiles, labels: dict[int, str], problems: list[str]) -> tuple[np.ndarray, Geometry] | None:
    try:
        arr, geom = read_image(case.label)
    except ImageReadError as e:
        problems.append(f"{case.case_id}: {case.label}: {e}")
        return None
    if arr.shape[0] != 1:
        problems.append(f"{case.case_id}: {case.label}: label map has {arr.shape[0]} channels; expected 1")
        return None
    lab = arr[0]
    bad = non_integer_voxels(lab)
    if bad:
        problems.append(f"{case.case_id}: {case.label}: {bad[0]} voxel(s) hold non-integer label values such as "
                        f"{bad[1]:g}; expected integers {sorted(labels)}")
        return None
    values = np.unique(lab)
    unknown = sorted(int(v) for v in values if int(v) not in labels)
    if unknown:
        problems.append(f"{case.case_id}: {case.label}: label value(s) {unknown} are not declared in "
                        f"dataset.json labels {sorted(labels)}")
        return None
    return lab.astype(label_dtype(max(labels)), copy=False), geom


def read_case(case: CaseFiles, n_channels: int, labels: dict[int, str]) -> tuple[LoadedCase | None, list[str]]:
    """Read and verify one case.

    Args:
        case: the case's files.
        n_channels: number of channels dataset.json declares.
        labels: declared label values -> names.

    Returns:
        ``(loaded, problems)``: ``loaded`` is None whenever ``problems`` is not empty.
    """
    problems: list[str] = []
    read = _read_channels(case, n_channels, problems)
    label = _read_label(case, labels, problems)
    for path, arr, _ in read:
        _check_image_values(case.case_id, path, arr, problems)
    if read:
        ref_path, _, ref = read[0]
        for path, _, g in read[1:]:
            diff = geometry_mismatch(g, ref)
            if diff:
                problems.append(f"{case.case_id}: {path}: {diff} of {ref_path.name}; channels must align")
        if label is not None:
            diff = geometry_mismatch(label[1], ref)
            if diff:
                problems.append(f"{case.case_id}: {case.label}: {diff} of image {ref_path.name}; "
                                "label and image must align")
    if problems or label is None or len(read) != len(case.images):
        return None, problems
    image = np.concatenate([arr for _, arr, _ in read], axis=0).astype(np.float32, copy=False)
    return LoadedCase(case.case_id, image, label[0], ref), problems
