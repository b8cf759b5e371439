"""MONAI configurations through the same commands: plan --configs, train (zoom-in then zoom-out) into
RUN/<config>/fold_k, resume exactly after a stop, predict with --config; and the CLI's errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from autoseg.checkpoint import load_checkpoint
from autoseg.cli import main
from autoseg.plans import configuration_names, load_plans
from autoseg.runconfig import Overrides
from autoseg.training.runtime import Runtime
from autoseg.training.trainer import Trainer

from ..inference.test_predict import scans
from .stopping import train_until_signalled


@pytest.fixture(scope="module")
def monai_template(tiny_run_template, tmp_path_factory) -> Path:
    """The tiny run re-planned with every configuration (preprocessing is shared and stays valid)."""
    run = tmp_path_factory.mktemp("monai") / "run"
    shutil.copytree(tiny_run_template, run)
    data = json.loads((run / "fingerprint.json").read_text())["dataset_dir"]
    assert main(["plan", data, "-o", str(run), "--device", "cpu", "--no-progress", "--configs", "all"]) == 0
    return run


@pytest.fixture()
def monai_run(monai_template, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(monai_template, run)
    return run


def test_plan_lists_every_configuration_with_its_reason(monai_run, capsys):
    p = load_plans(monai_run / "plans.json")
    assert configuration_names(p) == ["3d", "2d", "segresnet", "attention_unet", "unetr", "patch_free"]
    assert set(p.configuration_reasons) == set(configuration_names(p))
    data = json.loads((monai_run / "fingerprint.json").read_text())["dataset_dir"]
    assert main(["plan", data, "-o", str(monai_run), "--device", "cpu", "--no-progress", "--configs", "3d,unetr"]) == 0
    out = capsys.readouterr().out
    assert "config unetr" in out and "unetr: asked for with --configs" in out and "config segresnet" not in out
    assert "2d: not planned (add it with --configs): left out of --configs" in out


def test_default_configurations_say_why_the_others_are_left_out(tiny_run):
    p = load_plans(tiny_run / "plans.json")  # planned without --configs on the CPU
    assert configuration_names(p) == ["3d", "2d"]
    assert "lowest Dice" in p.configuration_reasons["unetr"] and "--configs" in p.configuration_reasons["segresnet"]


def test_segresnet_trains_both_stages_and_predicts(monai_run, tmp_path, capsys):
    assert main(["train", "0", "--run", str(monai_run), "--config", "segresnet", "--epochs", "2",
                 "--iterations-per-epoch", "2", "-j", "0", "--no-progress"]) == 0
    lines = (monai_run / "segresnet" / "fold_0" / "training_log.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines if line.startswith("zoom")] == ["zoom_in", "zoom_in", "zoom_out"]
    src, dst = scans(tmp_path / "in"), tmp_path / "out"
    assert main(["predict", "-i", str(src), "-o", str(dst), "--run", str(monai_run), "--config", "segresnet",
                 "--no-progress"]) == 0
    assert len(list(dst.glob("*.nii.gz"))) == 2


def test_unetr_resumes_exactly_and_predicts(monai_run, tmp_path, monkeypatch):
    """Stopped inside the zoom-out stage and resumed: the same final weights as an uninterrupted run (the
    position embedding, sized for the zoom-out patch, is trained by both stages); then predict --config."""
    config = "unetr"
    reference = tmp_path / "reference"
    shutil.copytree(monai_run, reference)
    overrides = Overrides("both", 1, 2, None)  # zoom-in 1 x 2 steps, zoom-out 1 x 2 steps
    rt = Runtime(torch.device("cpu"), workers=0, progress=False)
    Trainer(reference, "0", overrides, rt, configuration=config, say=lambda s: None).fit()
    train_until_signalled(monkeypatch, monai_run, overrides, rt, config, 2 + 2)  # the zoom-out stage's second step
    fold = monai_run / config / "fold_0"
    assert load_checkpoint(fold / "checkpoint_latest.pt")["state"].stage == 1
    Trainer(monai_run, "0", overrides, rt, configuration=config, say=lambda s: None).fit()
    a = load_checkpoint(fold / "checkpoint_final.pt")["network"]
    b = load_checkpoint(reference / config / "fold_0" / "checkpoint_final.pt")["network"]
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    src, dst = scans(tmp_path / "in"), tmp_path / "out"
    assert main(["predict", "-i", str(src), "-o", str(dst), "--run", str(monai_run), "--config", config,
                 "--no-progress"]) == 0
    assert len(list(dst.glob("*.nii.gz"))) == 2


def test_unknown_configuration_names_are_refused_in_one_line(tiny_run, capsys):
    data = json.loads((tiny_run / "fingerprint.json").read_text())["dataset_dir"]
    assert main(["plan", data, "-o", str(tiny_run), "--device", "cpu", "--no-progress", "--configs",
                 "3d,swin_unetr"]) == 1
    err = capsys.readouterr().err
    assert ("--configs '3d,swin_unetr': unknown swin_unetr; known: 3d, 2d, segresnet, attention_unet, unetr, "
            "patch_free") in err
    assert main(["plan", data, "-o", str(tiny_run), "--device", "cpu", "--no-progress", "--configs", ","]) == 1
    assert "--configs ',': no configuration named" in capsys.readouterr().err
    assert main(["train", "0", "--run", str(tiny_run), "--config", "unetr"]) == 1
    assert "configuration 'unetr': the plan has 3d, 2d (autoseg plan --configs adds others" in \
        capsys.readouterr().err
