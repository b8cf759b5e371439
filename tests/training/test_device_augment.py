"""Augmentation on the training device: each transform against batchgenerators (or scipy) with the same fixed
parameters, the whole batch transform's invariants, and training through it (resume exact, patch-free guidance)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from batchgenerators.augmentations.color_augmentations import augment_contrast, augment_gamma
from batchgenerators.augmentations.spatial_transformations import augment_spatial
from scipy.ndimage import gaussian_filter
from torch import nn

from autoseg.checkpoint import load_checkpoint
from autoseg.cli import main
from autoseg.networks.patchfree import guidance_size
from autoseg.networks.resunet import ResidualUNet
from autoseg.plans import AugmentationPlan, load_plans, select_configuration
from autoseg.runconfig import Overrides, StageRun
from autoseg.training.budget import measure_step_seconds
from autoseg.training.data import BatchDataset, Guidance, PatchSampler, initial_patch_size, read_size
from autoseg.training.device_augment import (
    DeviceAugmenter,
    _contrast,
    _gamma,
    batch_tensors,
    gaussian_blur,
    rotation_matrix,
    spatial_sample,
)
from autoseg.training.runtime import Runtime
from autoseg.training.trainer import Trainer

from .stopping import train_until_signalled


def _smooth(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random image (linear interpolation of it is close to the truth)."""
    return gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0).astype(np.float32) * 10


def _blobs(shape: tuple[int, ...]) -> np.ndarray:
    """Labels 0..2: two overlapping balls."""
    grid = np.indices(shape).astype(float)
    c = np.array(shape, dtype=float)[:, None] / 2
    r1 = np.sqrt(((grid.reshape(len(shape), -1) - c) ** 2).sum(0)).reshape(shape)
    r2 = np.sqrt(((grid.reshape(len(shape), -1) - c - 3) ** 2).sum(0)).reshape(shape)
    return np.where(r2 < 4, 2, np.where(r1 < 6, 1, 0)).astype(np.int64)


def _plan(**kw) -> AugmentationPlan:
    """Every transform off; ``kw`` turns some on."""
    base = AugmentationPlan(0.0, [30.0, 30.0, 30.0], 0.0, [0.7, 1.4], False, 0.0, [0.0, 0.1], 0.0, [0.5, 1.0], 0.0,
                            [0.75, 1.25], 0.0, [0.75, 1.25], 0.0, [0.5, 1.0], 0.0, 0.0, [0.7, 1.5], [], True)
    return replace(base, **kw)


@pytest.mark.parametrize("angles,scale", [((0.3, -0.2, 0.4), 1.2), ((0.0, 0.0, 0.5), 1.0), ((-0.4, 0.1, 0.0), 1.1)])
def test_rotation_and_scaling_match_batchgenerators_3d(angles, scale):
    region, patch = (21, 24, 23), [14, 16, 17]
    img, seg = _smooth(region), _blobs(region)
    ref_x, ref_y = augment_spatial(
        img[None, None].astype(np.float64), seg[None, None].astype(np.float32), patch, None, False,
        do_rotation=True, angle_x=(angles[0],) * 2, angle_y=(angles[1],) * 2, angle_z=(angles[2],) * 2,
        do_scale=scale != 1.0, scale=(scale, scale), border_mode_data="constant", border_cval_data=0, order_data=1,
        border_mode_seg="constant", border_cval_seg=0, order_seg=1, random_crop=False)
    matrix = rotation_matrix(list(angles)) * scale
    x, y = spatial_sample(torch.from_numpy(img)[None], torch.from_numpy(seg), matrix, patch)
    close = np.abs(x[0].numpy() - ref_x[0, 0]) <= 2e-4  # linear both ways, float32 here
    assert close.mean() > 0.999  # the rest: samples on the region's last voxel centre, inside in one precision only
    mismatch = (y.numpy() != ref_y[0, 0]).mean()
    assert mismatch < 0.002  # only ties at exactly 0.5 may round differently
    assert set(np.unique(y.numpy())) <= {0, 1, 2} and (y.numpy() == 2).any()


