"""The plan's warm-up: the device detected, and planning's libraries loaded as the plan's configurations need
them, in a background thread beside the fingerprint."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

import autoseg.planning.warmup as warmup_module
from autoseg.cli import main
from autoseg.demo import make_synthetic_dataset
from autoseg.device import detect_device
from autoseg.planning.warmup import Warmup, wants_meta_kernels


@pytest.mark.parametrize(("configs", "kind", "expected"), [
    (None, "cpu", False),                  # CPU default: 3d and 2d, our U-Net with its exact cost model
    (None, "cuda", False),                 # GPU default: also SegResNet and the Attention U-Net, counted models
    (["3d", "patch_free"], "cpu", True),   # patch-free is measured on the meta device
    (["unetr"], "cpu", False),
    (["3d", "2d"], "cuda", False),
])
def test_which_plans_load_the_meta_kernels(configs, kind, expected):
    assert wants_meta_kernels(configs, kind) == expected


def test_the_warmup_detects_the_device_as_detection_does():
    for args in ((None, None, "cpu"), (["3d"], 12.0, "auto")):
        w = Warmup(*args)
        assert w.device.result(timeout=120) == detect_device(*args[1:])
        w.finish()


def test_a_detection_error_reaches_the_caller():
    w = Warmup(None, -1.0, "auto")
    with pytest.raises(ValueError, match="--gpu-memory must be positive"):
        w.device.result(timeout=120)
    w.finish()


def test_the_device_is_known_before_the_libraries_have_loaded(monkeypatch):
    release, loaded = threading.Event(), []
    monkeypatch.setattr(warmup_module, "_load", lambda *a: loaded.append(release.wait(60)))
    w = Warmup(["unetr"], None, "cpu")
    try:
        assert w.device.result(timeout=120).kind == "cpu"
        assert loaded == []  # still loading
    finally:
        release.set()
    w.finish()
    assert loaded == [True] and not w._thread.is_alive()


_PROBE = """
import json, sys
from autoseg.planning.warmup import Warmup
Warmup({configs}, None, "cpu").finish(300)
print(json.dumps([m in sys.modules for m in ("torch", "autoseg.planning.planner", "monai", "torch._dynamo")]))
"""


@pytest.mark.parametrize(("configs", "loaded"), [
    (["3d", "2d"], [True, True, False, False]),
    (["3d", "segresnet", "attention_unet", "unetr"], [True, True, False, False]),  # MONAI's are counted
    (["3d", "patch_free"], [True, True, False, True]),
])
def test_the_warmup_loads_what_the_configurations_need(configs, loaded):
    """In a fresh interpreter (this one has imported everything already)."""
    out = subprocess.run([sys.executable, "-c", _PROBE.format(configs=configs)], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    assert json.loads(out.strip().splitlines()[-1]) == loaded


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "Synthetic", n_cases=4, shape=(12, 16, 16))


def test_the_plan_records_the_detected_device_not_a_placeholder(dataset, tmp_path, capsys):
    """Computed, then reused: the fingerprint is read before the device is known either way."""
    run = tmp_path / "run"
    for memory, how in (("10", "computed"), ("12", "reused")):
        assert main(["plan", str(dataset), "-o", str(run), "--no-progress", "--gpu-memory", memory]) == 0
        assert f"({how})" in capsys.readouterr().out
        for name in ("fingerprint.json", "plans.json"):
            device = json.loads((run / name).read_text())["device"]
            assert (device["kind"], device["budget_gib"], device["budget_source"]) == \
                ("cuda", float(memory), "--gpu-memory")


@pytest.mark.parametrize("device_args", [["--device", "auto"], ["--device", "cuda", "--gpu-memory", "10"]])
def test_the_fingerprint_runs_while_the_libraries_load(dataset, tmp_path, monkeypatch, device_args):
    """Loading (made slow here) is unfinished when the fingerprint starts, and finishes during it."""
    import autoseg.fingerprint as fingerprint

    release, loaded, seen = threading.Event(), threading.Event(), []

    def slow_load(*args):
        release.wait(10)
        loaded.set()

    monkeypatch.setattr(warmup_module, "_load", slow_load)
    real = fingerprint.fingerprint_dataset

    def watched(*args, **kwargs):
        seen.append(loaded.is_set())
        release.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(fingerprint, "fingerprint_dataset", watched)
    assert main(["plan", str(dataset), "-o", str(tmp_path / "run"), "--no-progress", *device_args]) == 0
    assert seen == [False] and loaded.is_set()


def test_a_bad_gpu_memory_is_reported_before_the_dataset_is_read(dataset, tmp_path, capsys, monkeypatch):
    import autoseg.fingerprint as fingerprint

    monkeypatch.setattr(fingerprint, "fingerprint_dataset", _never)
    assert main(["plan", str(dataset), "-o", str(tmp_path / "run"), "--no-progress", "--gpu-memory", "0"]) == 1
    assert "--gpu-memory must be positive, got 0" in capsys.readouterr().err


def test_a_failing_plan_waits_for_the_loading_before_it_returns(dataset, tmp_path, monkeypatch):
    """No command exits while an import is half done in the thread."""
    import autoseg.fingerprint as fingerprint

    done = []
    monkeypatch.setattr(warmup_module, "_load", lambda *a: (time.sleep(1.0), done.append(True)))
    monkeypatch.setattr(fingerprint, "fingerprint_dataset", _dataset_error)
    assert main(["plan", str(dataset), "-o", str(tmp_path / "run"), "--no-progress"]) == 1
    assert done == [True]


def _never(*args, **kwargs):
    raise AssertionError("the fingerprint ran before the device was checked")


def _dataset_error(*args, **kwargs):
    from autoseg.dataset import DatasetError

    raise DatasetError(["case_000: a made-up problem"])


def test_a_missing_gpu_is_reported_before_the_fingerprint(dataset, tmp_path, capsys, monkeypatch):
    import autoseg.fingerprint as fingerprint

    monkeypatch.setattr(fingerprint, "fingerprint_dataset", _never)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["plan", str(dataset), "-o", str(tmp_path / "run"), "--no-progress", "--device", "cuda"]) == 1
    assert "--device cuda was asked for but no CUDA GPU is visible" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
