"""``autoseg predict`` / ``Predictor`` / ``autoseg ensemble``: geometry, failures, reruns, averaging."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.inference.folder import find_scans, load_probabilities
from autoseg.inference.predictor import Predictor
from autoseg.io import read_image

from ..builders import DIRECTION, ORIGIN, write


def scans(folder, n=2, shape=(14, 30, 26), spacing=(0.8, 0.9, 2.5)):
    """Oblique, anisotropic, non-zero-origin scans in nnU-Net naming."""
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.normal(100, 10, shape).astype(np.float32)
        img[4:9, 8:20, 6:18] += 60
        write(folder / f"scan_{i}_0000.nii.gz", img, spacing=spacing)
    return folder


def test_prediction_has_the_input_geometry(trained_run, tmp_path, capsys):
    src = scans(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--no-tta"]) == 0
    assert "predicted 2 case(s)" in capsys.readouterr().out
    for i in range(2):
        img, g_in = read_image(src / f"scan_{i}_0000.nii.gz")
        seg, g_out = read_image(out / f"scan_{i}.nii.gz")
        assert seg.shape[1:] == img.shape[1:]
        assert g_out.spacing == pytest.approx(g_in.spacing) and g_out.origin == pytest.approx(ORIGIN)
        assert g_out.direction == pytest.approx(DIRECTION)
        assert set(np.unique(seg)) <= {0, 1, 2}


def test_bad_scan_is_named_and_the_others_are_written(trained_run, tmp_path, capsys):
    src = scans(tmp_path / "in")
    (src / "broken_0000.nii.gz").write_bytes(b"garbage")
    write(src / "nan_0000.nii.gz", np.full((8, 8, 8), np.nan, np.float32))
    out = tmp_path / "out"
    assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--no-tta"]) == 1
    captured = capsys.readouterr()
    assert "case broken" in captured.err and "case nan" in captured.err and "Traceback" not in captured.err
    assert "predicted 2 case(s)" in captured.out and "2 failed" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["scan_0.nii.gz", "scan_1.nii.gz"]
    # rerun: done cases are skipped, --overwrite redoes them
    (src / "broken_0000.nii.gz").unlink()
    (src / "nan_0000.nii.gz").unlink()
    assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--no-tta"]) == 0
    assert "skipped 2 already done" in capsys.readouterr().out
    assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--no-tta",
                 "--overwrite"]) == 0
    assert "predicted 2 case(s)" in capsys.readouterr().out


def test_empty_folder_and_missing_fold(trained_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--run",
                 str(trained_run)]) == 1
    assert "no images" in capsys.readouterr().err
    assert main(["predict", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--run", str(trained_run),
                 "--folds", "2"]) == 1
    assert "fold(s) 2 have no checkpoint_final.pt" in capsys.readouterr().err


def test_predictor_api(trained_run):
    p = Predictor.from_run(trained_run, folds=["0"], tta=False)
    rng = np.random.default_rng(1)
    image = rng.normal(100, 10, (12, 20, 18)).astype(np.float32)
    result = p.predict(image, spacing=(1.5, 1.0, 1.0), probabilities=True)
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert result.probabilities is not None and result.probabilities.shape == (3, *image.shape)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(result.labels, result.probabilities.argmax(0))
    with pytest.raises(ValueError, match="channel"):
        p.predict(np.zeros((2, 4, 4, 4)), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="NaN"):
        p.predict(np.full((4, 4, 4), np.nan), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        p.predict(image)


def test_two_folds_average_and_ensemble(trained_run, tmp_path, capsys):
    src = scans(tmp_path / "in", n=1)
    outs = {}
    for fold in ("0", "1"):
        outs[fold] = tmp_path / f"f{fold}"
        assert main(["predict", "-i", str(src), "-o", str(outs[fold]), "--run", str(trained_run), "--folds", fold,
                     "--no-tta", "--save-probabilities"]) == 0
    both = tmp_path / "both"
    assert main(["predict", "-i", str(src), "-o", str(both), "--run", str(trained_run), "--no-tta",
                 "--save-probabilities"]) == 0
    assert main(["ensemble", str(outs["0"]), str(outs["1"]), "-o", str(tmp_path / "ens")]) == 0
    p0, values, _ = load_probabilities(outs["0"] / "scan_0.npz")
    p1, _, _ = load_probabilities(outs["1"] / "scan_0.npz")
    pb, _, _ = load_probabilities(both / "scan_0.npz")
    np.testing.assert_allclose(pb, (p0 + p1) / 2, atol=2e-3)  # float16 storage
    ens, _ = read_image(tmp_path / "ens" / "scan_0.nii.gz")
    expected = np.asarray(values)[((p0 + p1) / 2).argmax(0)]
    assert np.mean(ens[0] == expected) > 0.999  # ties under float16 rounding may differ
    assert main(["ensemble", str(outs["0"]), "-o", str(tmp_path / "x")]) == 1
    assert "at least two" in capsys.readouterr().err


def test_find_scans_naming(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b.nii.gz", "scan_2024.nii.gz", "notes.txt", "c_0001.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    cases, problems = find_scans(tmp_path, 2)
    assert [(c.case_id, len(c.files)) for c in cases] == [("a", 2), ("b", 1)]
    assert any("case c" in p for p in problems) and any("case scan" in p for p in problems)
    cases, problems = find_scans(tmp_path, 1)
    assert {c.case_id for c in cases} >= {"b", "scan_2024"} and not any("scan" in p for p in problems)
