"""Nothing lost whatever happens: locks, synced and checked writes, full disks, checkpoints that cannot be used
and why, colliding case ids and folders, relocated runs, non-finite scans, a case deleted during training."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg import atomic
from autoseg.atomic import WriteError, atomic_path
from autoseg.checkpoint import CHECKPOINT_FORMAT, CheckpointError, TrainState, load_checkpoint, save_checkpoint
from autoseg.cli import main
from autoseg.dataset import load_dataset
from autoseg.demo import make_synthetic_dataset
from autoseg.inference.folder import find_scans
from autoseg.inference.predictor import fill_nonfinite
from autoseg.io import Geometry, read_image, write_image
from autoseg.locking import JobLock, LockedError, fold_lock_path
from autoseg.preprocessing.storage import stored_references

GEOMETRY = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (12, 14, 16))


@pytest.fixture()
def file_size_limit():
    """Lower this process's file-size limit (``ulimit -f``) for the test: writes beyond it fail with EFBIG
    (Python ignores SIGXFSZ), as a full disk fails them with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def set_limit(n: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))

    yield set_limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# --- writes ---------------------------------------------------------------------------------------------
def test_a_write_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    assert len(synced) == 2 and Path(synced[0]).name.startswith(atomic.TMP_PREFIX) and synced[1] == str(tmp_path)


def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_stays(tmp_path, monkeypatch):
    target = tmp_path / "plans.json"
    target.write_text("old")

    def no_space(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "sync_path", no_space)
    with pytest.raises(WriteError) as e, atomic_path(target) as tmp:
        tmp.write_text("new")
    assert str(e.value).startswith(f"{target}: could not be written: the disk is full")
    assert str(e.value).endswith("the previous file is intact") and "\n" not in str(e.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plans.json"]


@pytest.mark.parametrize("writer", ["nifti", "checkpoint", "blosc2"])
def test_writers_that_hide_a_failed_write_are_caught(tmp_path, file_size_limit, writer):
    """SimpleITK's NIfTI writer leaves a truncated file without raising; torch and blosc2 raise their own
    RuntimeErrors. Each becomes one WriteError naming the file, and nothing is left under its name."""
    from autoseg.preprocessing.storage import write_b2nd

    target = tmp_path / {"nifti": "x.nii.gz", "checkpoint": "c.pt", "blosc2": "d.b2nd"}[writer]
    rng = np.random.default_rng(0)
    file_size_limit(20000)
    with pytest.raises(WriteError) as e:
        if writer == "nifti":
            write_image(rng.integers(0, 255, (40, 40, 40)).astype(np.uint8), GEOMETRY, target)
        elif writer == "checkpoint":
            save_checkpoint(target, torch.nn.Linear(100, 100), None, None, TrainState())
        else:
            write_b2nd(rng.random((1, 40, 40, 40), dtype=np.float32), target, [32, 32, 32])
    assert f"{target}: could not be written: over the file-size limit" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_write_image_reads_back_what_it_wrote(tmp_path):
    labels = np.random.default_rng(1).integers(0, 3, (12, 14, 16)).astype(np.uint8)
    write_image(labels, GEOMETRY, tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "a.nii.gz")[0][0], labels)