def test_rotation_in_plane_matches_batchgenerators_2d():
    region, patch = (30, 27), [20, 18]
    img, seg = _smooth(region, 3), _blobs(region)
    ref_x, ref_y = augment_spatial(img[None, None].astype(np.float64), seg[None, None].astype(np.float32), patch,
                                   None, False, do_rotation=True, angle_x=(0.7, 0.7), do_scale=True,
                                   scale=(1.15, 1.15), border_mode_data="constant", order_data=3,
                                   border_mode_seg="constant", order_seg=1, random_crop=False)
    x, y = spatial_sample(torch.from_numpy(img)[None], torch.from_numpy(seg), rotation_matrix([0.7]) * 1.15, patch)
    # bicubic convolution here against the cubic spline the pipeline uses there: close, not equal (measured:
    # mean difference 1.4 % of the mean magnitude, largest 7.5 %); a wrong geometry would differ by ~100 %
    diff, size = np.abs(x[0].numpy() - ref_x[0, 0]), np.abs(ref_x).mean()
    assert diff.mean() < 0.02 * size and diff.max() < 0.1 * size
    assert (y.numpy() != ref_y[0, 0]).sum() <= 1  # a tie at exactly 0.5


def test_unrotated_unscaled_samples_are_batchgenerators_centre_crop():
    data = torch.arange(2 * 9 * 8 * 7, dtype=torch.float32).reshape(2, 9, 8, 7)
    seg = torch.arange(9 * 8 * 7).reshape(9, 8, 7) % 3
    x, y = spatial_sample(data, seg, None, [4, 5, 6])
    assert torch.equal(x, data[:, 2:6, 1:6, 0:6]) and torch.equal(y, seg[2:6, 1:6, 0:6])  # (region - patch) // 2


def test_a_quarter_turn_is_an_exact_rotation_of_the_array():
    img = torch.from_numpy(_smooth((9, 11, 11)))
    x, _ = spatial_sample(img[None], torch.zeros(9, 11, 11, dtype=torch.long), rotation_matrix([np.pi / 2, 0, 0]),
                          [9, 11, 11])
    np.testing.assert_allclose(x[0].numpy(), np.rot90(img.numpy(), k=1, axes=(1, 2)), atol=1e-4)


@pytest.mark.parametrize("shape,sigma", [((7, 9, 8), 0.5), ((7, 9, 8), 1.0), ((3, 12, 10), 1.0), ((13, 11), 0.8)])
def test_blur_is_scipys_gaussian_filter(shape, sigma):
    img = np.random.default_rng(1).normal(size=shape).astype(np.float32)  # an axis of 3 < radius 4: reflected twice
    np.testing.assert_allclose(gaussian_blur(torch.from_numpy(img), sigma).numpy(),
                               gaussian_filter(img.astype(np.float64), sigma), atol=1e-5)


@pytest.mark.parametrize("invert", [False, True])
def test_gamma_keeps_batchgenerators_formula_and_the_statistics(invert):
    img = _smooth((6, 7, 8), 4)
    ref = augment_gamma(img[None].astype(np.float64).copy(), (1.3, 1.3), invert, per_channel=True,
                        retain_stats=True)[0]
    out = _gamma(torch.from_numpy(img), 1.3, invert).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4)
    assert abs(out.mean() - img.mean()) < 1e-4 and abs(out.std() - img.std()) < 1e-3


def test_contrast_is_batchgenerators_with_the_range_kept():
    img = _smooth((6, 7, 8), 5)
    ref = augment_contrast(img[None].astype(np.float64).copy(), (1.2, 1.2), True, True)[0]
    out = _contrast(torch.from_numpy(img), 1.2).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert out.min() >= img.min() and out.max() <= img.max()


def test_low_resolution_keeps_the_slice_axis_of_in_plane_plans():
    z_only = torch.arange(10, dtype=torch.float32)[:, None, None].expand(10, 12, 12).contiguous() ** 2
    in_plane = DeviceAugmenter([10, 12, 12], _plan(dummy_2d=True))
    torch.testing.assert_close(in_plane._low_resolution(z_only, 0.5), z_only)  # constant in-plane: unchanged
    every_axis = DeviceAugmenter([10, 12, 12], _plan())
    assert not torch.allclose(every_axis._low_resolution(z_only, 0.5), z_only)
    const = torch.full((10, 12, 12), 3.0)
    torch.testing.assert_close(every_axis._low_resolution(const, 0.6), const)


def test_all_off_gives_the_centre_crop_and_mirroring_gives_its_flips():
    data = torch.from_numpy(_smooth((2, 12, 13, 14))[None].copy())
    seg = torch.from_numpy(_blobs((12, 13, 14)))[None]
    x, y = DeviceAugmenter([8, 9, 10], _plan())(data, seg, 5)
    assert torch.equal(x, data[:, :, 2:10, 2:11, 2:12]) and torch.equal(y, seg[:, 2:10, 2:11, 2:12])
    seen = set()
    for seed in range(12):
        xm, ym = DeviceAugmenter([8, 9, 10], _plan(mirror_axes=[0, 2]))(data, seg, seed)
        flips = next(f for f in ([], [0], [2], [0, 2]) if torch.equal(ym, y.flip([a + 1 for a in f]) if f else y))
        assert torch.equal(xm, x.flip([a + 2 for a in flips]) if flips else x)
        seen.add(tuple(flips))
    assert len(seen) == 4


