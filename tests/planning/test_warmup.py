"""The plan's warm-up: the device detected, and planning's libraries loaded as the plan's configurations need
them, in a background thread beside the fingerprint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autoseg.cli import main
from autoseg.demo import make_synthetic_dataset
from autoseg.device import detect_device
from autoseg.planning.warmup import start_warmup, wanted_libraries


@pytest.mark.parametrize(("configs", "kind", "expected"), [
    (None, "cpu", (False, False)),           # CPU default: 3d and 2d, our U-Net with its exact cost model
    (None, "cuda", (True, True)),            # GPU default: also SegResNet and the Attention U-Net
    (["3d", "patch_free"], "cpu", (False, True)),  # patch-free is ours but measured on the meta device
    (["unetr"], "cpu", (True, True)),
    (["3d", "2d"], "cuda", (False, False)),
])
def test_which_libraries_a_plan_loads(configs, kind, expected):
    assert wanted_libraries(configs, kind) == expected


def test_the_warmup_detects_the_device_as_detection_does():
    assert start_warmup(None, None, "cpu").result(timeout=120) == detect_device(None, "cpu")
    assert start_warmup(["3d"], 12.0, "auto").result(timeout=120) == detect_device(12.0, "auto")


def test_a_detection_error_reaches_the_caller():
    with pytest.raises(ValueError, match="--gpu-memory must be positive"):
        start_warmup(None, -1.0, "auto").result(timeout=120)


_PROBE = """
import json, sys
from autoseg.planning.warmup import start_warmup
start_warmup({configs}, None, "cpu").result(timeout=300)
print(json.dumps([m in sys.modules for m in ("torch", "autoseg.planning.planner", "monai", "torch._dynamo")]))
"""


@pytest.mark.parametrize(("configs", "loaded"), [
    (["3d", "2d"], [True, True, False, False]),
    (["3d", "segresnet"], [True, True, True, True]),
])
def test_the_warmup_loads_what_the_configurations_need(configs, loaded):
    """In a fresh interpreter (this one has imported everything already)."""
    out = subprocess.run([sys.executable, "-c", _PROBE.format(configs=configs)], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    assert json.loads(out.strip().splitlines()[-1]) == loaded


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "Synthetic", n_cases=4, shape=(12, 16, 16))


def test_the_plan_records_the_detected_device_not_a_placeholder(dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["plan", str(dataset), "-o", str(run), "--no-progress", "--gpu-memory", "10"]) == 0
    for name in ("fingerprint.json", "plans.json"):
        device = json.loads((run / name).read_text())["device"]
        assert (device["kind"], device["budget_gib"], device["budget_source"]) == ("cuda", 10.0, "--gpu-memory")


def test_a_missing_gpu_is_reported_before_the_fingerprint(dataset, tmp_path, capsys, monkeypatch):
    import autoseg.fingerprint as fingerprint

    def never(*args, **kwargs):
        raise AssertionError("the fingerprint ran before the device was checked")

    monkeypatch.setattr(fingerprint, "fingerprint_dataset", never)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["plan", str(dataset), "-o", str(tmp_path / "run"), "--no-progress", "--device", "cuda"]) == 1
    assert "--device cuda was asked for but no CUDA GPU is visible" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