# --- locks ----------------------------------------------------------------------------------------------
def test_a_second_holder_is_refused_by_name_and_a_released_lock_leaves_nothing(tmp_path):
    path = tmp_path / ".fold_0.lock"
    with JobLock(path, "training of fold_0"):
        with pytest.raises(LockedError) as e:
            JobLock(path, "training of fold_0").acquire()
        assert f"training of fold_0 is already running: process {os.getpid()} on " in str(e.value)
    assert not path.exists()
    with JobLock(path, "training of fold_0"):  # free again
        pass


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_line(tmp_path, caplog):
    path = tmp_path / ".preprocess.lock"
    code = ("import sys, time; from autoseg.locking import JobLock; JobLock(sys.argv[1], 'x').acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=f"process {holder.pid} "):
        JobLock(path, "autoseg preprocess run").acquire()
    holder.kill()
    holder.wait()
    with caplog.at_level("WARNING"), JobLock(path, "autoseg preprocess run"):
        assert f"taking over the lock of process {holder.pid} " in caplog.text
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_fold_lock_lives_beside_the_fold_so_restart_keeps_it(tmp_path):
    assert fold_lock_path(tmp_path / "3d" / "fold_2") == tmp_path / "3d" / ".fold_2.lock"


# --- checkpoints ----------------------------------------------------------------------------------------
def _checkpoint(path: Path) -> Path:
    save_checkpoint(path, torch.nn.Linear(3, 2), None, None, TrainState(step=7))
    return path


def test_a_truncated_or_empty_checkpoint_is_called_corrupt(tmp_path):
    good = _checkpoint(tmp_path / "good.pt").read_bytes()
    big = tmp_path / "big.pt"
    save_checkpoint(big, torch.nn.Linear(100, 100), None, None, TrainState())
    cuts = (("cut.pt", good[: len(good) // 2]), ("cut_big.pt", big.read_bytes()[:5000]), ("empty.pt", b""),
            ("noise.pt", os.urandom(999)), ("memo.pt", b"\x80\x02h\x9a."))  # memo.pt: torch's reader raises KeyError
    for name, content in cuts:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="corrupt or truncated .*delete it, or train with --restart"):
            load_checkpoint(tmp_path / name)
    assert load_checkpoint(tmp_path / "good.pt")["state"].step == 7


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_holding_a_pickled_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"network": {}, "state": {}, "payload": _RunsCode(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="holds Python objects that autoseg refuses to load") as e:
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists() and "delete" not in str(e.value)


def test_a_newer_format_a_foreign_state_memory_and_permissions_are_told_apart(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path / "c.pt")
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format": CHECKPOINT_FORMAT + 1}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match=f"newer autoseg \\(checkpoint format {CHECKPOINT_FORMAT + 1}"):
        load_checkpoint(tmp_path / "newer.pt")
    torch.save({**payload, "state": {**payload["state"], "field_from_the_future": 1}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not match this autoseg version"):
        load_checkpoint(tmp_path / "other.pt")
    for exc, words in ((MemoryError(), "not enough memory"), (PermissionError(13, "Permission denied"),
                                                              "permission denied")):
        def fail(*a, exc=exc, **k):
            raise exc

        monkeypatch.setattr(torch, "load", fail)
        with pytest.raises(CheckpointError, match=words) as e:
            load_checkpoint(path)
        assert "delete" not in str(e.value) and "the file itself" in str(e.value)


# --- inputs that collide --------------------------------------------------------------------------------
def test_two_scans_with_one_case_id_are_refused_by_name(tmp_path):
    for name in ("a.nii.gz", "a.nii", "b_0000.nii.gz", "b_0000.nrrd", "c.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    cases, problems = find_scans(tmp_path, 1)
    assert [c.case_id for c in cases] == ["c"]
    assert any("case a: two files, a.nii and a.nii.gz" in p for p in problems)
    assert any("case b: two files for channel 0000" in p for p in problems)


def test_msd_entries_with_one_case_id_are_refused_by_name(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", n_cases=3, shape=(12, 14, 16), layout="msd")
    meta = json.loads((data / "dataset.json").read_text())
    (data / "imagesTr" / "other").mkdir()
    (data / "labelsTr" / "other").mkdir()
    first = meta["training"][0]
    for key in ("image", "label"):
        src = data / first[key]
        shutil.copy(src, src.parent / "other" / src.name)
    meta["training"].append({k: f"./{Path(v).parent.name}/other/{Path(v).name}" for k, v in first.items()})
    meta["numTraining"] = 4
    (data / "dataset.json").write_text(json.dumps(meta))
    spec = load_dataset(data)
    cid = Path(first["label"]).name.split(".")[0]
    assert cid not in {c.case_id for c in spec.cases}
    assert any(p.startswith(f"case {cid}: 2 training entries have this id") for p in spec.problems), spec.problems


# --- non-finite scans -----------------------------------------------------------------------------------
def test_fill_nonfinite_uses_each_channels_minimum_and_says_so():
    image = np.array([[[[1.0, np.nan, 3.0]]], [[[np.inf, -2.0, 5.0]]]], dtype=np.float32)
    fixed, notes = fill_nonfinite(image)
    np.testing.assert_array_equal(fixed, [[[[1.0, 1.0, 3.0]]], [[[-2.0, -2.0, 5.0]]]])
    assert notes == ["channel 0: 1 NaN/infinite voxel(s) set to the channel's minimum 1",
                     "channel 1: 1 NaN/infinite voxel(s) set to the channel's minimum -2"]
    with pytest.raises(ValueError, match="channel 0 has no finite voxel"):
        fill_nonfinite(np.full((1, 1, 1, 2), np.nan, dtype=np.float32))


def test_a_lock_released_by_a_process_that_ended_normally_leaves_nothing(tmp_path, caplog):
    """No file stays behind, so the next holder takes the lock without a take-over warning."""
    path = tmp_path / ".x.lock"
    code = "import sys; from autoseg.locking import JobLock; l = JobLock(sys.argv[1], 'x'); l.acquire(); l.release()"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    assert not path.exists()
    with caplog.at_level("WARNING"), JobLock(path, "x"):
        assert "taking over" not in caplog.text


def test_references_are_stored_by_preprocess(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", n_cases=3, shape=(12, 14, 16))
    run = tmp_path / "run"
    assert main(["plan", str(data), "-o", str(run), "--device", "cpu", "--no-progress"]) == 0
    assert main(["preprocess", str(run), "--no-progress"]) == 0
    refs = stored_references(run / "preprocessed")
    assert sorted(refs) == sorted(c.case_id for c in load_dataset(data).cases)
    for c in load_dataset(data).cases:
        assert refs[c.case_id].read_bytes() == c.label.read_bytes()


def test_temporaries_of_a_dead_writer_are_removed_and_a_live_writers_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_path / f"{atomic.TMP_PREFIX}{os.getpid()}-abcdef-a.json"
    theirs = tmp_path / f"{atomic.TMP_PREFIX}{dead.pid}-abcdef-b.json"
    old_style = tmp_path / f"{atomic.TMP_PREFIX}deadbeef-c.json"
    for p in (mine, theirs, old_style):
        p.write_text("half")
    assert atomic.remove_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [mine.name]
    assert atomic.remove_temporaries(tmp_path / "not-there") == 0  # a folder not made yet has none
    assert not (tmp_path / "not-there").exists()
    with atomic_path(tmp_path / "d.json") as tmp:
        assert tmp.name.startswith(f"{atomic.TMP_PREFIX}{os.getpid()}-")
        tmp.write_text("{}")
