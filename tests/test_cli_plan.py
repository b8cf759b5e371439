"""``autoseg plan`` end to end on generated datasets, and once (slow) on the real Hippocampus data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoseg.cli import build_parser, main
from autoseg.demo import make_synthetic_dataset
from autoseg.plans import load_plans

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "MSD_Task04_Hippocampus"
CHAOS = HIPPOCAMPUS.parent / "CHAOS_T2_Abdomen"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "Synthetic", n_cases=6, shape=(20, 28, 24))


def test_plan_writes_both_files_and_prints_summary(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["plan", str(dataset), "-o", str(run), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["fingerprint.json", "plans.json"]
    plan = load_plans(run / "plans.json")
    for needle in ("6 cases", "median       shape 20x28x24", "target       spacing 1x1x1 mm", "MRI: zscore",
                   "config 3d (default)", "features [16, 32, 64]", "  zoom_in    patch", "  zoom_out   patch",
                   "% of median volume", "config 2d ", "kernels ['1x3x3', '1x3x3', '1x3x3']", "default      3d: ",
                   "GiB", "(computed)"):
        assert needle in out, needle
    zin, zout = plan.stages
    assert zin.patch_size != zout.patch_size
    assert all(a <= b for a, b in zip(zin.patch_size, zout.patch_size))
    fp = json.loads((run / "fingerprint.json").read_text())
    assert fp["n_cases"] == 6 and fp["device"]["kind"] == "cpu"
    # second run on the unchanged dataset reuses the fingerprint
    assert main(["plan", str(dataset), "-o", str(run), "--no-progress", "--device", "cpu"]) == 0
    assert "(reused)" in capsys.readouterr().out


def test_gpu_memory_changes_the_plan(dataset, tmp_path):
    plans = {}
    for gib in (4, 24):
        run = tmp_path / f"run{gib}"
        assert main(["plan", str(dataset), "-o", str(run), "--gpu-memory", str(gib), "--no-progress"]) == 0
        plans[gib] = load_plans(run / "plans.json")
    assert plans[4].device.kind == plans[24].device.kind == "cuda"
    assert plans[4].device.budget_gib == 4 and plans[24].device.budget_gib == 24
    assert plans[4].network.blocks_per_stage != plans[24].network.blocks_per_stage
    assert plans[4].memory_budget_gib < plans[24].memory_budget_gib


def test_default_run_dir_and_refusal_inside_dataset(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(dataset), "--no-progress", "--device", "cpu"]) == 0
    assert (tmp_path / "autoseg_runs" / "Synthetic" / "plans.json").is_file()
    assert main(["plan", str(dataset), "-o", str(dataset / "run"), "--no-progress"]) == 1
    assert "inside the dataset folder" in capsys.readouterr().err
    assert not (dataset / "run").exists()


def test_bad_gpu_memory_is_a_clear_error(dataset, tmp_path, capsys):
    assert main(["plan", str(dataset), "-o", str(tmp_path / "r"), "--gpu-memory", "-1", "--no-progress"]) == 1
    assert "--gpu-memory must be positive" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_help_explains_every_option():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public accessor
    for name, p in sub.items():
        for action in p._actions:  # noqa: SLF001
            assert action.help, f"{name}: option {action.option_strings or action.dest} has no help"


@pytest.mark.slow
@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="real data not present")
def test_plan_real_hippocampus(tmp_path, capsys):
    run = tmp_path / "hippo"
    out, plan = plan_on_cpu(HIPPOCAMPUS, run, capsys)
    assert "200 cases" in out
    assert plan.target_spacing == [1.0, 1.0, 1.0]
    assert plan.median_shape_after_resampling == [36, 50, 35]
    assert plan.stages[1].patch_size == [40, 56, 40]
    assert plan.stages[0].patch_size == [32, 32, 40]
    assert [c.name for c in load_fingerprint_classes(run)] == ["Anterior", "Posterior"]


def plan_on_cpu(dataset, run, capsys):
    """``autoseg plan DATASET -o RUN --device cpu``: its printed summary and the plan it wrote."""
    assert main(["plan", str(dataset), "-o", str(run), "--device", "cpu", "--no-progress"]) == 0
    return capsys.readouterr().out, load_plans(run / "plans.json")


def load_fingerprint_classes(run):
    from autoseg.fingerprint import load_fingerprint

    return load_fingerprint(run / "fingerprint.json").classes


def test_splits_from_a_file_replace_the_folds_and_bad_files_are_named(dataset, tmp_path, capsys):
    ids = sorted(p.name[:-len("_0000.nii.gz")] for p in (dataset / "imagesTr").glob("*_0000.nii.gz"))
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ids[2:], "val": ids[:2]}, {"train": ids[:2], "val": ids[2:]}]))
    run = tmp_path / "run"
    assert main(["plan", str(dataset), "-o", str(run), "--no-progress", "--device", "cpu", "--splits",
                 str(splits)]) == 0
    folds = load_plans(run / "plans.json").folds
    assert [(f.train, f.val) for f in folds] == [(ids[2:], ids[:2]), (ids[:2], ids[2:])]
    for content, message in [("[{\"train\": [], \"val\": [\"nobody\"]}]", "the dataset does not have, e.g. 'nobody'"),
                             (json.dumps([{"train": ids, "val": ids[:1]}]), "is in both train and val"),
                             ("{\"folds\": 2}", "expected a JSON list"), ("not json", "cannot read the splits")]:
        splits.write_text(content)
        assert main(["plan", str(dataset), "-o", str(tmp_path / "other"), "--no-progress", "--device", "cpu",
                     "--splits", str(splits)]) == 1
        err = capsys.readouterr().err
        assert str(splits) in err and message in err and "Traceback" not in err
        assert not (tmp_path / "other").exists()


@pytest.mark.slow
@pytest.mark.skipif(not CHAOS.is_dir(), reason="real data not present")
def test_plan_and_preprocess_real_chaos_thick_slices(tmp_path, capsys):
    """20 abdominal T2 MRIs with 7.7 mm slices: in-plane-first 3d topology, 2d by default on a CPU."""
    from autoseg.plans import select_configuration
    from autoseg.preprocessing.run import preprocess_run

    run = tmp_path / "chaos"
    out, plan = plan_on_cpu(CHAOS, run, capsys)
    assert "20 cases" in out and "default      2d: the 3d zoom-out patch 80x80 in-plane sees 10%" in out
    assert plan.target_spacing == pytest.approx([7.7, 1.25, 1.25])
    assert plan.median_shape_after_resampling == [35, 248, 256]
    assert plan.normalization[0].scheme == "zscore" and not plan.normalization[0].use_mask
    assert plan.network.kernel_sizes[:2] == [[1, 3, 3], [1, 3, 3]] and plan.network.strides[1] == [1, 2, 2]
    assert plan.training.augmentation.dummy_2d  # rotation in-plane only
    two = select_configuration(plan, "2d")
    assert two.stages[1].patch_size == [1, 256, 256] and plan.default_configuration == "2d"
    assert [c.name for c in load_fingerprint_classes(run)] == ["liver", "right_kidney", "left_kidney", "spleen"]
    r = preprocess_run(run, None, progress=False)
    assert len(r.written) == 20
    for case in r.written:  # thick slices are never resampled across: z keeps its 7.7 mm slices
        props = json.loads((run / "preprocessed" / f"{case}.json").read_text())
        assert props["shape_after_resampling"][0] == props["shape_after_crop"][0]
