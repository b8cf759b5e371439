"""Patch sampling, augmentation and the batch loader."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.plans import load_plans
from autoseg.preprocessing.storage import write_b2nd
from autoseg.training.data import (
    BatchDataset,
    BatchError,
    PatchSampler,
    _read_region,
    initial_patch_size,
    make_loader,
)
from autoseg.training.device_augment import DeviceAugmenter, batch_tensors


def _setup(run: Path, patch=None, oversample=None):
    plans = load_plans(run / "plans.json")
    st = plans.stages[0]
    ids = sorted(p.name[:-5] for p in (run / "preprocessed").glob("*.json"))
    sampler = PatchSampler(run / "preprocessed", ids, patch or st.patch_size,
                           plans.training.oversample_foreground if oversample is None else oversample)
    return plans, sampler


def test_read_region_pads_outside_the_volume():
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    out = _read_region(arr, [-1, 2, 3], [3, 3, 3], -7.0)
    assert out.shape == (2, 3, 3, 3)
    assert (out[:, 0] == -7).all()  # z = -1 lies outside
    assert (out[:, :, 2] == -7).all()  # y = 4 lies outside
    assert (out[:, :, :, 2] == -7).all()  # x = 5 lies outside
    np.testing.assert_array_equal(out[:, 1:, :2, :2], arr[:, 0:2, 2:4, 3:5])


def test_oversampling_share_and_foreground_centre(tiny_run):
    _, sampler = _setup(tiny_run)
    rng = np.random.default_rng(0)
    samples = [sampler.sample(rng) for _ in range(3000)]
    share = np.mean([s.foreground_class is not None for s in samples])
    assert share == pytest.approx(0.33, abs=0.03)
    for s in samples[:200]:
        if s.foreground_class is None:
            continue
        # the patch read around the centre contains the chosen class
        _, seg = sampler.read(s, sampler.patch)
        assert (seg == s.foreground_class).any()


def test_no_oversampling_gives_uniform_centres_inside(tiny_run):
    """Without oversampling a patch's lower corner is uniform over the places where it lies inside the case
    (or, on an axis where the case is smaller than the patch, where it covers the case): over 3000 samples the
    corner's position within that range has mean 1/2 and variance 1/12 (a discrete uniform's, up to the
    range's granularity), and both ends are reached."""
    _, sampler = _setup(tiny_run, oversample=0.0)
    rng = np.random.default_rng(1)
    spread: list[list[float]] = [[], [], []]
    for _ in range(3000):
        s = sampler.sample(rng)
        shape = sampler.arrays(s.case_id)[0].shape[1:]
        assert s.foreground_class is None
        for axis, (c, n, p) in enumerate(zip(s.centre, shape, sampler.patch)):
            lo = c - p // 2
            first, last = min(0, n - p), max(0, n - p)
            assert first <= lo <= last
            if last > first:
                spread[axis].append((lo - first) / (last - first))
    assert any(len(u) > 1000 for u in spread)
    for u in (np.array(u) for u in spread if len(u) > 1000):
        steps = 1 / np.min(np.diff(np.unique(u)))  # the range's number of steps: a discrete uniform over 0..steps
        assert u.min() == 0.0 and u.max() == 1.0
        assert u.mean() == pytest.approx(0.5, abs=0.03)
        assert u.var() == pytest.approx((steps + 2) / (12 * steps), abs=0.02)


@pytest.mark.parametrize("on_device", [False, True])
def test_augmentation_keeps_image_and_label_aligned(tiny_run, tmp_path, on_device):
    """Replace the image by its label map: after rotation, scaling and mirroring (intensity transforms off), by
    batchgenerators in the worker or by torch in the training process, the image, rounded, must still equal the
    label."""
    plans, _ = _setup(tiny_run)
    folder = tiny_run / "preprocessed"
    for js in folder.glob("*.json"):
        cid = js.name[:-5]
        seg = np.asarray(__import__("blosc2").open(str(folder / f"{cid}_seg.b2nd"))[:])
        write_b2nd(seg.astype(np.float32), folder / f"{cid}_data.b2nd", plans.stages[-1].patch_size)
    aug = replace(plans.training.augmentation, p_rotation=1.0, p_scale=1.0, p_noise=0, p_blur=0, p_brightness=0,
                  p_contrast=0, p_low_resolution=0, p_gamma=0, p_gamma_inverted=0, on_device=on_device)
    _, sampler = _setup(tiny_run)
    ds = BatchDataset(sampler, 2, aug, seed=3, stage=0, augment=True)
    augmenter = DeviceAugmenter.planned(sampler.patch, aug)
    agree = []
    for i in range(10):
        b = ds[i]
        assert "error" not in b, b
        x, y, _ = batch_tensors(b, torch.device("cpu"), augmenter, None, 1.0)
        img, seg = x[:, 0].numpy(), y.numpy()
        assert img.shape == seg.shape == (2, *sampler.patch)
        agree.append(np.mean(np.rint(img) == seg))
    # interpolation of the image (cubic or linear) vs per-label linear interpolation of the label differ only at
    # edges
    assert min(agree) > 0.97, agree


def test_batches_are_deterministic_and_independent_of_workers(tiny_run):
    plans, sampler = _setup(tiny_run)
    ds = BatchDataset(sampler, 2, plans.training.augmentation, seed=5, stage=0, augment=True)
    in_process = [b["data"] for b in make_loader(ds, 3, 7, workers=0, pin_memory=False)]
    with_workers = [b["data"] for b in make_loader(ds, 3, 7, workers=2, pin_memory=False)]
    resumed = [b["data"] for b in make_loader(ds, 5, 7, workers=1, pin_memory=False)]
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers))
    assert all(torch.equal(a, b) for a, b in zip(in_process[2:], resumed))
    assert not torch.equal(in_process[0], in_process[1])
    other_stage = BatchDataset(sampler, 2, plans.training.augmentation, seed=5, stage=1, augment=True)
    assert not torch.equal(other_stage[3]["data"], in_process[0])


def test_initial_patch_covers_rotation_and_scaling(tiny_run):
    plans, _ = _setup(tiny_run)
    aug = plans.training.augmentation
    size = initial_patch_size([32, 32, 32], aug)
    # rotating a cube by 30 degrees about one axis: cos 30 + sin 30 = 1.366 per in-plane edge; /0.85 for scaling
    assert size == [int(np.ceil(32 * 1.3660254 / 0.85))] * 3
    assert initial_patch_size([32, 32, 32], replace(aug, p_rotation=0, p_scale=0)) == [32, 32, 32]


def test_a_corrupt_case_is_named_by_the_loader(tiny_run):
    plans, sampler = _setup(tiny_run)
    bad = sampler.case_ids[0]
    (tiny_run / "preprocessed" / f"{bad}_data.b2nd").write_bytes(b"not blosc2")
    sampler = PatchSampler(tiny_run / "preprocessed", [bad], sampler.patch, 0.33)
    ds = BatchDataset(sampler, 2, plans.training.augmentation, seed=0, stage=0, augment=True)
    with pytest.raises(BatchError, match=f"case {bad}"):
        next(make_loader(ds, 0, 2, workers=1, pin_memory=False))
