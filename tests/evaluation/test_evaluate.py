"""Metrics against hand-computed values, the empty-mask conventions, and ``autoseg evaluate`` on folders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.evaluation.distances import assd, hd95, surface
from autoseg.evaluation.evaluate import EvaluationError, evaluate_folders, score_case

from ..builders import write


def line(voxels: list[int], n: int = 10) -> np.ndarray:
    a = np.zeros((1, 1, n), np.uint8)
    a[0, 0, voxels] = 1
    return a


def test_metrics_by_hand_on_a_line():
    # reference x = 2..4, prediction x = 3..6, x spacing 2 mm; in a 1x1xN volume every voxel is on the surface
    ref, pred = line([2, 3, 4]), line([3, 4, 5, 6])
    spacing = (1.0, 1.0, 2.0)
    s = score_case("c", pred, ref, 1, spacing)
    assert s.dice == pytest.approx(4 / 7)  # tp 2, |pred| 4, |ref| 3
    assert s.tpr == pytest.approx(2 / 3) and s.precision == pytest.approx(2 / 4)
    # pred->ref distances 0, 0, 2, 4 mm; ref->pred 2, 0, 0 mm
    assert hd95(pred, ref, spacing) == pytest.approx(float(np.percentile([0, 0, 2, 4, 2, 0, 0], 95)))
    assert assd(pred, ref, spacing) == pytest.approx((6 / 4 + 2 / 3) / 2)


def test_surface_of_a_cube_is_its_shell():
    a = np.zeros((5, 5, 5), bool)
    a[1:4, 1:4, 1:4] = True
    s = surface(a)
    assert s.sum() == 27 - 1 and not s[2, 2, 2]


def _whole_volume_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Both directed surface distances with the distance transforms over the whole volume (no bounding box)."""
    from scipy import ndimage

    sa, sb = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return np.concatenate([to_b[sa], to_a[sb]])


