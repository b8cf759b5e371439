"""Tiles and mirrorings of sliding-window prediction (shared with training's time budget)."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.tiling import mirror_combinations, tile_boxes, tile_starts


def test_tile_starts_cover_the_volume_with_the_step():
    assert tile_starts([10, 16, 8], [8, 8, 8], 0.5) == [[0, 2], [0, 4, 8], [0]]
    # every start at most step*patch apart, first at 0, last flush with the end
    for s, p, st in [(100, 24, 0.5), (57, 16, 0.33), (24, 24, 0.5)]:
        (starts,) = tile_starts([s], [p], st)
        assert starts[0] == 0 and starts[-1] == s - p
        assert all(0 < b - a <= np.ceil(p * st) for a, b in zip(starts, starts[1:]))  # rounded to voxels
    with pytest.raises(ValueError, match="smaller than the patch"):
        tile_starts([4, 8, 8], [8, 8, 8], 0.5)


def test_tile_boxes_are_the_product_of_the_starts_in_c_order():
    boxes = tile_boxes([10, 8, 12], [8, 8, 8], 0.5)  # starts z [0, 2], y [0], x [0, 4]
    assert boxes == [(slice(0, 8), slice(0, 8), slice(0, 8)), (slice(0, 8), slice(0, 8), slice(4, 12)),
                     (slice(2, 10), slice(0, 8), slice(0, 8)), (slice(2, 10), slice(0, 8), slice(4, 12))]


def test_mirror_combinations():
    assert mirror_combinations([0, 1, 2]) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_combinations([2, 0]) == [(), (0,), (2,), (0, 2)]
    assert mirror_combinations([]) == [()]


def test_a_one_slice_patch_visits_every_slice_once():
    # 2d: with step 0.5 of a one-voxel edge the starts were 0.5 apart and rounding visited most slices twice
    starts = tile_starts([35, 256, 256], [1, 256, 256], 0.5)
    assert starts == [list(range(35)), [0], [0]]
    assert len(tile_boxes([35, 300, 256], [1, 256, 256], 0.5)) == 35 * 2
