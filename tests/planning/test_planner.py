"""The planner on written-out fingerprints, with the expected plans spelled out."""

from __future__ import annotations

import dataclasses
from math import prod

import pytest

from autoseg import defaults
from autoseg.planning import make_plan
from autoseg.planning.memory import step_cost
from autoseg.planning.planner import usable_memory_bytes

from .fingerprints import BRAIN, CT, PROSTATE, device

ISO = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
K3 = [3, 3, 3]

# (fingerprint, device kind, GiB) -> target spacing, features, blocks, strides, kernels, zoom-in, zoom-out, batch
EXPECTED = {
    ("brain", "cuda", 8): ([1.0, 1.0, 1.0], [32, 64, 128, 256], [1, 2, 2, 2], ISO, [K3] * 4,
                           [32, 32, 40], [40, 56, 40], 7),
    ("brain", "cuda", 24): ([1.0, 1.0, 1.0], [32, 64, 128, 256], [1, 3, 4, 6], ISO, [K3] * 4,
                            [32, 32, 40], [40, 56, 40], 7),
    ("brain", "cpu", 16): ([1.0, 1.0, 1.0], [16, 32, 64, 128], [1, 1, 1, 1], ISO, [K3] * 4,
                           [32, 32, 40], [40, 56, 40], 2),
    ("prostate", "cuda", 8): ([3.6, 0.6, 0.6], [32, 64, 128, 256, 320, 320], [1, 2, 2, 2, 2, 2],
                              [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                              [[1, 3, 3], [1, 3, 3], K3, K3, K3, K3], [20, 224, 224], [20, 320, 320], 2),
    ("prostate", "cuda", 24): ([3.6, 0.6, 0.6], [32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6],
                               [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                               [[1, 3, 3], [1, 3, 3], K3, K3, K3, K3], [20, 224, 224], [20, 320, 320], 2),
    ("prostate", "cpu", 16): ([3.6, 0.6, 0.6], [16, 32, 64, 128, 128], [1, 1, 1, 1, 1],
                              [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
                              [[1, 3, 3], [1, 3, 3], K3, K3, K3], [10, 64, 64], [12, 80, 80], 2),
    # CT on GPUs: the memory model counts the 16-bit weight copies autocast keeps for backward (2 bytes per
    # parameter) and the loss's measured peak (17 bytes per full-resolution voxel and class): the former
    # 64x192x192 and 80x288x288 zoom-out patches need 6.02 GiB of 5.95 and 19.56 GiB of 19.55
    ("ct", "cuda", 8): ([2.5, 0.8, 0.8], [32, 64, 128, 256, 320, 320], [1, 2, 2, 2, 2, 2],
                        [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                        [[1, 3, 3], K3, K3, K3, K3, K3], [48, 128, 160], [48, 192, 192], 2),
    ("ct", "cuda", 24): ([2.5, 0.8, 0.8], [32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6],
                         [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                         [[1, 3, 3], K3, K3, K3, K3, K3], [64, 192, 224], [80, 256, 288], 2),
    ("ct", "cpu", 16): ([2.5, 0.8, 0.8], [16, 32, 64, 128, 128], [1, 1, 1, 1, 1],
                        [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                        [[1, 3, 3], K3, K3, K3, K3], [16, 48, 48], [20, 64, 64], 2),
}
FPS = {"brain": BRAIN, "prostate": PROSTATE, "ct": CT}


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}")
def test_expected_plan(key):
    name, kind, gib = key
    spacing, features, blocks, strides, kernels, zoom_in, zoom_out, batch = EXPECTED[key]
    p = make_plan(FPS[name], device(kind, gib))
    assert p.target_spacing == spacing
    assert p.network.features == features
    assert p.network.blocks_per_stage == blocks
    assert p.network.strides == strides
    assert p.network.kernel_sizes == kernels
    assert [s.name for s in p.stages] == ["zoom_in", "zoom_out"]
    assert p.stages[0].patch_size == zoom_in
    assert p.stages[1].patch_size == zoom_out
    assert p.stages[0].batch_size == p.stages[1].batch_size == batch
    assert p.amp is (kind == "cuda")


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}")
def test_plan_invariants(key):
    name, kind, gib = key
    fp, dev = FPS[name], device(kind, gib)
    p = make_plan(fp, dev)
    zin, zout = p.stages
    stride = p.network.total_stride
    for st in p.stages:
        assert all(e % s == 0 for e, s in zip(st.patch_size, stride))
        assert st.batch_size >= 2
        cost = step_cost(p.network, st.patch_size, st.batch_size, len(fp.channel_names), len(fp.labels), p.amp)
        assert cost.total_bytes <= usable_memory_bytes(dev)
        if kind == "cpu":
            assert cost.flops <= defaults.CPU_MAX_STEP_FLOPS
    # zoom-in: about half the zoom-out volume, never larger on any axis
    assert 0.3 < prod(zin.patch_size) / prod(zout.patch_size) < 0.7
    assert all(a <= b for a, b in zip(zin.patch_size, zout.patch_size))
    # zoom-out: a tenth of the learning rate, an eighth of the epochs, initialised from zoom-in
    assert zout.learning_rate == pytest.approx(zin.learning_rate / 10)
    # the optimiser by device: nnU-Net's SGD at 1e-2 on a GPU, Adam at 3e-3 for a CPU's short budgets
    optimizer, lr = ("sgd", 1e-2) if kind == "cuda" else ("adam", 3e-3)
    assert zin.optimizer == zout.optimizer == optimizer and zin.learning_rate == pytest.approx(lr)
    assert zout.epochs == round(zin.epochs / 8)
    assert zout.init_from == "zoom_in" and zin.init_from is None
    # zoom-out patch never exceeds the median shape by more than one stride step
    assert all(e < m + s for e, m, s in zip(zout.patch_size, p.median_shape_after_resampling, stride))


def test_plan_is_deterministic():
    a = make_plan(CT, device("cuda", 8))
    b = make_plan(CT, device("cuda", 8))
    assert dataclasses.asdict(a) == dataclasses.asdict(b)


def test_gpu_budgets_give_different_plans():
    small, large = make_plan(BRAIN, device("cuda", 4)), make_plan(BRAIN, device("cuda", 24))
    assert small.network.blocks_per_stage != large.network.blocks_per_stage
    small, large = make_plan(CT, device("cuda", 4)), make_plan(CT, device("cuda", 24))
    assert prod(small.stages[1].patch_size) < prod(large.stages[1].patch_size)


def test_cpu_plan_buys_thousands_of_steps():
    p = make_plan(BRAIN, device("cpu", 16))
    steps = sum(s.epochs * s.iterations_per_epoch for s in p.stages)
    assert steps >= 4000
    # one step of the zoom-out stage is within the calibrated CPU compute budget (~0.4 s on 2 cores)
    assert p.stages[1].estimated_step_gflops * 1e9 <= defaults.CPU_MAX_STEP_FLOPS


def test_normalisation_per_channel():
    ct = make_plan(CT, device("cpu", 16)).normalization[0]
    assert (ct.scheme, ct.clip, ct.mean, ct.std) == ("ct", [-50.0, 250.0], 80.0, 50.0)
    mr = make_plan(PROSTATE, device("cpu", 16)).normalization
    assert [(n.channel, n.scheme, n.use_mask) for n in mr] == [("T2", "zscore", False), ("ADC", "zscore", False)]
    # brain-extracted MRI: cropping removes over a quarter of the volume -> normalise inside the mask
    from .fingerprints import fingerprint
    skull_stripped = fingerprint("bet", [1.0, 1.0, 1.0], [36, 50, 35], 10, ["T1"], 1, relative_crop=0.6)
    assert make_plan(skull_stripped, device("cpu", 16)).normalization[0].use_mask is True


def test_budget_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="no patch fits the budget"):
        make_plan(CT, device("cuda", 0.3))


def test_folds_saved_with_plan():
    p = make_plan(BRAIN, device("cpu", 16))
    assert len(p.folds) == 5
    vals = [c for f in p.folds for c in f.val]
    assert sorted(vals) == sorted(c.case_id for c in BRAIN.cases)
    for f in p.folds:
        assert not set(f.train) & set(f.val) and len(f.train) + len(f.val) == BRAIN.n_cases
