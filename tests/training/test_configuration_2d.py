"""The 2d configuration end to end on the tiny run: one-slice batches augmented in-plane, training into
RUN/2d/fold_k, prediction and summary with --config 2d, and clear errors for a configuration not trained."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch

from autoseg.checkpoint import load_checkpoint
from autoseg.cli import main
from autoseg.plans import load_plans, select_configuration
from autoseg.preprocessing.storage import read_case_arrays
from autoseg.training.data import BatchDataset, PatchSampler, batch_seed
from autoseg.training.device_augment import DeviceAugmenter, batch_tensors

from ..inference.test_predict import scans


def _sampler(run, patch):
    p = select_configuration(load_plans(run / "plans.json"), "2d")
    ids = sorted(f.name[:-5] for f in (run / "preprocessed").glob("*.json"))
    return p, PatchSampler(run / "preprocessed", ids, patch, 1.0)


def test_one_slice_batches_are_real_slices_and_augment_in_plane(tiny_run):
    p, sampler = _sampler(tiny_run, [1, 16, 16])
    plain = BatchDataset(sampler, 3, p.training.augmentation, 0, 0, augment=False)[0]
    assert plain["data"].shape == (3, 1, 1, 16, 16) and plain["seg"].shape == (3, 1, 16, 16)
    # not augmented: exactly the stored slice around the chosen centre
    rng = np.random.default_rng(batch_seed(0, 0, 0, 0, 1))  # the draws of batch 0's first sample
    case = sampler.case_ids[int(rng.integers(len(sampler.case_ids)))]
    s = sampler.place(case, rng)
    data, _ = read_case_arrays(tiny_run / "preprocessed", case)
    z, y, x = s.centre
    np.testing.assert_array_equal(plain["data"][0, 0, 0].numpy(), np.asarray(data[0, z, y - 8:y + 8, x - 8:x + 8]))
    planned = p.training.augmentation
    for on_device in (False, True):  # batchgenerators in the workers, or torch in the training process
        aug = BatchDataset(sampler, 3, replace(planned, on_device=on_device), 0, 0, augment=True)
        assert aug.read_size[0] == 1  # never reads, rotates or scales across slices
        augmenter = DeviceAugmenter.planned([1, 16, 16], replace(planned, on_device=on_device))
        for i in range(4):
            b = aug[i]
            assert "error" not in b, b
            x, y, _ = batch_tensors(b, torch.device("cpu"), augmenter, None, 1.0)
            assert x.shape == (3, 1, 1, 16, 16) and y.shape == (3, 1, 16, 16)
            assert set(torch.unique(y).tolist()) <= set(p.labels)


def test_train_predict_and_summarize_2d(tiny_run, tmp_path, capsys):
    run = tiny_run
    assert main(["train", "0", "--run", str(run), "--config", "2d", "--epochs", "2", "--iterations-per-epoch", "3",
                 "-j", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"configuration 2d -> {run / '2d' / 'fold_0'}" in out
    fold = run / "2d" / "fold_0"
    assert json.loads((fold / "config.json").read_text())["configuration"] == "2d"
    assert json.loads((fold / "validation" / "metrics.json").read_text())["mirroring"] is True
    assert not (run / "fold_0").exists()  # the 3d configuration's folds are untouched
    weights = load_checkpoint(fold / "checkpoint_final.pt")["network"]
    convs = [w for k, w in weights.items() if k.endswith("weight") and w.dim() == 5]
    assert convs and all(w.shape[2] == 1 for w in convs)  # no kernel spans slices
    # predict: the 3d default has no trained fold -> one line naming the configuration; --config 2d works
    src, dst = scans(tmp_path / "in"), tmp_path / "out"
    assert load_plans(run / "plans.json").default_configuration == "3d"  # small isotropic cases
    assert main(["predict", "-i", str(src), "-o", str(dst), "--run", str(run)]) == 1
    err = capsys.readouterr().err
    assert "no fold of configuration 3d" in err and "configuration 2d has trained folds: add --config 2d" in err
    assert main(["predict", "-i", str(src), "-o", str(dst), "--run", str(run), "--config", "2d"]) == 0
    assert len(list(dst.glob("*.nii.gz"))) == 2
    assert main(["summarize", "--run", str(run), "--config", "2d"]) == 0
    assert json.loads((run / "2d" / "crossval.json").read_text())["configuration"] == "2d"
    assert (run / "2d" / "postprocessing.json").is_file() and not (run / "crossval.json").exists()
    assert main(["train", "0", "--run", str(run), "--config", "2.5d"]) == 1
    assert "configuration '2.5d': the plan has 3d, 2d" in capsys.readouterr().err
