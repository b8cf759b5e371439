"""The patch-free configuration through the same commands: plan --configs, train both stages with guidance
patches from the loader, resume exactly after a stop, validate, and predict in one pass per scan with the
input's geometry."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from autoseg.checkpoint import load_checkpoint
from autoseg.cli import main
from autoseg.plans import load_plans, select_configuration
from autoseg.runconfig import Overrides
from autoseg.training.data import BatchDataset, Guidance, PatchSampler
from autoseg.training.runtime import Runtime
from autoseg.training.trainer import Trainer

from ..inference.test_predict import scans
from .stopping import train_until_signalled

CONFIG = "patch_free"


@pytest.fixture()
def free_run(tiny_run) -> Path:
    data = json.loads((tiny_run / "fingerprint.json").read_text())["dataset_dir"]
    assert main(["plan", data, "-o", str(tiny_run), "--device", "cpu", "--no-progress", "--configs",
                 f"3d,{CONFIG}"]) == 0
    return tiny_run


def test_training_batches_carry_guidance_corners_inside_the_region(free_run):
    p = select_configuration(load_plans(free_run / "plans.json"), CONFIG)
    st, net = p.stages[-1], p.network
    sampler = PatchSampler(free_run / "preprocessed", p.folds[0].train, st.patch_size, 1.0)
    in_workers = replace(p.training.augmentation, on_device=False)  # on the device: test_device_augment.py
    ds = BatchDataset(sampler, 2, in_workers, 0, 1, True, guidance=Guidance(net.upsample_factor, net.guidance_share))
    batch = ds[3]
    assert tuple(batch["data"].shape[2:]) == tuple(st.patch_size) and tuple(batch["guide"].shape) == (2, 3)
    low = [e // f for e, f in zip(st.patch_size, net.upsample_factor)]
    assert ((batch["guide"] >= 0) & (batch["guide"] <= torch.tensor(low) // 2)).all()
    assert (ds[3]["guide"] == batch["guide"]).all()  # a pure function of the batch index
    assert "guide" not in BatchDataset(sampler, 2, p.training.augmentation, 0, 1, False)[0]  # validation


def test_trains_resumes_exactly_validates_and_predicts_in_one_pass(free_run, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    shutil.copytree(free_run, reference)
    overrides = Overrides("both", 1, 2, None)  # zoom-in 1 x 2 steps, zoom-out 1 x 2 steps
    rt = Runtime(torch.device("cpu"), workers=0, progress=False)
    Trainer(reference, "0", overrides, rt, configuration=CONFIG, say=lambda s: None).fit()
    train_until_signalled(monkeypatch, free_run, overrides, rt, CONFIG, 2 + 2)  # the zoom-out stage's second step
    fold = free_run / CONFIG / "fold_0"
    assert load_checkpoint(fold / "checkpoint_latest.pt")["state"].stage == 1
    # resumed through the command, which also validates the fold on its full-resolution cases
    assert main(["train", "0", "--run", str(free_run), "--config", CONFIG, "--stage", "both", "--epochs", "1",
                 "--iterations-per-epoch", "2", "-j", "0", "--no-progress"]) == 0
    a = load_checkpoint(fold / "checkpoint_final.pt")["network"]
    b = load_checkpoint(reference / CONFIG / "fold_0" / "checkpoint_final.pt")["network"]
    assert a.keys() == b.keys() and any(k.startswith("up_seg") for k in a)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    metrics = json.loads((fold / "validation" / "metrics.json").read_text())
    assert sorted(metrics["cases"]) == sorted(load_plans(free_run / "plans.json").folds[0].val)
    assert 0 <= metrics["mean_foreground_dice"] <= 1
    log = (fold / "training_log.txt").read_text()
    assert ("against tiles" in log) == ("tiled_without_mirroring" in metrics)
    src, dst = scans(tmp_path / "in"), tmp_path / "out"
    capsys.readouterr()
    assert main(["predict", "-i", str(src), "-o", str(dst), "--run", str(free_run), "--config", CONFIG,
                 "--no-progress"]) == 0
    labels = {int(k) for k in load_plans(free_run / "plans.json").labels}
    for f in sorted(src.glob("*_0000.nii.gz")):
        img, seg = nib.load(f), nib.load(dst / f.name.replace("_0000", ""))
        assert seg.shape == img.shape
        np.testing.assert_allclose(seg.affine, img.affine, atol=1e-5)
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= labels


def test_a_scan_is_predicted_in_one_pass_where_it_fits_the_budget(free_run):
    from dataclasses import replace

    from autoseg.inference.predictor import Predictor
    from autoseg.networks import build_network

    p = select_configuration(load_plans(free_run / "plans.json"), CONFIG)
    net, region = build_network(p.network, 1, len(p.labels)), p.stages[-1].patch_size
    stride = p.network.total_stride
    shape = [3 * region[0] + 1, 2 * region[1], region[2] + 3]  # larger than the training region on every axis
    whole = [-(-s // t) * t for s, t in zip(shape, stride)]
    predictor = Predictor(p, [(net, region)], torch.device("cpu"), tta=False)
    assert predictor.tile(region, shape) == whole
    x = torch.randn(1, *shape)
    lo = [(w - s) // 2 for s, w in zip(shape, whole)]  # the sliding window pads symmetrically
    pad = [v for a in (2, 1, 0) for v in (lo[a], whole[a] - shape[a] - lo[a])]
    with torch.no_grad():  # one tile: the sliding window's result is the network's output on the padded scan
        direct = net.eval()(torch.nn.functional.pad(x, pad)[None])[0]
    probs = predictor.predict_preprocessed(x.numpy())
    inside = tuple(slice(a, a + s) for a, s in zip(lo, shape))
    torch.testing.assert_close(torch.from_numpy(probs), torch.softmax(direct, 0)[(slice(None), *inside)],
                               rtol=1e-4, atol=1e-5)
    small = Predictor(replace(p, memory_budget_gib=1e-4), [(net, region)], torch.device("cpu"), tta=False)
    assert small.tile(region, shape) == region  # too big for the budget: the training region slides
    off = Predictor(replace(p, network=replace(p.network, whole_volume_prediction=False)), [(net, region)],
                    torch.device("cpu"), tta=False)
    assert off.tile(region, shape) == region
    tiles = Predictor(p, [(net, region)], torch.device("cpu"), tta=False, whole_volume=False)
    assert tiles.tile(region, shape) == region  # told to slide (find-best's choice, predict --tiles)


def _one_pass_setup(free_run: Path):
    """The patch-free plan, its fold-0 validation cases and a sliding region (the network's total stride) smaller
    than every one of them on some axis, so that each case goes through the network in one pass."""
    from autoseg.preprocessing.storage import read_properties

    p = select_configuration(load_plans(free_run / "plans.json"), CONFIG)
    cases = p.folds[0].val
    patch = list(p.network.total_stride)
    shapes = {c: list(read_properties(free_run / "preprocessed", c).shape_after_resampling) for c in cases}
    assert all(any(s > t for s, t in zip(shape, patch)) for shape in shapes.values())
    return p, cases, patch, shapes


@pytest.mark.parametrize("tta", [True, False])
def test_validation_also_scores_tiles_where_a_case_went_in_one_pass(free_run, tta):
    """``one_pass_cases`` and ``tiled_without_mirroring``: each case that went in one pass predicted by sliding
    the trained region, unmirrored, scored as a separate tiled prediction scores it; the ramp network gives
    tiles and the one pass different maps, so the test sees both paths."""
    from autoseg.evaluation.evaluate import dice_score
    from autoseg.inference.predictor import Predictor
    from autoseg.io import read_image
    from autoseg.preprocessing.storage import read_case_arrays, read_properties
    from autoseg.workflows.fold import validation_line
    from autoseg.workflows.validate import reference_labels, validate_fold

    from .test_validation import Ramp

    p, cases, patch, _shapes = _one_pass_setup(free_run)
    fold = free_run / CONFIG / "fold_0"
    fold.mkdir(parents=True)
    net, cpu = Ramp(len(p.labels)), torch.device("cpu")
    metrics = validate_fold(free_run, fold, p, cases, net, patch, cpu, progress=False, tta=tta)
    tiled = Predictor(p, [(net, patch)], cpu, tta=False, whole_volume=False)
    refs, pre = reference_labels(free_run), free_run / "preprocessed"
    names = {k: p.labels[k] for k in sorted(p.labels)[1:]}
    want = {}
    for cid in cases:
        probs = tiled.predict_preprocessed(np.asarray(read_case_arrays(pre, cid)[0][:]))
        seg = tiled.finish(probs, read_properties(pre, cid)).labels
        want[cid] = {n: dice_score(seg, read_image(refs[cid])[0][0], k) for k, n in names.items()}
    assert metrics["one_pass_cases"] == list(cases)
    got = metrics["tiled_without_mirroring"]
    assert set(got["cases"]) == set(cases)
    for cid in cases:
        assert got["cases"][cid] == pytest.approx(want[cid])
    means = {n: float(np.mean([want[c][n] for c in cases])) for n in names.values()}
    assert got["mean_per_class"] == pytest.approx(means)
    one = metrics["without_mirroring"]["cases"] if tta else {
        c: {n: v["dice"] for n, v in per.items()} for c, per in metrics["cases"].items()}
    assert any(one[c] != pytest.approx(want[c]) for c in cases)
    cfg = SimpleNamespace(val_cases=cases, measured_validation_seconds=None, validation_tta=tta)
    line = validation_line(metrics, cfg, 3.0, Path("metrics.json"))  # what training prints and logs
    plain = (metrics["without_mirroring"] if tta else metrics)["mean_foreground_dice"]
    assert f"; {len(cases)} case(s) in one pass, unmirrored {plain:.4f} against tiles " \
        f"{got['mean_foreground_dice']:.4f}" in line


def test_validation_records_one_pass_cases_only_and_can_leave_tiles_out(free_run):
    """A case the region covers is not a one-pass case and gets no tiled prediction; without ``tiles`` the
    one-pass cases are listed but not predicted by tiles (a time budget's choice), and the log line says so."""
    from autoseg.workflows.fold import validation_line
    from autoseg.workflows.validate import validate_fold

    from .test_validation import Ramp

    p, cases, _patch, shapes = _one_pass_setup(free_run)
    stride = p.network.total_stride
    covering = [-(-max(shapes[c][a] for c in cases) // t) * t for a, t in enumerate(stride)]  # every case fits
    net, cpu = Ramp(len(p.labels)), torch.device("cpu")
    fold = free_run / CONFIG / "fold_0"
    fold.mkdir(parents=True)
    metrics = validate_fold(free_run, fold, p, cases, net, covering, cpu, progress=False, tta=False)
    assert metrics["one_pass_cases"] == [] and "tiled_without_mirroring" not in metrics
    metrics = validate_fold(free_run, fold, p, cases, net, list(stride), cpu, progress=False, tta=False, tiles=False)
    assert metrics["one_pass_cases"] == list(cases) and "tiled_without_mirroring" not in metrics
    cfg = SimpleNamespace(val_cases=cases, measured_validation_seconds=None, validation_tta=False)
    assert f"; {len(cases)} case(s) in one pass, not compared with tiles" in validation_line(metrics, cfg, 1.0,
                                                                                               Path("m.json"))


def test_the_budget_counts_the_tiled_prediction_of_one_pass_cases(free_run, monkeypatch):
    """The extra tiled, unmirrored prediction costs each one-pass case's tiles of the trained region (at that
    region's measured forward seconds, its share of a call) plus its way back to the scan's grid (2 s on the
    median case, scaled by voxels)."""
    from math import prod

    import autoseg.workflows.validate as validate_module
    from autoseg.inference.sliding_window import padded_shape
    from autoseg.tiling import tile_boxes

    from .test_validation import Ramp

    p, cases, patch, shapes = _one_pass_setup(free_run)
    clock = iter([0.0, 40.0, 90.0, 100.0, 102.0, 112.5])  # as in test_train.py: the way back 2 s, the rest 12.5 s
    monkeypatch.setattr(validate_module, "_clock", lambda: next(clock))
    monkeypatch.setattr(validate_module, "_forward_seconds",  # 1 s per batch item and region's worth of voxels
                        lambda net, shape, device, amp, batch=1: float(batch * prod(shape[1:]) / prod(patch)))
    cpu = torch.device("cpu")
    cost = validate_module.validation_cost(free_run, p, cases, Ramp(len(p.labels)), patch, cpu)
    n_tiles = sum(len(tile_boxes(padded_shape(s, patch), patch, p.inference.tile_step)) for s in shapes.values())
    assert n_tiles > len(cases)
    sizes = sorted(prod(s) for s in shapes.values())
    assert cost.tiled_seconds == pytest.approx(n_tiles * 1.0 + 2.0 * sum(sizes) / sizes[len(sizes) // 2])
    # every case is one tile of its own size (alone in its call), plus the tiled prediction, mirrored or not
    assert cost.lone_tiles == pytest.approx(cost.tiles)
    plain = cost.tiles * cost.forward_seconds + cost.rest_seconds
    assert cost.seconds(False) == pytest.approx(plain + cost.tiled_seconds)
    assert cost.seconds(True) == pytest.approx(plain + cost.tiles * cost.flips * cost.forward_seconds
                                               + cost.finish_seconds + cost.tiled_seconds)
    assert cost.seconds(True, tiles=False) == pytest.approx(cost.seconds(True) - cost.tiled_seconds)
    assert cost.seconds(False, tiles=False) == pytest.approx(plain)


@pytest.mark.parametrize("whole", [False, True])
def test_the_budget_prices_patch_free_tiles_at_low_resolution(free_run, monkeypatch, whole):
    """A case a patch-free network predicts by several tiles costs what predict_patch_free_tiles runs, per
    mirrored copy: its low-resolution U-Net tiles (counted here by running the prediction) x one tile's measured
    seconds, plus the heads (measured on one region's features, scaled by voxels);
    with one-pass prediction (``whole``) the same prices the extra tiled prediction of those cases."""
    from math import prod

    import autoseg.workflows.validate as validate_module
    from autoseg.inference.patch_free_tiles import LowResolutionBody, low_resolution_tiles
    from autoseg.inference.predictor import Predictor
    from autoseg.networks import build_network
    from autoseg.preprocessing.storage import read_case_arrays

    p, cases, stride, shapes = _one_pass_setup(free_run)
    p = replace(p, network=replace(p.network, whole_volume_prediction=whole))
    patch = [2 * t for t in stride]  # the U-Net's bottom 2 voxels a side: instance norm needs more than one
    torch.manual_seed(0)
    net = build_network(p.network, len(p.channel_names), len(p.labels)).eval()
    clock = iter([0.0, 40.0, 90.0, 100.0, 102.0, 112.5])  # as in test_train.py: the way back 2 s, the rest 12.5 s
    monkeypatch.setattr(validate_module, "_clock", lambda: next(clock))
    timed: list[tuple] = []  # what was timed: the network's type and input shape, the heads' region

    def forward_seconds(net, shape, device, amp, batch=1):  # 0.25 s per input
        timed.append((type(net).__name__, list(shape)))
        return 0.25 * batch

    def heads_seconds(net, low, device, amp):  # 3 s for one region's features
        timed.append(("heads", list(low)))
        return 3.0
    monkeypatch.setattr(validate_module, "_forward_seconds", forward_seconds)
    monkeypatch.setattr(validate_module, "_heads_seconds", heads_seconds)
    cpu = torch.device("cpu")
    cost = validate_module.validation_cost(free_run, p, cases, net, patch, cpu)
    low = [r // f for r, f in zip(patch, net.factor)]
    assert ("LowResolutionBody", [len(p.channel_names), *low]) in timed and ("heads", low) in timed
    if not whole:  # nothing goes through the whole network
        assert [t for t in timed if t[0] == "PatchFreeUNet"] == []

    calls: list[int] = []  # inputs the U-Net is given when the cases are predicted by tiles, unmirrored
    body = LowResolutionBody.forward
    monkeypatch.setattr(LowResolutionBody, "forward", lambda self, x: calls.append(len(x)) or body(self, x))
    tiled = Predictor(p, [(net, patch)], cpu, tta=False, whole_volume=False)
    for c in cases:
        tiled.predict_preprocessed(np.asarray(read_case_arrays(free_run / "preprocessed", c)[0][:]))
    n_low = sum(low_resolution_tiles(s, patch, net.factor, p.inference.tile_step) for s in shapes.values())
    assert sum(calls) == n_low > len(cases)
    heads = 3.0 * sum(prod(s) for s in shapes.values()) / prod(patch)
    sizes = sorted(prod(s) for s in shapes.values())
    if whole:  # every case in one pass (one tile of its own size each), and by tiles for find-best
        assert cost.low_resolution_seconds == 0 and cost.lone_tiles == pytest.approx(cost.tiles)
        assert cost.tiled_seconds == pytest.approx(n_low * 0.25 + heads + 2.0 * sum(sizes) / sizes[len(sizes) // 2])
        return
    assert cost.tiles == 0 and cost.tiled_seconds == 0
    once = n_low * 0.25 + heads
    assert cost.low_resolution_seconds == pytest.approx(once)
    assert cost.seconds(False) == pytest.approx(once + cost.rest_seconds)
    assert cost.seconds(True) == pytest.approx(once + cost.flips * once + cost.rest_seconds + cost.finish_seconds)
