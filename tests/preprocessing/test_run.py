"""``autoseg preprocess`` on generated datasets: storage, skipping, failures by case id, interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.demo import make_synthetic_dataset
from autoseg.io import read_image
from autoseg.parallel import CaseError
from autoseg.plans import load_plans
from autoseg.preprocessing.run import preprocess_run
from autoseg.preprocessing.storage import CASE_FILES, chunking, read_case_arrays, read_class_locations, read_properties
from autoseg.preprocessing.transform import labels_to_original

HIPPOCAMPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "MSD_Task04_Hippocampus"


def planned(tmp_path: Path, n_cases: int = 4, shape=(20, 28, 24), spacing=(0.8, 0.8, 2.0)) -> tuple[Path, Path]:
    data = make_synthetic_dataset(tmp_path / "data", n_cases=n_cases, shape=shape, spacing_xyz=spacing)
    run = tmp_path / "run"
    assert main(["plan", str(data), "-o", str(run), "--device", "cpu", "--no-progress"]) == 0
    return data, run


def check_complete(run: Path, n: int) -> None:
    """Every case has all its files, no temporaries, and arrays agree with the properties."""
    folder = run / "preprocessed"
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    ids = sorted(p.name[:-5] for p in folder.glob("*.json"))
    assert len(ids) == n
    for cid in ids:
        assert all((folder / f"{cid}{s}").is_file() for s in CASE_FILES)
        props = read_properties(folder, cid)
        data, seg = read_case_arrays(folder, cid)
        assert list(data.shape[1:]) == list(seg.shape[1:]) == props.shape_after_resampling
        assert data.dtype == np.float32 and seg.dtype == np.uint8


def test_preprocess_writes_every_case_and_undoes_exactly(tmp_path, capsys):
    data, run = planned(tmp_path)
    assert main(["preprocess", str(run), "--no-progress"]) == 0
    assert "preprocessed 4 case(s)" in capsys.readouterr().out
    check_complete(run, 4)
    plans = load_plans(run / "plans.json")
    folder = run / "preprocessed"
    for i in range(4):
        cid = f"case_{i:03d}"
        props = read_properties(folder, cid)
        d, s = read_case_arrays(folder, cid)
        seg = s[0]
        # the synthetic data is planned at its own spacing (NIfTI keeps it as float32: 0.8 -> 0.800000012),
        # so nothing is resampled and the label map goes back to the original exactly
        assert plans.target_spacing == pytest.approx(props.spacing, rel=1e-6)
        assert props.shape_after_resampling == props.shape_after_crop
        original, geo = read_image(data / "labelsTr" / f"{cid}.nii.gz")
        np.testing.assert_array_equal(labels_to_original(seg, props, plans.resampling, [0, 1, 2]), original[0])
        assert props.geometry == geo
        # per-case z-score inside the body: cropping the synthetic ellipsoid's box keeps < 75 % of the volume,
        # so the plan normalises within the non-zero mask and zeroes the rest
        assert plans.normalization[0].use_mask
        body = read_image(data / "imagesTr" / f"{cid}_0000.nii.gz")[0][0] != 0
        box = tuple(slice(a, b) for a, b in props.bbox)
        values = d[0][body[box]]
        assert abs(float(values.mean())) < 1e-4 and abs(float(values.std()) - 1) < 1e-3
        assert np.all(d[0][~body[box]] == 0)
        # a random patch read from the chunked file equals the same slice of the whole array
        whole = d[:]
        assert np.array_equal(d[0, 1:9, 2:14, 3:11], whole[0, 1:9, 2:14, 3:11])
        locs = read_class_locations(folder, cid)
        for k, coords in locs.items():
            assert np.all(seg[tuple(coords.T)] == k)


def test_second_run_skips_and_changes_are_redone(tmp_path, capsys):
    data, run = planned(tmp_path)
    assert main(["preprocess", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["preprocess", str(run), "--no-progress"]) == 0
    assert "preprocessed 0 case(s)" in capsys.readouterr().out
    # a source file rewritten (new mtime): only that case is redone
    label = data / "labelsTr" / "case_002.nii.gz"
    os.utime(label, ns=(time.time_ns(), time.time_ns() + 10**9))
    r = preprocess_run(run, 1, progress=False)
    assert r.written == ["case_002"] and len(r.skipped) == 3
    assert preprocess_run(run, 1, progress=False, force=True).written == [f"case_{i:03d}" for i in range(4)]


def test_cases_no_longer_planned_are_removed(tmp_path):
    data, run = planned(tmp_path, n_cases=4)
    preprocess_run(run, 1, progress=False)
    for f in list((data / "imagesTr").glob("case_003*")) + [data / "labelsTr" / "case_003.nii.gz"]:
        f.unlink()
    meta = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps(meta | {"numTraining": 3}))
    assert main(["plan", str(data), "-o", str(run), "--device", "cpu", "--no-progress"]) == 0
    r = preprocess_run(run, 1, progress=False)
    assert r.written == [] and len(r.skipped) == 3
    assert not list((run / "preprocessed").glob("case_003*"))
    check_complete(run, 3)


def test_failing_case_is_named_and_others_complete(tmp_path, capsys):
    data, run = planned(tmp_path, n_cases=4)
    (data / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(CaseError, match="case case_001: ValueError: case_001: .*case_001_0000.nii.gz"):
        preprocess_run(run, 2, progress=False)
    check_complete(run, 3)
    assert main(["preprocess", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: case case_001:") and "Traceback" not in err


def test_missing_plan_is_a_clear_error(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "nothing"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "plans.json: missing; run 'autoseg plan DATASET_DIR -o" in err


def test_kill_and_rerun_leaves_a_complete_consistent_folder(tmp_path):
    """SIGKILL mid-run (no cleanup code runs), leftovers simulated, then a rerun finishes the job."""
    data, run = planned(tmp_path, n_cases=12, shape=(40, 96, 96), spacing=(0.7, 0.7, 1.7))
    cmd = [sys.executable, "-m", "autoseg", "preprocess", str(run), "-j", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    folder = run / "preprocessed"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and len(list(folder.glob("*.json"))) < 2:
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(folder.glob("*.json")))
    (folder / ".tmp-deadbeef-case_011_data.b2nd").write_bytes(b"half")  # what a kill mid-write leaves
    (folder / "case_011_seg.b2nd").write_bytes(b"half")  # an array without its JSON: not a complete case
    r = preprocess_run(run, 2, progress=False)
    assert len(r.written) == 12 - done and len(r.skipped) == done
    check_complete(run, 12)


def test_chunking_fits_patch_and_cache():
    chunks, blocks = chunking((2, 200, 512, 512), 4, [64, 192, 192])
    assert chunks[0] == blocks[0] == 1
    assert all(c <= p for c, p in zip(chunks[1:], [64, 192, 192]))
    assert np.prod(blocks) * 4 <= 128 * 2**10 and np.prod(chunks) * 4 <= 4 * 2**20
    assert chunking((1, 10, 12, 14), 4, [64, 64, 64])[0] == (1, 10, 12, 14)


@pytest.mark.slow
@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="real data not present")
def test_preprocess_real_hippocampus(tmp_path):
    run = tmp_path / "run"
    assert main(["plan", str(HIPPOCAMPUS), "-o", str(run), "--device", "cpu", "--no-progress"]) == 0
    r = preprocess_run(run, None, progress=False)
    assert len(r.written) == 200
    check_complete(run, 200)
