"""Pictures of segmentations: label maps blended over an image slice, three planes per case, at the scan's
physical aspect ratio, one fixed colour per class with a legend. Used by ``autoseg predict --overlays`` and
``autoseg report``.

Arrays are ``(z, y, x)`` as everywhere in autoseg; ``spacing`` is in the same order (mm). The three planes are
the slices ``z = k`` (shows y and x), ``y = k`` (z and x) and ``x = k`` (z and y). Colours are blended per voxel
here, in numpy, so a test can check which voxel has which colour before matplotlib lays the panels out.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CLASS_COLOURS", "class_colour", "blend", "window", "largest_structure_slices",
           "largest_disagreement_slices", "OverlayRow", "render_overlays", "plane"]

#: RGB of classes 1, 2, ... (class k uses entry (k - 1) mod 10): distinguishable, colour-blind-aware order
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190))
PLANE_NAMES = ("axial (z)", "coronal (y)", "sagittal (x)")


def class_colour(label: int) -> tuple[int, int, int]:
    """The fixed colour of foreground class ``label`` (>= 1)."""
    return CLASS_COLOURS[(label - 1) % len(CLASS_COLOURS)]


def _rgb01(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    return rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0


def window(image: np.ndarray) -> tuple[float, float]:
    """Display range of an image: its 0.5th and 99.5th percentiles over finite voxels (robust to outliers)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def blend(image: np.ndarray, labels: np.ndarray | None, limits: tuple[float, float],
          alpha: float = 0.5) -> np.ndarray:
    """A 2D slice as RGB ``uint8``: the image in grey within ``limits``, each foreground voxel of ``labels``
    mixed with its class colour (``alpha`` of the colour)."""
    lo, hi = limits
    grey = np.clip((np.nan_to_num(image.astype(np.float64), nan=lo) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if labels is not None:
        for lab in np.unique(labels):
            if lab == 0:
                continue
            m = labels == lab
            rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(class_colour(int(lab)), dtype=np.float64)
    return np.round(rgb).astype(np.uint8)


def plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` across ``axis``, oriented for display (superior up in the two vertical planes)."""
    s = np.take(volume, index, axis=axis)
    return s if axis == 0 else s[::-1]


def _busiest(mask: np.ndarray) -> tuple[int, int, int]:
    """Per axis, the slice with the most voxels of ``mask`` (the middle slice when it is empty)."""
    if not mask.any():
        return tuple(int(s // 2) for s in mask.shape)  # type: ignore[return-value]
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        out.append(int(np.argmax(mask.sum(axis=other))))
    return tuple(out)  # type: ignore[return-value]


def largest_structure_slices(labels: np.ndarray) -> tuple[int, int, int]:
    """Slices through the largest connected foreground structure (the busiest slice of it per axis)."""
    from scipy import ndimage

    comps, n = ndimage.label(labels > 0)
    if n == 0:
        return _busiest(labels > 0)
    sizes = np.bincount(comps.ravel())[1:]
    return _busiest(comps == int(np.argmax(sizes)) + 1)


def largest_disagreement_slices(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int]:
    """Per axis, the slice where the reference and the prediction disagree on most voxels (where they agree
    everywhere: the slices through the reference's largest structure)."""
    differ = reference != prediction
    return _busiest(differ) if differ.any() else largest_structure_slices(reference)


@dataclass
class OverlayRow:
    """One row of panels: ``labels`` (or None: the image alone) over ``image``, titled ``title``."""

    title: str
    image: np.ndarray
    labels: np.ndarray | None


def render_overlays(rows: Sequence[OverlayRow], spacing: Sequence[float], slices: tuple[int, int, int],
                    class_names: dict[int, str], heading: str = "") -> bytes:
    """A PNG: one row per :class:`OverlayRow`, columns the three planes through ``slices``, each panel at the
    physical aspect ratio of ``spacing``, a legend of the classes that ``class_names`` names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    sz, sy, sx = (float(s) for s in spacing)
    aspects = (sy / sx, sz / sx, sz / sy)  # height / width of a voxel in each plane
    fig, axes = plt.subplots(len(rows), 3, figsize=(10, 3.2 * len(rows) + 0.6), squeeze=False)
    for r, row in enumerate(rows):
        limits = window(row.image)
        for axis in range(3):
            ax = axes[r][axis]
            img = plane(row.image, axis, slices[axis])
            lab = plane(row.labels, axis, slices[axis]) if row.labels is not None else None
            ax.imshow(blend(img, lab, limits), aspect=aspects[axis], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{PLANE_NAMES[axis]} {slices[axis]}", fontsize=8)
            if axis == 0:
                ax.set_ylabel(row.title, fontsize=9)
    handles = [Patch(color=_rgb01(class_colour(k)), label=f"{k} {name}")
               for k, name in sorted(class_names.items()) if k > 0]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    if heading:
        fig.suptitle(heading, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97 if heading else 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
