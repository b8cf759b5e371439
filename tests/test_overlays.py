"""Overlays: class colours at the right voxels (a known cube), slice choice, physical aspect, a PNG that decodes,
and ``autoseg predict --overlays``."""

from __future__ import annotations

import io

import numpy as np
import pytest

from autoseg.overlays import (
    OverlayRow,
    blend,
    class_colour,
    largest_disagreement_slices,
    largest_structure_slices,
    plane,
    render_overlays,
    window,
)


def _cube_case() -> tuple[np.ndarray, np.ndarray]:
    """A 20x30x40 image ramp with class 1 a cube at z 5..9, y 10..19, x 20..29 and class 2 one voxel."""
    image = np.broadcast_to(np.arange(40, dtype=np.float32), (20, 30, 40)).copy()
    labels = np.zeros((20, 30, 40), np.uint8)
    labels[5:10, 10:20, 20:30] = 1
    labels[15, 2, 3] = 2
    return image, labels


def test_blend_puts_each_class_colour_exactly_on_its_voxels():
    image, labels = _cube_case()
    rgb = blend(plane(image, 0, 7), plane(labels, 0, 7), (0.0, 39.0), alpha=1.0)
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    inside = np.zeros((30, 40), bool)
    inside[10:20, 20:30] = True
    assert (rgb[inside] == class_colour(1)).all()
    grey = np.round(np.arange(40) / 39.0 * 255).astype(np.uint8)
    assert (rgb[~inside] == np.repeat(np.broadcast_to(grey, (30, 40))[~inside][:, None], 3, axis=1)).all()
    # half alpha: the mix of grey and colour, by hand for one voxel (x = 25: grey 25/39*255)
    half = blend(plane(image, 0, 7), plane(labels, 0, 7), (0.0, 39.0), alpha=0.5)
    g = 25 / 39 * 255
    assert half[12, 25].tolist() == [round(0.5 * g + 0.5 * c) for c in class_colour(1)]
    rgb2 = blend(plane(image, 0, 15), plane(labels, 0, 15), (0.0, 39.0), alpha=1.0)
    assert rgb2[2, 3].tolist() == list(class_colour(2)) and (rgb2.reshape(-1, 3) == class_colour(2)).all(1).sum() == 1


def test_vertical_planes_put_superior_up():
    _, labels = _cube_case()
    coronal = plane(labels, 1, 15)  # (z, x), z flipped: row 0 is the last slice
    assert coronal.shape == (20, 40) and coronal[19 - 5, 25] == 1 and coronal[19 - 10, 25] == 0


def test_slices_through_the_largest_structure_and_the_largest_disagreement():
    _, labels = _cube_case()
    z, y, x = largest_structure_slices(labels)
    assert 5 <= z <= 9 and 10 <= y <= 19 and 20 <= x <= 29  # the cube, not the single voxel
    pred = labels.copy()
    pred[12:14, 0:30, 0:5] = 1  # a false positive slab: most disagreement at z 12-13, x 0-4
    dz, dy, dx = largest_disagreement_slices(labels, pred)
    assert dz in (12, 13) and 0 <= dx <= 4
    assert largest_disagreement_slices(labels, labels) == (z, y, x)
    assert largest_structure_slices(np.zeros((4, 6, 8), np.uint8)) == (2, 3, 4)


def test_render_decodes_with_the_physical_aspect_and_is_not_blank():
    from PIL import Image

    image, labels = _cube_case()
    flat = render_overlays([OverlayRow("reference", image, labels), OverlayRow("prediction", image, None)],
                           (1.0, 1.0, 1.0), (7, 15, 25), {0: "background", 1: "cube", 2: "dot"}, heading="case")
    thick = render_overlays([OverlayRow("reference", image, labels)], (5.0, 1.0, 1.0), (7, 15, 25),
                            {1: "cube", 2: "dot"})
    for png in (flat, thick):
        im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert im.shape[0] > 100 and im.shape[1] > 300 and im.std() > 10
    # the class colour is drawn: pixels of class 1's colour exist in the decoded picture
    im = np.asarray(Image.open(io.BytesIO(flat)).convert("RGB")).astype(int)
    assert ((im[..., 0] - im[..., 1]) > 60).sum() > 50  # half of class 1's red-minus-green (205): never grey


def test_window_and_blend_handle_nan_and_constant_images():
    """``window`` reads finite voxels only: an all-NaN slice gets (0, 1) and a constant one (v, v + 1), so
    ``blend`` never divides by zero; ``blend`` draws NaN at the window's low end (black) and maps the window
    linearly to 0-255 grey."""
    nan = np.full((4, 5), np.nan, np.float32)
    assert window(nan) == (0.0, 1.0)
    assert (blend(nan, None, window(nan)) == 0).all()
    const = np.full((4, 5), 7.0, np.float32)
    assert window(const) == (7.0, 8.0)
    assert (blend(const, None, window(const)) == 0).all()
    mixed = np.arange(20, dtype=np.float32).reshape(4, 5)
    mixed[0, 0] = np.nan
    finite = np.arange(1, 20, dtype=np.float64)
    assert window(mixed) == pytest.approx(tuple(np.percentile(finite, [0.5, 99.5])))
    rgb = blend(mixed, None, (1.0, 19.0))
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[3, 4].tolist() == [255, 255, 255]
    assert rgb[1, 0].tolist() == [int(np.round((5 - 1) / 18 * 255))] * 3  # 57


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (4.0, 0.5, 0.5)])
def test_predict_writes_one_overlay_per_scan(tmp_path, spacing):
    from PIL import Image

    from autoseg.inference.folder import ScanCase, write_overlay
    from autoseg.io import Geometry, write_image

    image, labels = _cube_case()
    geo = Geometry(tuple(reversed(spacing)), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), image.shape)
    f = tmp_path / "scan_0000.nii.gz"
    write_image(image, geo, f)
    out = write_overlay(ScanCase("scan", (f,), ".nii.gz"), labels, {0: "background", 1: "cube", 2: "dot"}, ["MRI"],
                        tmp_path / "overlays")
    assert out == tmp_path / "overlays" / "scan.png"
    im = np.asarray(Image.open(out).convert("RGB"))
    assert im.std() > 10 and not list((tmp_path / "overlays").glob(".*"))  # no temporary file left
