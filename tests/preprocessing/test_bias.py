"""N4 bias-field correction: it removes a known smooth field, keeps zeros, shrinks thick slices only in-plane,
and is applied where the plan asks (``autoseg plan --bias-correction``), in preprocessing and prediction alike."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from autoseg.io import Geometry
from autoseg.planning import make_plan
from autoseg.preprocessing import forward
from autoseg.preprocessing.bias import correct_bias_field, shrink_factors

from ..planning.fingerprints import CT, PROSTATE, device


def disc_with_field(strength: float) -> tuple[np.ndarray, np.ndarray]:
    """A uniform cylinder (100) in zero background, multiplied by exp(strength * x / 32): (observed, mask)."""
    z, y, x = np.mgrid[:20, :64, :64]
    mask = (y - 32) ** 2 + (x - 32) ** 2 < 28**2
    field = np.exp(strength * (x - 32) / 32)
    return np.where(mask, 100.0 * field, 0.0).astype(np.float32), mask


def cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


def test_shrink_factors_aim_at_4_mm_and_never_shrink_thick_slices():
    assert shrink_factors([7.7, 1.25, 1.25]) == [3, 3, 1]  # SimpleITK order x, y, z
    assert shrink_factors([1.0, 1.0, 1.0]) == [4, 4, 4]
    assert shrink_factors([5.0, 0.8, 0.8]) == [5, 5, 1]


def test_a_known_field_is_removed_and_zeros_stay_zero():
    observed, mask = disc_with_field(0.3)  # intensity varies by +-35 % across the disc
    assert cv(observed[mask]) > 0.12
    corrected = correct_bias_field(observed, (3.0, 1.0, 1.0))
    assert corrected.dtype == np.float32 and corrected.shape == observed.shape
    assert cv(corrected[mask]) < 0.02  # measured 0.006
    assert (corrected[~mask] == 0).all()


def test_the_plan_asks_for_n4_on_mri_channels_only():
    mri = make_plan(PROSTATE, device("cpu", 16), bias_correction=True)
    assert [n.bias_field for n in mri.normalization] == [True, True]
    assert not any(n.bias_field for n in make_plan(PROSTATE, device("cpu", 16)).normalization)
    assert [n.bias_field for n in make_plan(CT, device("cpu", 16), bias_correction=True).normalization] == [False]


@pytest.mark.parametrize("bias_field", [False, True])
def test_forward_corrects_before_normalising_when_planned(bias_field):
    plan = make_plan(PROSTATE, device("cpu", 16), bias_correction=bias_field)
    plan.normalization = plan.normalization[:1]
    plan.target_spacing = [3.0, 1.0, 1.0]  # no resampling: the stored array is the normalised input
    observed, mask = disc_with_field(0.3)
    geometry = Geometry((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), observed.shape)
    data, _, _, props = forward(observed[None], None, geometry, plan)
    m = mask[tuple(slice(a, b) for a, b in props.bbox)]  # stored cropped to the non-zero box
    inside, outside = data[0][m], data[0][~m]
    spread = (np.percentile(inside, 99) - np.percentile(inside, 1)) / (inside.mean() - outside.mean())
    assert (spread < 0.1) == bias_field, spread  # about 0.6 of the contrast without N4
    assert dataclasses.asdict(plan.normalization[0])["bias_field"] is bias_field