@pytest.mark.parametrize("seed", range(6))
def test_distances_in_the_bounding_box_equal_the_whole_volumes(seed):
    """Two random blobs, some touching the volume's edge (which counts as background), anisotropic spacing."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape, spacing = (14, 40, 37), (3.0, 0.8, 1.1)
    masks = []
    for _ in range(2):
        m = np.zeros(shape, bool)
        lo = [int(rng.integers(0, n - 4)) if seed % 2 else int(rng.integers(2, n // 2)) for n in shape]
        hi = [int(rng.integers(a + 2, n + 1)) for a, n in zip(lo, shape)]
        m[tuple(slice(a, b) for a, b in zip(lo, hi))] = rng.random([b - a for a, b in zip(lo, hi)]) < 0.7
        masks.append(ndimage.binary_opening(m) | (m & (rng.random(shape) < 0.05)))
    a, b = masks
    assert a.any() and b.any()
    full = _whole_volume_distances(a, b, spacing)
    assert hd95(a, b, spacing) == pytest.approx(float(np.percentile(full, 95)), rel=1e-12)
    n_a = int(surface(a).sum())  # the first n_a distances are a's surface to b's
    expected_assd = (full[:n_a].mean() + full[n_a:].mean()) / 2
    assert assd(a, b, spacing) == pytest.approx(float(expected_assd), rel=1e-12)
    s = score_case("c", a.astype(np.uint8), b.astype(np.uint8), 1, spacing)
    assert (s.hd95_mm, s.assd_mm) == (hd95(a, b, spacing), assd(a, b, spacing))


def test_empty_mask_conventions():
    empty, full = line([]), line([4])
    both = score_case("c", empty, empty, 1, (1.0, 1.0, 1.0))
    assert (both.dice, both.tpr, both.precision, both.hd95_mm, both.assd_mm) == (1.0, 1.0, 1.0, 0.0, 0.0)
    missed = score_case("c", empty, full, 1, (1.0, 1.0, 3.0))
    diagonal = math.sqrt(1 + 1 + 30**2)
    assert (missed.dice, missed.tpr, missed.precision) == (0.0, 0.0, 0.0)
    assert missed.hd95_mm == pytest.approx(diagonal) and missed.assd_mm == pytest.approx(diagonal)
    spurious = score_case("c", full, empty, 1, (1.0, 1.0, 1.0))
    assert (spurious.dice, spurious.tpr, spurious.precision) == (0.0, 0.0, 0.0)
    assert not any(math.isnan(v) for v in (missed.hd95_mm, spurious.assd_mm))


def _folders(tmp_path, n=3):
    rng = np.random.default_rng(0)
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    arrays = {}
    for i in range(n):
        r = np.zeros((6, 8, 7), np.uint8)
        r[1:4, 2:6, 2:5] = 1
        r[4:6, 1:3, 1:3] = 2
        p = r.copy()
        p[rng.integers(0, 6), rng.integers(0, 8), rng.integers(0, 7)] = 2
        write(ref / f"case_{i}.nii.gz", r)
        write(pred / f"case_{i}.nii.gz", p)
        arrays[f"case_{i}"] = (p, r)
    return pred, ref, arrays


def test_folders_micro_dice_and_files(tmp_path):
    pred, ref, arrays = _folders(tmp_path)
    result = evaluate_folders(pred, ref)
    assert result["labels"] == [1, 2] and result["n_cases"] == 3
    tp = sum(int(((p == 2) & (r == 2)).sum()) for p, r in arrays.values())
    fp = sum(int(((p == 2) & (r != 2)).sum()) for p, r in arrays.values())
    fn = sum(int(((p != 2) & (r == 2)).sum()) for p, r in arrays.values())
    assert result["mean_per_class"]["2"]["micro_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    saved = json.loads((pred / "metrics.json").read_text())
    assert saved["cases"]["case_0"]["1"]["dice"] == result["cases"]["case_0"]["1"]["dice"]
    rows = (pred / "metrics.csv").read_text().splitlines()
    assert rows[0] == "case,label,dice,hd95_mm,assd_mm,tpr,precision" and len(rows) == 1 + 3 * 2


def test_bad_folders_report_every_problem(tmp_path, capsys):
    pred, ref, _ = _folders(tmp_path, 4)
    (pred / "case_0.nii.gz").write_bytes(b"not a nifti")
    (pred / "case_1.nii.gz").unlink()
    write(pred / "case_2.nii.gz", np.zeros((6, 8, 8), np.uint8))
    with pytest.raises(EvaluationError) as e:
        evaluate_folders(pred, ref)
    text = "\n".join(e.value.problems)
    assert "case case_0" in text and "no prediction case_1" in text and "case case_2: prediction" in text
    assert "case_3" not in text
    assert not (pred / "metrics.json").exists()
    assert main(["evaluate", str(pred), str(ref)]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", str(pred), str(empty)]) == 1
    assert "no images" in capsys.readouterr().err


def test_misplaced_non_integer_and_background_only_cases_are_problems_not_scores(tmp_path, capsys):
    """A prediction at another origin or direction covers other voxels than its reference; NaN or fractional
    label values are not labels (np.rint would have scored NaN as class -2^63); and folders with no
    foreground at all leave nothing to score (means would be NaN). Each is a one-line problem."""
    pred, ref, arrays = _folders(tmp_path, 4)
    write(pred / "case_0.nii.gz", arrays["case_0"][0], origin=(10.0, -20.0, 7.5))
    write(pred / "case_1.nii.gz", arrays["case_1"][0], direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    with_nan = arrays["case_2"][0].astype(np.float32)
    with_nan[0, 0, 0] = np.nan
    write(pred / "case_2.nii.gz", with_nan)
    half = arrays["case_3"][1].astype(np.float32)
    half[1, 1, 1] = 0.5
    write(ref / "case_3.nii.gz", half)
    with pytest.raises(EvaluationError) as e:
        evaluate_folders(pred, ref)
    assert len(e.value.problems) == 4, e.value.problems
    p0, p1, p2, p3 = sorted(e.value.problems)
    assert p0.startswith("case case_0: prediction case_0.nii.gz: origin (10") and "reference case_0.nii.gz" in p0
    assert p1.startswith("case case_1: prediction case_1.nii.gz: direction")
    assert p2 == f"case case_2: {pred / 'case_2.nii.gz'}: 1 voxel(s) hold non-integer values such as nan; " \
                 "expected integer labels"
    assert p3 == f"case case_3: {ref / 'case_3.nii.gz'}: 1 voxel(s) hold non-integer values such as 0.5; " \
                 "expected integer labels"
    assert not (pred / "metrics.json").exists()
    empty_pred, empty_ref = tmp_path / "bp", tmp_path / "br"
    write(empty_pred / "a.nii.gz", np.zeros((4, 5, 6), np.uint8))
    write(empty_ref / "a.nii.gz", np.zeros((4, 5, 6), np.uint8))
    assert main(["evaluate", str(empty_pred), str(empty_ref)]) == 1
    err = capsys.readouterr().err
    assert "every prediction and reference is background only; nothing to score" in err and "Traceback" not in err
    assert main(["evaluate", str(empty_pred), str(empty_ref), "--labels", "1"]) == 0  # absent from both: Dice 1
    assert json.loads((empty_pred / "metrics.json").read_text())["mean"]["dice"] == 1.0


def test_cli_prints_a_table(tmp_path, capsys):
    pred, ref, _ = _folders(tmp_path)
    assert main(["evaluate", str(pred), str(ref), "--labels", "1"]) == 0
    out = capsys.readouterr().out
    assert "hd95_mm" in out and "mean" in out and "3 case(s)" in out
