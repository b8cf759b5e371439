"""The 2d configuration beside the 3d one: slices as samples, planned to the same budgets, and the default
chosen from how much of a slice the 3d patch sees."""

from __future__ import annotations

import dataclasses
import json

import pytest

from autoseg import defaults
from autoseg.planning import make_plan
from autoseg.planning.memory import step_cost
from autoseg.planning.planner import usable_memory_bytes
from autoseg.planning.topology import topology_for_patch
from autoseg.plans import TOP_CONFIGURATION, configuration_names, load_plans, save_plans, select_configuration
from autoseg.typedjson import SchemaError

from .fingerprints import BRAIN, CT, PROSTATE, device

FPS = {"brain": BRAIN, "prostate": PROSTATE, "ct": CT}
CASES = [("brain", "cpu", 16), ("brain", "cuda", 8), ("prostate", "cpu", 16), ("prostate", "cuda", 24),
         ("ct", "cpu", 16), ("ct", "cuda", 8)]


def test_a_one_slice_patch_is_never_convolved_or_pooled_across_slices():
    # CHAOS-like: 7.7 mm slices, 1.25 mm in-plane. Pooled in-plane 5 times, the in-plane spacing (40 mm) passes
    # the slice spacing, which in 3D would switch the z kernel to 3: a one-slice patch must keep it at 1
    t = topology_for_patch([1, 256, 256], [7.7, 1.25, 1.25])
    assert all(k == [1, 3, 3] for k in t.kernel_sizes)
    assert t.strides == [[1, 1, 1]] + [[1, 2, 2]] * 5
    assert t.patch == [1, 256, 256]


@pytest.mark.parametrize("key", CASES, ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}")
def test_2d_configuration_is_slices_within_the_budget(key):
    name, kind, gib = key
    fp, dev = FPS[name], device(kind, gib)
    p = select_configuration(make_plan(fp, dev), "2d")
    assert p.configuration == "2d"
    net = p.network
    assert all(k[0] == 1 for k in net.kernel_sizes) and all(s[0] == 1 for s in net.strides)
    assert p.inference.mirror_axes == [1, 2] and p.training.augmentation.mirror_axes == [1, 2]
    assert p.training.augmentation.dummy_2d
    assert len(p.training.deep_supervision_weights) == len(net.features) - 1
    zin, zout = p.stages
    median = p.median_shape_after_resampling
    assert zin.patch_size[0] == zout.patch_size[0] == 1
    # the zoom-out patch is the whole median slice, rounded up to the stride, unless two of those do not fit the
    # budget (CT's 512x512 on a CPU): then it was shrunk and the batch is the smallest
    stride = net.total_stride
    assert all(e < m + s for e, m, s in zip(zout.patch_size[1:], median[1:], stride[1:]))
    batch = zout.batch_size
    whole = all(e >= m for e, m in zip(zout.patch_size[1:], median[1:]))
    assert whole or batch == defaults.MIN_BATCH_SIZE
    assert whole == (key != ("ct", "cpu", 16))
    per = step_cost(net, zout.patch_size, batch, len(fp.channel_names), len(fp.labels), p.amp)
    assert per.total_bytes <= usable_memory_bytes(dev) and batch >= defaults.MIN_BATCH_SIZE
    # the batch is the largest within memory, compute (CPU) and 5 % of the dataset's voxels
    more = step_cost(net, zout.patch_size, batch + 1, len(fp.channel_names), len(fp.labels), p.amp)
    over_dataset = (batch + 1) * zout.patch_size[1] * zout.patch_size[2] > \
        defaults.MAX_DATASET_COVERED * fp.n_cases * median[0] * median[1] * median[2]
    over_compute = kind == "cpu" and more.flops > defaults.CPU_MAX_STEP_FLOPS
    assert more.total_bytes > usable_memory_bytes(dev) or over_dataset or over_compute
    if kind == "cpu":
        assert per.flops <= defaults.CPU_MAX_STEP_FLOPS


@pytest.mark.parametrize("key, expected", [
    (("brain", "cpu", 16), "3d"),      # the 3d patch holds the whole (small) slice
    (("prostate", "cuda", 24), "3d"),  # 320x320 in-plane on a big GPU
    (("prostate", "cpu", 16), "2d"),   # 80x80 of 320x320: 6 %
    (("ct", "cpu", 16), "2d"),         # 64x64 of 512x512
])
def test_default_configuration_follows_the_in_plane_share_of_the_3d_patch(key, expected):
    name, kind, gib = key
    p = make_plan(FPS[name], device(kind, gib))
    assert p.default_configuration == expected
    assert "% of the median slice" in p.default_reason
    big = p.stages[-1].share_of_median_volume < defaults.PATCH_FREE_MAX_SHARE  # sliding windows see little
    assert configuration_names(p) == list(defaults.DEFAULT_CONFIGURATIONS[kind]) + ["patch_free"] * big


def test_selecting_swaps_only_what_differs_and_round_trips(tmp_path):
    p = make_plan(PROSTATE, device("cpu", 16))
    two = select_configuration(p, "2d")
    assert two.normalization == p.normalization and two.folds == p.folds and two.target_spacing == p.target_spacing
    assert two.training.dice_class_weights == p.training.dice_class_weights
    assert two.network != p.network and two.stages != p.stages
    back = select_configuration(two, TOP_CONFIGURATION)
    assert back.network == p.network and back.stages == p.stages and back.inference == p.inference
    assert back.training == p.training
    assert select_configuration(p, None).configuration == p.default_configuration
    path = tmp_path / "plans.json"
    save_plans(p, path)
    assert dataclasses.asdict(load_plans(path)) == dataclasses.asdict(p)
    with pytest.raises(ValueError, match=r"configuration '3d_lowres': the plan has 3d, 2d"):
        select_configuration(p, "3d_lowres")


def test_a_plan_written_before_configurations_reads_as_3d_only(tmp_path):
    path = tmp_path / "plans.json"
    save_plans(make_plan(BRAIN, device("cpu", 16)), path)
    data = json.loads(path.read_text())
    for key in ("configuration", "other_configurations", "default_configuration", "default_reason"):
        del data[key]
    path.write_text(json.dumps(data))
    p = load_plans(path)
    assert configuration_names(p) == ["3d"] and p.default_configuration == "3d"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(default_configuration="2.5d"), "default_configuration: '2.5d'; the plan has 3d, 2d"),
    (lambda d: d["other_configurations"][0]["stages"][1].update(patch_size=[1, 100, 96]),
     "other_configurations[0] (2d): stages[1].patch_size: [1, 100, 96] is not divisible"),
    (lambda d: d["other_configurations"][0].update(name="3d"), "names ['3d', '3d', 'patch_free'] repeat"),
    (lambda d: d["other_configurations"][1]["network"].update(guidance_share=0),
     "other_configurations[1] (patch_free): network: patch_free needs guidance_share in (0, 1]"),
    (lambda d: d["network"].update(upsample_factor=[1, 2, 2]),
     "network.upsample_factor: [1, 2, 2]; only patch_free down-samples its input"),
])
def test_hand_edited_configurations_are_checked(tmp_path, change, message):
    path = tmp_path / "plans.json"
    save_plans(make_plan(PROSTATE, device("cpu", 16)), path)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(SchemaError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_plans(path)