def test_full_augmentation_is_seeded_keeps_labels_and_handles_2d():
    full = _plan(p_rotation=0.5, p_scale=0.5, p_noise=0.5, p_blur=0.5, p_brightness=0.5, p_contrast=0.5,
                 p_low_resolution=0.5, p_gamma=0.5, p_gamma_inverted=0.5, mirror_axes=[0, 1, 2])
    patch = [8, 10, 9]
    region = initial_patch_size(patch, full)
    data = torch.from_numpy(np.stack([_smooth(tuple(region), s) for s in range(2)])[:, None].repeat(2, 1))
    seg = torch.from_numpy(np.stack([_blobs(tuple(region))] * 2))
    aug = DeviceAugmenter(patch, full)
    x1, y1 = aug(data, seg, 11)
    x2, y2 = aug(data, seg, 11)
    assert x1.shape == (2, 2, *patch) and y1.shape == (2, *patch) and y1.dtype == seg.dtype
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # a resumed run augments its batch alike
    assert not torch.equal(aug(data, seg, 12)[0], x1)
    assert set(torch.unique(y1).tolist()) <= {0, 1, 2} and torch.isfinite(x1).all()
    flat = replace(full, rotation_degrees=[180.0, 0.0, 0.0])
    flat_patch = [1, 10, 9]
    data2 = data[:, :, :1, :12, :12].contiguous()
    seg2 = seg[:, :1, :12, :12].contiguous()
    x3, y3 = DeviceAugmenter(flat_patch, flat)(data2, seg2, 3)
    assert x3.shape == (2, 2, 1, 10, 9) and y3.shape == (2, 1, 10, 9)


def test_planned_on_the_training_device_and_old_plans_keep_the_workers(tiny_run, tmp_path):
    data = json.loads((tiny_run / "fingerprint.json").read_text())["dataset_dir"]
    assert main(["plan", data, "-o", str(tmp_path / "gpu"), "--device", "cuda", "--gpu-memory", "24",
                 "--no-progress"]) == 0
    gpu = load_plans(tmp_path / "gpu" / "plans.json")
    assert gpu.training.augmentation.on_device
    assert all(c.augmentation.on_device for c in gpu.other_configurations)
    assert load_plans(tiny_run / "plans.json").training.augmentation.on_device  # CPU plans too
    raw = json.loads((tiny_run / "plans.json").read_text())
    del raw["training"]["augmentation"]["on_device"]  # a plan written before the field: workers augment
    (tiny_run / "plans.json").write_text(json.dumps(raw))
    assert not load_plans(tiny_run / "plans.json").training.augmentation.on_device


def _on_device(run) -> None:
    raw = json.loads((run / "plans.json").read_text())
    for aug in [raw["training"]["augmentation"]] + [c["augmentation"] for c in raw["other_configurations"]]:
        aug["on_device"] = True
    (run / "plans.json").write_text(json.dumps(raw))


def test_workers_send_regions_and_the_trainer_augments_them(tiny_run):
    _on_device(tiny_run)
    p = load_plans(tiny_run / "plans.json")
    st = p.stages[0]
    sampler = PatchSampler(tiny_run / "preprocessed", p.folds[0].train, st.patch_size, 0.5)
    batch = BatchDataset(sampler, 2, p.training.augmentation, 0, 0, True)[4]
    assert list(batch["data"].shape[2:]) == initial_patch_size(st.patch_size, p.training.augmentation)
    assert "aug_seed" in batch and batch["seg"].dtype == torch.int16
    aug = DeviceAugmenter(st.patch_size, p.training.augmentation)
    x, y, guide = batch_tensors(batch, torch.device("cpu"), aug, None, 0.5)
    assert list(x.shape[2:]) == st.patch_size and y.dtype == torch.int64 and guide is None
    with pytest.raises(ValueError, match="does not augment on the device"):
        batch_tensors(batch, torch.device("cpu"), None, None, 0.5)
    val = BatchDataset(sampler, 2, p.training.augmentation, 0, 0, False)[0]
    assert "aug_seed" not in val and list(val["data"].shape[2:]) == st.patch_size


