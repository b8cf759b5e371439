"""Left/right label pairs: found by name, their axis by the data, and never mirrored along it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from autoseg.fingerprint import measure_case
from autoseg.planning import make_plan
from autoseg.planning.symmetry import lateral_axis, lateral_pairs
from autoseg.plans import select_configuration

from ..builders import nnunet_dataset
from .fingerprints import BRAIN, PROSTATE, device


@pytest.mark.parametrize("labels, pairs", [
    ({0: "background", 1: "liver", 2: "right_kidney", 3: "left_kidney"}, [(3, 2)]),
    ({0: "bg", 1: "Kidney L", 2: "Kidney R"}, [(1, 2)]),
    ({0: "bg", 1: "LeftLung", 2: "RightLung", 3: "Heart"}, [(1, 2)]),
    ({0: "bg", 1: "lung_lt", 2: "lung_rt", 3: "kidney_l", 4: "kidney_r"}, [(1, 2), (3, 4)]),
    ({0: "bg", 1: "Anterior", 2: "Posterior"}, []),       # Hippocampus: no side
    ({0: "bg", 1: "left_kidney", 2: "right_lung"}, []),   # different organs
    ({0: "bg", 1: "left_right_junction", 2: "right"}, []),  # two sides in one name, or nothing besides it
])
def test_pairs_are_found_by_names_that_differ_only_by_the_side(labels, pairs):
    assert sorted(lateral_pairs(labels)) == pairs


def kidneys(n_cases: int = 5):
    """PROSTATE's fingerprint relabelled as two kidneys 60 voxels (36 mm at 0.6 mm) apart along x, 0.5 slices
    (1.8 mm at 3.6 mm) along z."""
    cases = [dataclasses.replace(c, class_centroids={1: [10.0 + i % 2, 160.0, 100.0], 2: [10.5, 161.0, 160.0]})
             for i, c in enumerate(PROSTATE.cases[:n_cases])]
    return dataclasses.replace(PROSTATE, labels={0: "background", 1: "left_kidney", 2: "right_kidney"},
                               cases=cases)


def test_the_axis_is_the_one_the_pair_lies_apart_on_in_mm():
    axis, reason = lateral_axis(kidneys())
    assert axis == 2
    assert "left_kidney from right_kidney (median 36 mm apart on it, 2 mm at most on the others)" in reason
    assert lateral_axis(BRAIN) is None
    assert lateral_axis(dataclasses.replace(kidneys(), cases=[dataclasses.replace(c, class_centroids={1: [1, 2, 3]})
                                                              for c in kidneys().cases])) is None  # never both


def test_the_plan_never_flips_that_axis_in_either_configuration():
    p = make_plan(kidneys(), device("cpu", 16))
    assert p.inference.mirror_axes == [0, 1] and p.training.augmentation.mirror_axes == [0, 1]
    two = select_configuration(p, "2d")
    assert two.inference.mirror_axes == [1] and two.training.augmentation.mirror_axes == [1]
    assert p.mirroring_note.startswith("axis 2 is never flipped: it separates left_kidney from right_kidney")
    plain = make_plan(BRAIN, device("cpu", 16))
    assert plain.inference.mirror_axes == [0, 1, 2] and plain.mirroring_note == ""


def test_the_fingerprint_measures_each_class_centre(tmp_path):
    from autoseg.dataset import load_dataset

    spec = load_dataset(nnunet_dataset(tmp_path / "ds", n_cases=1))
    case = spec.cases[0]
    fp, _, problems = measure_case(case, 1, spec.labels, 1000, 0)
    assert not problems and fp is not None
    from autoseg.io import read_image

    label = read_image(case.label)[0][0]
    for v, centre in fp.class_centroids.items():
        np.testing.assert_allclose(centre, np.argwhere(label == v).mean(axis=0), atol=0.01)
    assert set(fp.class_centroids) == {v for v in spec.labels if v > 0 and (label == v).any()}
