"""Fingerprint statistics against numpy on generated volumes, and the cache."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.dataset import load_dataset
from autoseg.fingerprint import fingerprint_dataset, measure_case, nonzero_bbox

from .builders import write

SPACINGS = [(0.8, 0.8, 2.0), (0.7, 0.8, 2.5), (0.9, 0.8, 3.0)]  # x, y, z per case


def case_arrays(i: int):
    """Image (2 channels) with a zero margin; class 1 as three separate cubes, class 2 as two."""
    rng = np.random.default_rng(i)
    shape = (12, 20, 18)
    img = np.zeros((2, *shape), np.float32)
    img[:, 1:11, 2:17, 3:15] = rng.normal([[[[50.0]]], [[[-5.0]]]], 7.0, (2, 10, 15, 12))
    lab = np.zeros(shape, np.uint8)
    lab[2:4, 3:5, 4:6] = 1
    lab[6:8, 3:5, 4:6] = 1
    lab[2:4, 10:13, 10:12] = 1
    lab[5:9, 12:16, 4:8] = 2
    lab[9:10, 3:4, 12:14] = 2
    return img, lab


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp") / "d"
    for i in range(3):
        img, lab = case_arrays(i)
        for c in range(2):
            write(root / "imagesTr" / f"c{i}_{c:04d}.nii.gz", img[c], spacing=SPACINGS[i])
        write(root / "labelsTr" / f"c{i}.nii.gz", lab, spacing=SPACINGS[i])
    (root / "dataset.json").write_text(json.dumps({"name": "FP", "channel_names": {"0": "T1", "1": "ADC"},
                                                   "labels": {"background": 0, "a": 1, "b": 2}}))
    return root


def test_statistics_match_numpy(dataset):
    fp, reused = fingerprint_dataset(load_dataset(dataset), None, 1, progress=False)
    assert not reused and fp.n_cases == 3
    cases = [case_arrays(i) for i in range(3)]
    for c in range(2):
        fg = np.concatenate([img[c][lab > 0] for img, lab in cases]).astype(np.float64)
        st = fp.channels[c]
        assert st.n_voxels == fg.size
        assert st.mean == pytest.approx(fg.mean(), rel=1e-6)
        assert st.std == pytest.approx(fg.std(), rel=1e-5)
        assert (st.min, st.max) == (pytest.approx(fg.min()), pytest.approx(fg.max()))
        assert st.percentile_00_5 == pytest.approx(np.percentile(fg, 0.5), rel=1e-5)
        assert st.percentile_99_5 == pytest.approx(np.percentile(fg, 99.5), rel=1e-5)
        # per case too
        img, lab = cases[1]
        one = img[c][lab > 0].astype(np.float64)
        assert fp.cases[1].channels[c].mean == pytest.approx(one.mean(), rel=1e-6)
    for cf in fp.cases:
        assert cf.class_voxels == {1: 8 + 8 + 12, 2: 64 + 2}
        assert cf.class_components == {1: 3, 2: 2}
        assert cf.crop_bbox == [[1, 11], [2, 17], [3, 15]] and cf.shape_after_crop == [10, 15, 12]
        assert cf.shape == [12, 20, 18]
    assert [c.spacing for c in fp.cases] == [pytest.approx([z, y, x]) for x, y, z in SPACINGS]
    assert fp.median_spacing == pytest.approx([2.5, 0.8, 0.8])
    assert fp.median_shape == [12, 20, 18] and fp.median_shape_after_crop == [10, 15, 12]
    assert fp.median_relative_size_after_crop == pytest.approx(10 * 15 * 12 / (12 * 20 * 18))
    a, b = fp.classes
    assert (a.value, a.name, a.total_voxels, a.cases_present, a.median_components) == (1, "a", 84, 3, 3.0)
    assert b.share_of_foreground == pytest.approx(66 / (28 + 66))


def test_same_result_with_one_or_two_workers(dataset):
    spec = load_dataset(dataset)
    one = fingerprint_dataset(spec, None, 1, progress=False)[0]
    two = fingerprint_dataset(spec, None, 2, progress=False)[0]
    assert dataclasses.asdict(one) == dataclasses.asdict(two)


def test_sampling_is_seeded_and_bounded(dataset):
    spec = load_dataset(dataset)
    case = spec.cases[0]
    fp1, samples1, _ = measure_case(case, 2, spec.labels, 20, seed=7)
    fp2, samples2, _ = measure_case(case, 2, spec.labels, 20, seed=7)
    _, samples3, _ = measure_case(case, 2, spec.labels, 20, seed=8)
    assert [s.size for s in samples1] == [20, 20]
    assert np.array_equal(samples1[0], samples2[0]) and not np.array_equal(samples1[0], samples3[0])
    img, lab = case_arrays(0)
    assert np.isin(samples1[0], img[0][lab > 0]).all()
    # exact statistics do not depend on the sample
    assert fp1.channels[0].mean == pytest.approx(img[0][lab > 0].astype(np.float64).mean(), rel=1e-6)


def test_nonzero_bbox():
    img = np.zeros((2, 5, 6, 7), np.float32)
    img[0, 1, 2, 3] = 1
    img[1, 3, 4, 5] = -2
    assert nonzero_bbox(img) == [[1, 4], [2, 5], [3, 6]]
    assert nonzero_bbox(np.zeros((1, 3, 4, 5))) == [[0, 3], [0, 4], [0, 5]]


def test_cache_reused_and_invalidated(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["plan", str(dataset), "-o", str(run), "--no-progress", "--device", "cpu"]
    assert main(args) == 0 and "(computed)" in capsys.readouterr().out
    assert main(args) == 0 and "(reused)" in capsys.readouterr().out
    label = dataset / "labelsTr" / "c2.nii.gz"
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert main(args) == 0 and "(computed)" in capsys.readouterr().out
    finally:
        os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(args + ["--refingerprint"]) == 0 and "(computed)" in capsys.readouterr().out
    assert json.loads((run / "fingerprint.json").read_text())["device"]["kind"] == "cpu"
