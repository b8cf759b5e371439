"""Target spacing, topology and splits against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.planning.spacing import resampled_shape, target_spacing
from autoseg.planning.splits import kfold_splits
from autoseg.planning.topology import topology_for_patch


def test_isotropic_spacing_is_the_median():
    spacings = np.array([[1.0, 1.0, 1.0], [1.2, 0.9, 0.9], [0.8, 1.1, 1.0]])
    shapes = np.array([[36, 50, 35]] * 3)
    assert target_spacing(spacings, shapes) == [1.0, 1.0, 1.0]


def test_anisotropic_axis_takes_10th_percentile():
    # z: 5 mm median, 3x coarser than in-plane and 20 slices vs 320: the rule applies
    z = np.array([2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0])
    spacings = np.stack([z, np.full(10, 0.6), np.full(10, 0.6)], axis=1)
    shapes = np.array([[20, 320, 320]] * 10)
    expected_z = float(np.percentile(z, 10))  # 3.8
    assert target_spacing(spacings, shapes) == [pytest.approx(expected_z), 0.6, 0.6]


def test_anisotropic_spacing_but_many_slices_keeps_median():
    spacings = np.array([[4.0, 1.0, 1.0], [2.0, 1.0, 1.0], [5.0, 1.0, 1.0]])
    shapes = np.array([[200, 256, 256]] * 3)  # 200 slices: not 3x fewer voxels than in-plane
    assert target_spacing(spacings, shapes) == [4.0, 1.0, 1.0]


def test_resampled_shape():
    assert resampled_shape([20, 320, 320], [3.6, 0.6, 0.6], [3.6, 1.2, 0.8]) == [20, 160, 240]


def test_topology_isotropic_hippocampus():
    t = topology_for_patch([36, 50, 35], [1.0, 1.0, 1.0])
    # 36 -> 18 -> 9 -> 4.5: three poolings on every axis (a fourth would leave < 4 voxels)
    assert t.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert t.kernel_sizes == [[3, 3, 3]] * 4
    assert t.patch == [40, 56, 40]  # padded up to multiples of 8


def test_topology_anisotropic_pools_in_plane_first():
    t = topology_for_patch([20, 320, 320], [3.6, 0.6, 0.6])
    # in-plane spacing 0.6 -> 1.2 -> 2.4 -> 4.8: z (3.6) joins once in-plane is within 2x of it
    assert t.strides[1] == [1, 2, 2] and t.strides[2] == [1, 2, 2] and t.strides[3] == [2, 2, 2]
    assert t.kernel_sizes[0] == [1, 3, 3] and t.kernel_sizes[1] == [1, 3, 3] and t.kernel_sizes[2] == [3, 3, 3]
    assert all(p % s == 0 for p, s in zip(t.patch, t.total_stride))


def test_topology_caps_poolings():
    t = topology_for_patch([512, 512, 512], [1.0, 1.0, 1.0], max_poolings=5)
    assert len(t.strides) == 6 and t.total_stride == [32, 32, 32]


def test_kfold_is_seeded_disjoint_and_complete():
    ids = [f"c{i:02d}" for i in range(23)]
    a, b = kfold_splits(ids, 5, 12345), kfold_splits(list(reversed(ids)), 5, 12345)
    assert [f.val for f in a] == [f.val for f in b]  # independent of input order
    assert sorted(c for f in a for c in f.val) == ids
    assert sorted(len(f.val) for f in a) == [4, 4, 5, 5, 5]
    assert kfold_splits(ids, 5, 1)[0].val != a[0].val


def test_kfold_bad_arguments():
    with pytest.raises(ValueError, match="k >= 2"):
        kfold_splits(["a", "b"], 1, 0)
    with pytest.raises(ValueError, match="at least 2 cases"):
        kfold_splits(["a"], 5, 0)
    assert len(kfold_splits(["a", "b", "c"], 5, 0)) == 3


def test_size_rank_dice_weights_favour_rare_classes():
    from dataclasses import replace

    from autoseg.fingerprint import ClassStats
    from autoseg.planning.planner import dice_weights

    from .fingerprints import PROSTATE

    # classes 1 and 2 with 9,000 and 1,000 voxels: ranks 1 (large) and 2 (rare), rescaled to average 1
    fp = replace(PROSTATE, classes=[ClassStats(1, "a", 9000, 10, 900.0, 1.0, 0.9),
                                    ClassStats(2, "b", 1000, 10, 100.0, 1.0, 0.1)])
    assert dice_weights(fp, "size-rank") == [pytest.approx(2 / 3), pytest.approx(4 / 3)]
    assert dice_weights(fp, "equal") == [1.0, 1.0]
