"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def deterministic_setting_restored():
    """PyTorch's deterministic-algorithms setting as it was before the test, whatever the test set."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture
def step_time_fixed(monkeypatch):
    """The time budget's step measurement replaced by a fixed figure of the tests' tiny plans on an idle
    2-core CPU (0.05 s a step; measured 0.044 and 0.067 s for the demo's two stages). A test of a budget of a
    minute or less then plans the same epochs however loaded the machine is: on a busy host the measurement
    alone can take most of such a budget, and the budget then rightly refuses to train. The measurement itself
    is tested in tests/training/test_device_augment.py, and a too short budget's refusal with the real one in
    tests/training/test_train.py."""
    from autoseg.training.trainer import Trainer

    monkeypatch.setattr(Trainer, "_measure_step", lambda self, stage, cfg: 0.05)


@pytest.fixture(autouse=True)
def float32_prediction_on_every_host(monkeypatch):
    """Prediction in float32 whatever the CPU: on a CPU with bfloat16 arithmetic the predictor would otherwise
    run our U-Nets under bfloat16 autocast (autoseg/defaults.py, CPU_INFERENCE_BFLOAT16), and tests that compare
    predictions with float32 references would pass or fail with the host. The tests of that path
    (tests/inference/test_bfloat16.py) switch it back on."""
    import autoseg.inference.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "cpu_has_native_bfloat16", lambda: False)
