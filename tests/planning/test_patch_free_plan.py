"""When the planner proposes the patch-free configuration, with which factor, and that its regions fit the
budget like every other configuration's patches."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from autoseg import defaults
from autoseg.planning import make_plan
from autoseg.planning.measured import network_step_cost
from autoseg.planning.planner import dice_weights, patch_free_factor, usable_memory_bytes
from autoseg.planning.summary import format_summary
from autoseg.plans import SchemaError, configuration_names, load_plans, save_plans, select_configuration, validate_plans

from .fingerprints import BRAIN, CT, device, fingerprint

#: a 4-channel skull-stripped brain MRI the size of BraTS
BIG_BRAIN = fingerprint("brats", [1.0, 1.0, 1.0], [155, 240, 240], 40, ["T1", "T1ce", "T2", "FLAIR"], 3)


@pytest.mark.parametrize("spacing,factor", [
    ([1.0, 1.0, 1.0], [2, 2, 2]),      # isotropic: every axis
    ([1.5, 1.0, 1.0], [2, 2, 2]),      # within the factor of isotropic
    ([2.5, 1.0, 1.0], [1, 2, 2]),      # in-plane halved to 2 mm, the 2.5 mm slices kept
    ([7.7, 1.25, 1.25], [1, 2, 2]),    # CHAOS-like thick slices
    ([5.0, 0.8, 0.8], [1, 2, 2]),
    ([1.0, 1.0, 3.0], [2, 2, 1]),      # the coarse axis last
])
def test_factor_halves_every_axis_that_stays_no_coarser_than_the_coarsest(spacing, factor):
    assert patch_free_factor(spacing) == factor


def test_planned_for_big_volumes_and_not_for_small_crops():
    big = make_plan(BIG_BRAIN, device("cpu", 24))
    share = big.stages[-1].share_of_median_volume
    assert share < defaults.PATCH_FREE_MAX_SHARE
    assert "patch_free" in configuration_names(big)
    assert big.configuration_reasons["patch_free"].startswith("planned by default: the 3d zoom-out patch covers")
    small = make_plan(BRAIN, device("cpu", 16))  # Hippocampus-sized: the 3d patch sees the whole crop
    assert "patch_free" not in configuration_names(small)
    assert "sliding windows already see most of a scan" in small.configuration_reasons["patch_free"]
    asked = make_plan(BRAIN, device("cpu", 16), configurations=["3d", "patch_free"])
    assert configuration_names(asked) == ["3d", "patch_free"]
    assert asked.configuration_reasons["patch_free"].startswith("asked for with --configs")


@pytest.mark.parametrize("fp,kind,gib", [(BIG_BRAIN, "cpu", 24), (BIG_BRAIN, "cuda", 24), (CT, "cuda", 8)],
                         ids=["brats-cpu", "brats-gpu24", "ct-gpu8"])
def test_regions_fit_the_budget_and_cover_more_than_the_3d_patch(fp, kind, gib):
    dev = device(kind, gib)
    plan = make_plan(fp, dev, configurations=["3d", "patch_free"])
    pf = select_configuration(plan, "patch_free")
    net = pf.network
    assert net.architecture == "patch_free" and net.upsample_factor == patch_free_factor(plan.target_spacing)
    assert net.channels_last is (kind == "cpu")  # as our U-Net: channels-last on the CPU, contiguous on a GPU
    for st in pf.stages:
        assert all(e % s == 0 for e, s in zip(st.patch_size, net.total_stride))
        c = network_step_cost(net, st.patch_size, st.batch_size, len(fp.channel_names), len(fp.labels), plan.amp)
        assert c.total_bytes <= usable_memory_bytes(dev)
        if kind == "cpu":
            assert c.flops <= defaults.CPU_MAX_STEP_FLOPS
    assert pf.stages[-1].share_of_median_volume >= min(1.0, 2 * plan.stages[-1].share_of_median_volume)


def _sized(fp, voxels: list[int]):
    """``fp`` with its foreground classes' total voxels over the dataset set to ``voxels``."""
    return replace(fp, classes=[replace(c, total_voxels=v) for c, v in zip(fp.classes, voxels)])


def test_patch_free_gets_size_rank_dice_weights_unless_told_otherwise(tmp_path):
    """By default patch_free weights rarer classes more (seed 001's size rank) and every other configuration
    keeps equal weights; --dice-weights sets every configuration; the weights survive selecting back and forth
    and a save/load; a plan written before configurations had weights of their own reads as sharing the plan's."""
    fp = _sized(BIG_BRAIN, [9000, 1000, 3000])  # class2 rarest, class1 most common
    plan = make_plan(fp, device("cpu", 24), configurations=["3d", "2d", "patch_free"])
    pf = select_configuration(plan, "patch_free")
    assert plan.training.dice_class_weights == [1.0, 1.0, 1.0]
    assert pf.training.dice_class_weights == pytest.approx([0.5, 1.5, 1.0])  # ranks 1, 3, 2, averaging 1
    assert select_configuration(pf, "3d").training == plan.training
    assert select_configuration(pf, "2d").training == select_configuration(plan, "2d").training  # not patch_free's
    auto = make_plan(fp, device("cpu", 24))  # patch_free added by the planner for this big volume
    assert select_configuration(auto, "patch_free").training.dice_class_weights == pf.training.dice_class_weights
    assert "Dice class weights class1 0.5, class2 1.5, class3 1" in format_summary(fp, plan)
    path = tmp_path / "plans.json"
    save_plans(plan, path)
    assert select_configuration(load_plans(path), "patch_free").training == pf.training
    raw = json.loads(path.read_text())
    for c in raw["other_configurations"]:
        del c["dice_class_weights"]
    path.write_text(json.dumps(raw))
    assert select_configuration(load_plans(path), "patch_free").training.dice_class_weights == [1.0, 1.0, 1.0]
    for told in ("equal", "size-rank"):
        p = make_plan(fp, device("cpu", 24), dice_weighting=told, configurations=["3d", "patch_free"])
        want = dice_weights(fp, told)
        assert p.training.dice_class_weights == want
        assert select_configuration(p, "patch_free").training.dice_class_weights == want


def test_a_configurations_dice_weights_are_checked():
    plan = make_plan(BIG_BRAIN, device("cpu", 24), configurations=["3d", "patch_free"])
    bad = replace(plan, other_configurations=[replace(c, dice_class_weights=[1.0, -1.0, 1.0])
                                              for c in plan.other_configurations])
    with pytest.raises(SchemaError, match=r"other_configurations\[0\] \(patch_free\).dice_class_weights: "
                                          r"\[1.0, -1.0, 1.0\]; expected 3 non-negative weights"):
        validate_plans(bad)
