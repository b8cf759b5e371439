"""Prediction under the CPU's bfloat16 autocast: chosen on CPUs with bfloat16 arithmetic for our residual U-Nets
only, channels-last, the autocast really active in the network, labels close to float32's, and ``--fp32``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import autoseg.inference.predictor as predictor_module
from autoseg.cli import main
from autoseg.inference.predictor import Predictor
from autoseg.networks.resunet import ResidualUNet
from autoseg.plans import load_plans

from .test_predict import scans

CPU = torch.device("cpu")


@pytest.fixture
def native_bfloat16(monkeypatch):
    """This CPU computes in bfloat16, whatever the host running the tests."""
    monkeypatch.setattr(predictor_module, "cpu_has_native_bfloat16", lambda: True)


def _unet() -> nn.Module:
    torch.manual_seed(0)
    return ResidualUNet(1, 3, [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1]).eval()


def test_native_bfloat16_runs_our_unet_channels_last_under_autocast(trained_run, native_bfloat16):
    plans = load_plans(trained_run / "plans.json")
    net = _unet()
    seen: list[tuple[bool, torch.dtype, bool]] = []
    p = Predictor(plans, [(net, [8, 8, 8])], CPU)
    used = p.networks[0][0]
    used.register_forward_hook(lambda m, i, o: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), i[0].is_contiguous(
            memory_format=torch.channels_last_3d))))
    assert p.bfloat16 and used.channels_last and not net.channels_last  # the caller's network is not converted
    x = np.random.default_rng(0).normal(size=(1, 12, 10, 9)).astype(np.float32)
    got = p.predict_preprocessed(x)
    assert seen and all(s == (True, torch.bfloat16, True) for s in seen)
    assert got.dtype == np.float32 and np.allclose(got.sum(0), 1.0, atol=1e-5)
    ref = Predictor(plans, [(net, [8, 8, 8])], CPU, bfloat16=False)
    assert not ref.bfloat16 and not ref.networks[0][0].channels_last
    want = ref.predict_preprocessed(x)
    assert np.abs(got - want).max() < 0.05  # bfloat16 keeps 8 bits of mantissa
    assert np.mean(got.argmax(0) == want.argmax(0)) > 0.99


def test_bfloat16_is_never_chosen_without_native_arithmetic_or_for_other_networks(trained_run, native_bfloat16,
                                                                                 monkeypatch):
    plans = load_plans(trained_run / "plans.json")
    other = nn.Conv3d(1, 3, 1)  # stands in for MONAI's and the patch-free network: not measured under bfloat16
    assert not Predictor(plans, [(other, [8, 8, 8])], CPU).bfloat16
    assert not Predictor(plans, [(_unet(), [8, 8, 8]), (other, [8, 8, 8])], CPU).bfloat16
    assert not Predictor(plans, [(_unet(), [8, 8, 8])], CPU, bfloat16=False).bfloat16
    monkeypatch.setattr(predictor_module, "CPU_INFERENCE_BFLOAT16", False)
    assert not Predictor(plans, [(_unet(), [8, 8, 8])], CPU).bfloat16
    monkeypatch.setattr(predictor_module, "CPU_INFERENCE_BFLOAT16", True)
    monkeypatch.setattr(predictor_module, "cpu_has_native_bfloat16", lambda: False)
    assert not Predictor(plans, [(_unet(), [8, 8, 8])], CPU).bfloat16


def test_predict_says_when_it_runs_under_bfloat16_and_fp32_opts_out(trained_run, native_bfloat16, tmp_path, capsys):
    src = scans(tmp_path / "in", n=1)
    assert main(["predict", "-i", str(src), "-o", str(tmp_path / "bf"), "--run", str(trained_run), "--no-tta"]) == 0
    assert "under bfloat16 autocast (this CPU computes in bfloat16; --fp32 opts out)" in capsys.readouterr().out
    assert main(["predict", "-i", str(src), "-o", str(tmp_path / "fp"), "--run", str(trained_run), "--no-tta",
                 "--fp32"]) == 0
    assert "bfloat16" not in capsys.readouterr().out
    from autoseg.io import read_image

    bf, _ = read_image(tmp_path / "bf" / "scan_0.nii.gz")
    fp, _ = read_image(tmp_path / "fp" / "scan_0.nii.gz")
    assert bf.shape == fp.shape and np.mean(bf == fp) > 0.99
