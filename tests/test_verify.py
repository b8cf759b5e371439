"""Verification: every bad input reported at once, one line each naming case, file, problem, expectation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.dataset import load_dataset
from autoseg.verify import read_case

from .builders import DIRECTION, ORIGIN, SPACING, good_case, nnunet_dataset, write


def problems_of(root, case_id):
    spec = load_dataset(root)
    case = next(c for c in spec.cases if c.case_id == case_id)
    loaded, problems = read_case(case, len(spec.channel_names), spec.labels)
    assert (loaded is None) == bool(problems)
    return problems


def test_clean_case_loads_with_smallest_label_type(tmp_path):
    root = nnunet_dataset(tmp_path / "d", n_channels=2)
    spec = load_dataset(root)
    loaded, problems = read_case(spec.cases[0], 2, spec.labels)
    assert problems == [] and loaded.image.shape == (2, 8, 12, 10) and loaded.image.dtype == np.float32
    assert loaded.label.dtype == np.uint8 and set(np.unique(loaded.label)) == {0, 1, 2}


def test_float_label_with_integer_values_is_cast(tmp_path):
    root = nnunet_dataset(tmp_path / "d")
    _, label = good_case(0)
    write(root / "labelsTr" / "c0.nii.gz", label.astype(np.float32))
    spec = load_dataset(root)
    loaded, problems = read_case(spec.cases[0], 1, spec.labels)
    assert problems == [] and loaded.label.dtype == np.uint8
    assert np.array_equal(loaded.label, label)


# each breaks case c1 in one way: (what to do to the dataset, words the one problem line must contain)
def _corrupt(root):
    (root / "imagesTr" / "c1_0000.nii.gz").write_bytes(b"\x1f\x8b garbage")


def _shape(root):
    write(root / "labelsTr" / "c1.nii.gz", np.zeros((8, 12, 11), np.uint8))


def _spacing(root):
    write(root / "labelsTr" / "c1.nii.gz", good_case(1)[1], spacing=(0.8, 0.9, 3.0))


def _origin(root):
    write(root / "labelsTr" / "c1.nii.gz", good_case(1)[1], origin=(10.0, -20.0, 7.5))


def _direction(root):
    write(root / "labelsTr" / "c1.nii.gz", good_case(1)[1], direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def _unknown_label(root):
    lab = good_case(1)[1]
    lab[0, 0, 0] = 7
    write(root / "labelsTr" / "c1.nii.gz", lab)


def _fractional_label(root):
    lab = good_case(1)[1].astype(np.float32)
    lab[0, 0, :3] = 0.5
    write(root / "labelsTr" / "c1.nii.gz", lab)


def _nan(root):
    img = good_case(1)[0]
    img[1, 1, 1] = np.nan
    img[2, 2, 2:4] = np.inf
    write(root / "imagesTr" / "c1_0000.nii.gz", img)


def _missing_channel(root):
    (root / "imagesTr" / "c1_0000.nii.gz").unlink()


def _two_d(root):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 10), np.float32)), str(root / "imagesTr" / "c1_0000.nii.gz"))


BROKEN = {
    "corrupt": (_corrupt, ["c1_0000.nii.gz", "cannot be read as an image"]),
    "shape": (_shape, ["labelsTr/c1.nii.gz", "shape (8, 12, 11) differs from (8, 12, 10)", "must align"]),
    "spacing": (_spacing, ["c1.nii.gz", "spacing (0.8, 0.9, 3) mm differs from (0.8, 0.9, 2.5) mm"]),
    "origin": (_origin, ["c1.nii.gz", "origin (10, -20, 7.5) mm differs from (10, -20, 5.5) mm"]),
    "direction": (_direction, ["c1.nii.gz", "direction (1, 0, 0, 0, 1, 0, 0, 0, 1) differs"]),
    "unknown label": (_unknown_label, ["c1.nii.gz", "label value(s) [7] are not declared", "[0, 1, 2]"]),
    "fractional label": (_fractional_label, ["3 voxel(s) hold non-integer label values such as 0.5",
                                             "expected integers [0, 1, 2]"]),
    "nan": (_nan, ["c1_0000.nii.gz", "contains 1 NaN and 2 infinite voxel(s)", "expected finite"]),
    "missing file": (_missing_channel, ["c1_0000.nii.gz", "file does not exist"]),
    "2d": (_two_d, ["c1_0000.nii.gz", "is 2D; expected a 3D image"]),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_each_bad_input_gives_one_clear_line(tmp_path, name):
    root = nnunet_dataset(tmp_path / "d")
    breaker, words = BROKEN[name]
    breaker(root)
    problems = problems_of(root, "c1")
    assert len(problems) == 1, problems
    assert problems[0].startswith("c1: ")
    for w in words:
        assert w in problems[0], (w, problems[0])
    assert problems_of(root, "c0") == []


def test_small_geometry_differences_are_tolerated(tmp_path):
    root = nnunet_dataset(tmp_path / "d")
    lab = good_case(1)[1]
    write(root / "labelsTr" / "c1.nii.gz", lab, spacing=tuple(s * (1 + 1e-5) for s in SPACING),
          origin=tuple(o + 1e-4 for o in ORIGIN), direction=tuple(d + 1e-5 for d in DIRECTION))
    assert problems_of(root, "c1") == []


def test_channels_must_align_with_each_other(tmp_path):
    root = nnunet_dataset(tmp_path / "d", n_channels=2)
    write(root / "imagesTr" / "c2_0001.nii.gz", good_case(2)[0], origin=(0.0, 0.0, 0.0))
    problems = problems_of(root, "c2")
    assert any("c2_0001.nii.gz: origin" in p and "channels must align" in p for p in problems)


def test_msd_4d_file_with_wrong_channel_count(tmp_path):
    from autoseg.demo import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "m", n_cases=2, layout="msd", n_channels=2, shape=(6, 8, 7))
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "T1"}
    (root / "dataset.json").write_text(json.dumps(meta))
    problems = problems_of(root, "case_000")
    assert problems == [f"case_000: {root / 'imagesTr' / 'case_000.nii.gz'}: has 2 channel(s); expected 1 "
                        "channel(s) as declared in dataset.json"]


def test_cli_reports_every_problem_and_writes_nothing(tmp_path, capsys):
    root = nnunet_dataset(tmp_path / "d", n_cases=6)
    _corrupt_case = root / "imagesTr" / "c1_0000.nii.gz"
    _corrupt_case.write_bytes(b"junk")
    _unknown_label(root)  # c1 again: its label is also wrong
    lab = good_case(3)[1]
    write(root / "labelsTr" / "c3.nii.gz", lab, spacing=(1.0, 1.0, 1.0))
    img = good_case(4)[0]
    img[0, 0, 0] = np.nan
    write(root / "imagesTr" / "c4_0000.nii.gz", img)
    (root / "labelsTr" / "c5.nii.gz").unlink()
    write(root / "imagesTr" / "stray_0000.nii.gz", img)
    capsys.readouterr()
    assert main(["verify", str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # c1 twice (corrupt image, unknown label), c3, c4, c5's and stray's orphan images, numTraining (6 vs 5)
    assert err[-1] == "7 problem(s) found; nothing was written."
    lines = err[:-1]
    assert len(lines) == 7 and all(ln.startswith("error: ") for ln in lines)
    joined = "\n".join(lines)
    for needle in ("c1: ", "c1_0000.nii.gz: cannot be read", "label value(s) [7]", "c3: ", "spacing (1, 1, 1) mm",
                   "c4: ", "1 NaN", "stray_0000.nii.gz: image has no matching label", "c5_0000.nii.gz",
                   "numTraining is 6 but 5 cases were found"):
        assert needle in joined, needle
    assert "Traceback" not in joined
    run = tmp_path / "run"
    assert main(["plan", str(root), "-o", str(run), "--no-progress"]) == 1
    assert not run.exists()


def test_cli_verify_clean_dataset(tmp_path, capsys):
    root = nnunet_dataset(tmp_path / "d", n_cases=2)
    assert main(["verify", str(root), "--no-progress"]) == 0
    assert "2 cases, nnunet layout" in capsys.readouterr().out


def test_empty_folder(tmp_path, capsys):
    root = tmp_path / "empty"
    root.mkdir()
    assert main(["verify", str(root), "--no-progress"]) == 1
    assert "dataset.json: missing" in capsys.readouterr().err
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}}')
    assert main(["plan", str(root), "-o", str(tmp_path / "r"), "--no-progress"]) == 1
    assert "no training cases found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_channel_that_cannot_be_read_does_not_shift_the_others_problems(tmp_path):
    """Three channels, the first corrupt: the second's NaN and the third's shifted origin are reported
    against their own files, the origin compared with the second (the first one read)."""
    root = nnunet_dataset(tmp_path / "d", n_channels=3)
    image, _ = good_case(1)
    (root / "imagesTr" / "c1_0000.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with_nan = image.copy()
    with_nan[0, 0, 0] = np.nan
    write(root / "imagesTr" / "c1_0001.nii.gz", with_nan)
    write(root / "imagesTr" / "c1_0002.nii.gz", image, origin=(10.0, -20.0, 7.5))
    problems = problems_of(root, "c1")
    assert len(problems) == 3, problems
    assert "c1_0000.nii.gz: cannot be read as an image" in problems[0]
    assert "c1_0001.nii.gz: contains 1 NaN and 0 infinite voxel(s)" in problems[1]
    assert "c1_0002.nii.gz: origin" in problems[2] and "of c1_0001.nii.gz; channels must align" in problems[2]