def test_training_on_the_device_resumes_exactly(tiny_run, tmp_path, monkeypatch):
    _on_device(tiny_run)
    reference = tmp_path / "reference"
    shutil.copytree(tiny_run, reference)
    overrides = Overrides("both", 1, 2, None)
    rt = Runtime(torch.device("cpu"), workers=0, progress=False)
    Trainer(reference, "0", overrides, rt, say=lambda s: None).fit()
    train_until_signalled(monkeypatch, tiny_run, overrides, rt, None, 3)
    Trainer(tiny_run, "0", overrides, rt, say=lambda s: None).fit()
    a = load_checkpoint(tiny_run / "fold_0" / "checkpoint_final.pt")["network"]
    b = load_checkpoint(reference / "fold_0" / "checkpoint_final.pt")["network"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_patch_free_guidance_is_chosen_on_the_augmented_labels(tiny_run):
    data = json.loads((tiny_run / "fingerprint.json").read_text())["dataset_dir"]
    assert main(["plan", data, "-o", str(tiny_run), "--device", "cpu", "--no-progress", "--configs",
                 "3d,patch_free"]) == 0
    _on_device(tiny_run)
    p = select_configuration(load_plans(tiny_run / "plans.json"), "patch_free")
    st, net = p.stages[-1], p.network
    guidance = Guidance(net.upsample_factor, net.guidance_share)
    sampler = PatchSampler(tiny_run / "preprocessed", p.folds[0].train, st.patch_size, 1.0)
    batch = BatchDataset(sampler, 2, p.training.augmentation, 0, 1, True, guidance=guidance)[3]
    assert "guide" not in batch  # a worker cannot choose it before the augmentation
    aug = DeviceAugmenter(st.patch_size, p.training.augmentation)
    x, y, guide = batch_tensors(batch, torch.device("cpu"), aug, guidance, 1.0)
    low = [e // f for e, f in zip(st.patch_size, net.upsample_factor)]
    assert guide is not None and tuple(guide.shape) == (2, 3)
    assert ((guide >= 0) & (guide <= torch.tensor(low) // 2)).all()
    assert torch.equal(batch_tensors(batch, torch.device("cpu"), aug, guidance, 1.0)[2], guide)
    # with oversampling 1, each sample's guidance patch (full resolution: corner x factor, size x factor)
    # holds foreground of its augmented labels
    size = guidance_size(low, net.guidance_share)
    assert y.shape[0] == 2 and any(bool(lab.any()) for lab in y)
    for lab, corner in zip(y, guide):
        box = tuple(slice(int(c) * f, (int(c) + n) * f) for c, n, f in zip(corner, size, net.upsample_factor))
        assert bool(lab[box].any()) or not bool(lab.any())
    overrides = Overrides("both", 1, 2, None)
    Trainer(tiny_run, "0", overrides, Runtime(torch.device("cpu"), workers=0, progress=False),
            configuration="patch_free", say=lambda s: None).fit()
    assert (tiny_run / "patch_free" / "fold_0" / "checkpoint_final.pt").is_file()



def test_read_size_is_the_enlarged_region_for_training_only():
    aug = _plan(p_rotation=1.0, p_scale=1.0)
    assert read_size([8, 12, 12], aug, True) == initial_patch_size([8, 12, 12], aug)
    assert read_size([8, 12, 12], aug, False) == [8, 12, 12]
    flat = read_size([1, 12, 12], replace(aug, rotation_degrees=[180.0, 0.0, 0.0], dummy_2d=True), True)
    assert flat[0] == 1 and flat[1:] == initial_patch_size([1, 12, 12], aug)[1:]


class _Counting(DeviceAugmenter):
    """Records the regions it is given."""

    def __init__(self, patch: list[int], aug: AugmentationPlan):
        super().__init__(patch, aug)
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, data, seg, seed):
        self.shapes.append(tuple(data.shape))
        return super().__call__(data, seg, seed)


def test_the_budgets_step_measurement_includes_augmentation_on_the_device():
    patch, aug = [8, 12, 12], _plan(p_rotation=1.0, p_scale=1.0, p_noise=1.0, mirror_axes=[0, 1, 2])
    run = StageRun("zoom_in", patch, 2, 1, 1, "adam", 1e-3, 0.99, 0.0, "poly", None)
    net = ResidualUNet(1, 2, [8, 16], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1], deep_supervision=False)
    loss = nn.CrossEntropyLoss()
    counting = _Counting(patch, aug)
    seconds = measure_step_seconds(net, loss, run, 2, 1, 2, torch.device("cpu"), False, counting, warmup=1, timed=2)
    assert seconds > 0
    assert counting.shapes == [(2, 1, *read_size(patch, aug, True))] * 3  # every step, on regions as read
    assert read_size(patch, aug, True) != patch
    assert DeviceAugmenter.planned(patch, replace(aug, on_device=False)) is None
    assert isinstance(DeviceAugmenter.planned(patch, aug), DeviceAugmenter)
