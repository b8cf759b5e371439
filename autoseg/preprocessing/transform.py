"""One transform, two directions: a case to the planned spacing and back to its exact original geometry.

Forward: crop to the non-zero region -> N4 bias-field correction where planned -> normalise per channel ->
resample to the target spacing.
Inverse: a label map or class probabilities at the target spacing -> resample to the cropped shape -> paste
into the bounding box of the original shape. Training and inference both use these two functions.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from autoseg import defaults
from autoseg.fingerprint import nonzero_bbox
from autoseg.io import Geometry
from autoseg.planning.spacing import resampled_shape
from autoseg.plans import Plans, ResamplingPlan
from autoseg.preprocessing.bias import correct_bias_field
from autoseg.preprocessing.normalise import normalise
from autoseg.preprocessing.resample import (
    out_of_plane_axis,
    resample_argmax,
    resample_image,
    resample_labels,
    resample_probabilities,
)

__all__ = ["CaseProperties", "forward", "class_locations", "labels_to_original", "probabilities_to_original",
           "probabilities_to_labels"]


@dataclass
class CaseProperties:
    """What is needed to undo preprocessing, and where the classes are. Array order (z, y, x).

    Attributes:
        geometry: the original image geometry, exactly as read.
        bbox: crop box ``[[z0, z1], [y0, y1], [x0, x1]]`` in the original array (end exclusive).
        shape_after_crop: voxels after cropping.
        spacing: original spacing (mm).
        target_spacing: spacing after resampling (mm).
        shape_after_resampling: voxels of the stored arrays.
        out_of_plane_axis: axis resampled separately (anisotropic case), or None.
        class_locations: class value -> number of voxel coordinates kept for it (at most
            ``CLASS_LOCATIONS_PER_CLASS``, seeded sample); the coordinates themselves are stored beside the
            JSON as an array (:func:`class_locations`), which is 20x faster to write and read than JSON lists.
        source_key: hash of the source files and the preprocessing settings; a rerun skips the case when
            it is unchanged.
    """

    case_id: str
    geometry: Geometry
    bbox: list[list[int]]
    shape_after_crop: list[int]
    spacing: list[float]
    target_spacing: list[float]
    shape_after_resampling: list[int]
    out_of_plane_axis: int | None
    class_locations: dict[int, int]
    source_key: str


def class_locations(seg: np.ndarray, values: list[int], case_id: str) -> np.ndarray:
    """Up to ``CLASS_LOCATIONS_PER_CLASS`` voxels per class in ``seg``, as rows ``(class, z, y, x)`` (int32),
    sampled with a seed mixed from the case id."""
    rng = np.random.default_rng([defaults.CLASS_LOCATIONS_SEED, zlib.crc32(case_id.encode())])
    rows = [np.zeros((0, 4), np.int32)]
    for v in values:
        coords = np.argwhere(seg == v)
        if len(coords) > defaults.CLASS_LOCATIONS_PER_CLASS:
            coords = coords[np.sort(rng.choice(len(coords), defaults.CLASS_LOCATIONS_PER_CLASS, replace=False))]
        rows.append(np.column_stack([np.full(len(coords), v), coords]).astype(np.int32))
    return np.concatenate(rows)


def forward(image: np.ndarray, label: np.ndarray | None, geometry: Geometry, plans: Plans, case_id: str = "",
            source_key: str = "") -> tuple[np.ndarray, np.ndarray | None, np.ndarray, CaseProperties]:
    """Preprocess one case as planned.

    Args:
        image: ``(C, z, y, x)`` intensities.
        label: ``(z, y, x)`` integer labels, or None at inference.
        geometry: the image's geometry (from :func:`autoseg.io.read_image`).

    Returns:
        ``(data, seg, locations, properties)``: float32 ``(C, z', y', x')``; labels ``(z', y', x')`` (None
        without a label); class locations ``(n, 4)`` rows ``(class, z, y, x)`` (empty without a label); and
        what is needed to undo it.
    """
    bbox = nonzero_bbox(image)
    box = tuple(slice(a, b) for a, b in bbox)
    cropped = image[(slice(None), *box)]
    mask = np.any(cropped != 0, axis=0)
    spacing = list(geometry.spacing_zyx)
    if any(n.bias_field for n in plans.normalization):
        cropped = np.stack([correct_bias_field(ch, spacing) if n.bias_field else ch
                            for ch, n in zip(cropped, plans.normalization)])
    data = normalise(cropped, plans.normalization, mask)
    shape = [max(1, s) for s in resampled_shape(cropped.shape[1:], spacing, plans.target_spacing)]
    r = plans.resampling
    axis = out_of_plane_axis(spacing, plans.target_spacing, r.anisotropy_threshold)
    data = resample_image(data, tuple(shape), r.image_order, axis, r.out_of_plane_order)
    seg = None
    locations = np.zeros((0, 4), np.int32)
    if label is not None:
        values = sorted(plans.labels)
        seg = resample_labels(label[box], tuple(shape), r.label_order, axis, r.out_of_plane_order, values)
        locations = class_locations(seg, [v for v in values if v > 0], case_id)
    counts = {v: int((locations[:, 0] == v).sum()) for v in sorted(plans.labels) if v > 0}
    props = CaseProperties(case_id, geometry, bbox, list(cropped.shape[1:]), spacing, list(plans.target_spacing),
                           shape, axis, counts, source_key)
    return data, seg, locations, props


def labels_to_original(seg: np.ndarray, props: CaseProperties, r: ResamplingPlan, values: list[int]) -> np.ndarray:
    """A label map at the target spacing, back in the original array: same shape, ready for ``geometry``."""
    if list(seg.shape) != props.shape_after_resampling:
        raise ValueError(f"{props.case_id}: label map has shape {list(seg.shape)}, expected "
                         f"{props.shape_after_resampling}")
    cropped = resample_labels(seg, tuple(props.shape_after_crop), r.label_order, props.out_of_plane_axis,
                              r.out_of_plane_order, values)
    out = np.zeros(props.geometry.shape, dtype=seg.dtype)
    out[tuple(slice(a, b) for a, b in props.bbox)] = cropped
    return out


def probabilities_to_original(probs: np.ndarray, props: CaseProperties, r: ResamplingPlan) -> np.ndarray:
    """Class probabilities ``(K, ...)`` at the target spacing, back in the original array; outside the crop
    box the background (class 0) has probability one. Every voxel sums to one."""
    if list(probs.shape[1:]) != props.shape_after_resampling:
        raise ValueError(f"{props.case_id}: probabilities have shape {list(probs.shape[1:])}, expected "
                         f"{props.shape_after_resampling}")
    cropped = resample_probabilities(probs, tuple(props.shape_after_crop), props.out_of_plane_axis,
                                     r.out_of_plane_order)
    out = np.zeros((probs.shape[0], *props.geometry.shape), dtype=np.float32)
    out[0] = 1
    out[(slice(None), *(slice(a, b) for a, b in props.bbox))] = cropped
    return out


def probabilities_to_labels(probs: np.ndarray, props: CaseProperties, r: ResamplingPlan,
                            values: list[int]) -> np.ndarray:
    """The label map of :func:`probabilities_to_original` + arg-max, without holding the probabilities on the
    original grid (two float volumes of the crop box instead of K of the whole scan + an int64 arg-max)."""
    if list(probs.shape[1:]) != props.shape_after_resampling:
        raise ValueError(f"{props.case_id}: probabilities have shape {list(probs.shape[1:])}, expected "
                         f"{props.shape_after_resampling}")
    cropped = resample_argmax(probs, tuple(props.shape_after_crop), props.out_of_plane_axis, r.out_of_plane_order,
                              values)
    out = np.full(props.geometry.shape, values[0], dtype=cropped.dtype)
    out[tuple(slice(a, b) for a, b in props.bbox)] = cropped
    return out
