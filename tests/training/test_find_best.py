"""find-best: configurations and pairs scored from saved validation probabilities, the choice, ties to the cheaper
prediction, the refusals; and predict following the choice on a really trained run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.inference.choice import CHOICE_FILE, load_choice
from autoseg.plans import load_plans
from autoseg.preprocessing.storage import read_case_arrays
from autoseg.runconfig import model_dir
from autoseg.workflows.findbest import decide_mirroring, decide_whole_volume, find_best
from autoseg.workflows.validate import PROBABILITIES_DIR, VALIDATION_DIR, save_grid_probabilities

from ..inference.test_predict import scans


def _fake_fold(run: Path, config: str, fold: int, weak_class: int | None) -> None:
    """Validation output of a configuration that is exact except on ``weak_class``, where it gives the class 0.4
    and background 0.6 (so alone it misses the class, and averaged with an exact one it finds it)."""
    plans = load_plans(run / "plans.json")
    d = model_dir(run, config) / f"fold_{fold}" / VALIDATION_DIR
    cases = plans.folds[fold].val
    for cid in cases:
        seg = np.asarray(read_case_arrays(run / "preprocessed", cid)[1][:])[0]
        probs = np.stack([(seg == k).astype(np.float32) for k in sorted(plans.labels)])
        if weak_class is not None:
            m = seg == weak_class
            probs[weak_class][m], probs[0][m] = 0.4, 0.6
        save_grid_probabilities(probs, d / PROBABILITIES_DIR / f"{cid}.npz")
    (d / "metrics.json").write_text(json.dumps({"cases": {c: {} for c in cases}}))


def test_pair_that_fixes_each_others_misses_wins(tiny_run):
    _fake_fold(tiny_run, "3d", 0, weak_class=2)
    _fake_fold(tiny_run, "2d", 0, weak_class=1)
    c = find_best(tiny_run, progress=False)
    scores = {" + ".join(s.configurations): s for s in c.candidates}
    assert set(scores) == {"3d", "2d", "3d + 2d"}
    assert scores["3d"].dice == {"organ1": 1.0, "organ2": 0.0}
    assert scores["2d"].dice == {"organ1": 0.0, "organ2": 1.0}
    assert scores["3d + 2d"].dice == {"organ1": 1.0, "organ2": 1.0} and scores["3d + 2d"].hd95_mm == 0.0
    assert c.configurations == ["3d", "2d"] and c.folds == ["fold_0"] and c.n_cases == 2
    assert scores["3d + 2d"].relative_cost == pytest.approx(scores["3d"].relative_cost + scores["2d"].relative_cost)
    assert load_choice(tiny_run) == c


def test_a_tie_goes_to_the_cheaper_prediction(tiny_run):
    _fake_fold(tiny_run, "3d", 0, weak_class=2)
    _fake_fold(tiny_run, "2d", 0, weak_class=None)  # exact: the pair is exact too, and costs more
    c = find_best(tiny_run, progress=False)
    scores = {" + ".join(s.configurations): s for s in c.candidates}
    assert scores["2d"].mean_dice == scores["3d + 2d"].mean_dice == 1.0
    assert c.configurations == ["2d"] and "ties" in c.reason


def test_compares_on_the_folds_every_configuration_validated(tiny_run):
    _fake_fold(tiny_run, "3d", 0, weak_class=2)
    _fake_fold(tiny_run, "3d", 1, weak_class=2)
    _fake_fold(tiny_run, "2d", 1, weak_class=None)
    c = find_best(tiny_run, progress=False)
    assert c.folds == ["fold_1"] and c.n_cases == len(load_plans(tiny_run / "plans.json").folds[1].val)


def _measured_mirroring(run: Path, config: str, fold: int, with_tta: float, without: float | None) -> None:
    """Give a faked fold's metrics.json per-case Dice with mirroring and, unless ``without`` is None (a fold
    validated by an autoseg that did not score it), without."""
    d = model_dir(run, config) / f"fold_{fold}" / VALIDATION_DIR
    m = json.loads((d / "metrics.json").read_text())
    classes = ["organ1", "organ2"]
    m["mirroring"] = True
    m["cases"] = {c: {k: {"dice": with_tta} for k in classes} for c in m["cases"]}
    if without is not None:
        m["without_mirroring"] = {"cases": {c: {k: without for k in classes} for c in m["cases"]}}
    (d / "metrics.json").write_text(json.dumps(m))


@pytest.mark.parametrize("with_tta, without, mirroring, words", [
    (0.90, 0.80, True, "mirroring changed the mean Dice by +0.1000 on 2 cases: kept"),
    (0.9005, 0.90, False, "mirroring changed the mean Dice by +0.0005 on 2 cases, less than 0.001: predicting "
                          "without it"),
    (0.89, 0.90, False, "by -0.0100"),
    (0.90, None, True, "its gain was not measured"),
])
def test_mirroring_is_kept_only_where_validation_measured_a_gain(tiny_run, capsys, with_tta, without, mirroring,
                                                                  words):
    _fake_fold(tiny_run, "3d", 0, weak_class=None)
    _measured_mirroring(tiny_run, "3d", 0, with_tta, without)
    assert main(["find-best", "--run", str(tiny_run), "--no-progress"]) == 0
    c = load_choice(tiny_run)
    assert c is not None and c.mirroring is mirroring and words in c.mirroring_reason
    assert c.mirroring_gain == (None if without is None else pytest.approx(with_tta - without))
    assert f"mirroring    {'on' if mirroring else 'off'}: " in capsys.readouterr().out


def test_decide_mirroring_at_the_threshold():
    from autoseg.defaults import MIRRORING_MIN_GAIN

    assert decide_mirroring(MIRRORING_MIN_GAIN, 5)[0] is True
    assert decide_mirroring(MIRRORING_MIN_GAIN * 0.99, 5)[0] is False
    assert decide_mirroring(None, 5)[0] is True


def test_refusals_name_what_is_missing(tiny_run, capsys):
    assert main(["find-best", "--run", str(tiny_run)]) == 1
    assert "no configuration has a validated fold" in capsys.readouterr().err
    _fake_fold(tiny_run, "3d", 0, weak_class=None)
    _fake_fold(tiny_run, "2d", 1, weak_class=None)
    assert main(["find-best", "--run", str(tiny_run)]) == 1
    assert "no fold is validated in every trained configuration (3d: fold_0; 2d: fold_1)" in capsys.readouterr().err
    _fake_fold(tiny_run, "2d", 0, weak_class=None)
    (tiny_run / "2d" / "fold_0" / VALIDATION_DIR / PROBABILITIES_DIR / "case_004.npz").unlink()
    assert main(["find-best", "--run", str(tiny_run)]) == 1
    err = capsys.readouterr().err
    assert "fold(s) 2d/fold_0 have no saved validation probabilities (2d/fold_0: 1 of 2 cases, e.g. " \
        "validation/probabilities/case_004.npz;" in err
    assert not (tiny_run / CHOICE_FILE).exists()
    assert main(["find-best", "--run", str(tiny_run / "nope")]) == 1
    assert "nope: not a planned run (no plans.json)" in capsys.readouterr().err


def test_predict_follows_the_choice_and_config_overrides_it(tiny_run, tmp_path, capsys):
    for config in ("3d", "2d"):
        assert main(["train", "0", "--run", str(tiny_run), "--config", config, "--epochs", "2",
                     "--iterations-per-epoch", "3", "-j", "0", "--no-progress"]) == 0
        assert (model_dir(tiny_run, config) / "fold_0" / VALIDATION_DIR / PROBABILITIES_DIR / "case_004.npz").is_file()
    capsys.readouterr()
    assert main(["find-best", "--run", str(tiny_run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    choice = load_choice(tiny_run)
    assert choice is not None and f"chosen       {' + '.join(choice.configurations)}" in out
    for s in choice.candidates:  # the single configurations score what their own fold validation scored
        if len(s.configurations) == 1:
            m = json.loads((model_dir(tiny_run, s.configurations[0]) / "fold_0" / VALIDATION_DIR / "metrics.json")
                           .read_text())["mean_per_class"]
            assert s.dice == pytest.approx(m, abs=2e-3)  # probabilities are stored as float16
    src = scans(tmp_path / "in")
    assert main(["predict", "-i", str(src), "-o", str(tmp_path / "a"), "--run", str(tiny_run), "--no-progress"]) == 0
    assert f"predicting with find-best's choice {' + '.join(choice.configurations)}" in capsys.readouterr().out
    # every fold validated with mirroring also scored its cases without: find-best decided from both
    for config in ("3d", "2d"):
        m = json.loads((model_dir(tiny_run, config) / "fold_0" / VALIDATION_DIR / "metrics.json").read_text())
        assert m["mirroring"] is True and set(m["without_mirroring"]["cases"]) == set(m["cases"])
    assert choice.mirroring_gain is not None
    assert main(["predict", "-i", str(src), "-o", str(tmp_path / "b"), "--run", str(tiny_run), "--config", "2d",
                 "--no-progress"]) == 0
    assert "predicting with configuration 2d" in capsys.readouterr().out
    assert len(list((tmp_path / "a").glob("*.nii.gz"))) == len(list((tmp_path / "b").glob("*.nii.gz"))) == 2


def test_predict_mirrors_as_the_choice_decided_unless_told(tiny_run, monkeypatch):
    """A choice without mirroring makes predict's default unmirrored; --tta and --no-tta override it either way;
    without a choice the default mirrors."""
    from autoseg.inference import choice as choice_module
    from autoseg.inference.choice import Choice, predictor_for_run, save_choice
    from autoseg.inference.postprocessing import Postprocessing
    from autoseg.inference.predictor import Predictor

    made = []

    # records the mirroring asked for
    def from_run(cls, run, folds, ckpt, dev, tta, step, config, whole_volume, bfloat16=None):
        made.append(tta)
        return SimpleNamespace(plans=SimpleNamespace(configuration=config or "3d"))

    monkeypatch.setattr(Predictor, "from_run", classmethod(from_run))
    assert predictor_for_run(tiny_run)[1] == "configuration 3d"
    assert made.pop() is True  # no choice: mirror
    save_choice(Choice(["3d"], ["fold_0"], 2, Postprocessing([], {}, {}, 0), [], "best", False, 0.0002,
                       "mirroring changed the mean Dice by +0.0002 on 2 cases, less than 0.001: predicting without it"),
                tiny_run)
    _p, what = predictor_for_run(tiny_run)
    assert made.pop() is False and "without mirroring (mirroring changed the mean Dice by +0.0002" in what
    assert "--tta mirrors" in what
    predictor_for_run(tiny_run, tta=True)
    assert made.pop() is True
    predictor_for_run(tiny_run, tta=False)
    assert made.pop() is False
    assert choice_module.load_choice(tiny_run).mirroring is False


def test_tta_flags_exclude_each_other(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--run", str(tiny_run), "--tta", "--no-tta"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_configuration_ensemble_averages_its_members_probabilities(tiny_run):
    """Each member predicts with its own networks and mirror axes; configurations weigh the same however many
    folds each has; the chosen post-processing is applied."""
    import torch

    from autoseg.inference.choice import ConfigurationEnsemble
    from autoseg.inference.postprocessing import Postprocessing
    from autoseg.inference.predictor import Predictor
    from autoseg.plans import select_configuration

    plans = load_plans(tiny_run / "plans.json")

    def constant(logits: list[float]) -> torch.nn.Module:
        net = torch.nn.Conv3d(1, 3, 1)
        torch.nn.init.zeros_(net.weight)
        with torch.no_grad():
            net.bias.copy_(torch.tensor(logits))
        return net

    a = Predictor(select_configuration(plans, "3d"), [(constant([0.0, 2.0, 0.0]), [8, 8, 8])] * 2,
                  torch.device("cpu"))
    b = Predictor(select_configuration(plans, "2d"), [(constant([0.0, 0.0, 3.0]), [1, 8, 8])], torch.device("cpu"))
    assert b.mirror_axes == [1, 2] and a.mirror_axes == [0, 1, 2]
    pp = Postprocessing([1], {1: 0.5}, {1: 0.6}, 2)
    ens = ConfigurationEnsemble([a, b], pp)
    x = np.zeros((1, 6, 10, 9), np.float32)
    got = ens.predict_preprocessed(x)
    pa, pb = np.exp([0.0, 2.0, 0.0]), np.exp([0.0, 0.0, 3.0])
    want = (pa / pa.sum() + pb / pb.sum()) / 2
    np.testing.assert_allclose(got[:, 3, 4, 5], want, rtol=1e-5)
    assert len(ens.networks) == 3 and ens.plans.configuration == "3d"
    # the post-processing reaches the labels: of class 1's two blobs only the larger stays (spacing 1 mm as
    # planned and no zero voxel to crop, so the preprocessed grid is the scan's)
    data, props = ens.preprocess(np.random.default_rng(0).uniform(1, 2, (1, 6, 10, 9)), spacing=(1.0, 1.0, 1.0))
    assert data.shape == (1, 6, 10, 9)
    probs = np.zeros((3, 6, 10, 9), np.float32)
    probs[0] = 1.0
    for blob in [(slice(0, 2), slice(0, 2), slice(0, 2)), (slice(3, 6), slice(5, 10), slice(4, 9))]:
        probs[(slice(None), *blob)] = np.array([0.0, 1.0, 0.0])[:, None, None, None]
    labels = ens.finish(probs, props).labels
    assert (labels == 1).sum() == 3 * 5 * 5 and (labels[3:, 5:, 4:] == 1).all() and labels[0, 0, 0] == 0
    unprocessed = ConfigurationEnsemble([a, b], None).finish(probs, props).labels
    assert (unprocessed == 1).sum() == 8 + 3 * 5 * 5


@pytest.fixture()
def free_plan(tiny_run) -> Path:
    """tiny_run planned with a patch-free configuration that predicts scans in one pass."""
    data = json.loads((tiny_run / "fingerprint.json").read_text())["dataset_dir"]
    assert main(["plan", data, "-o", str(tiny_run), "--device", "cpu", "--no-progress", "--configs",
                 "3d,patch_free"]) == 0
    return tiny_run


def _measured_one_pass(run: Path, fold: int, one_pass: float, tiles: float | None, mirrored: bool,
                       marker: bool = True, first_only: bool = False) -> None:
    """Give patch_free's faked fold the unmirrored Dice of its one pass (``without_mirroring`` when the fold was
    validated with mirroring, else the main Dice) and, unless ``tiles`` is None, of tiles on the cases that went
    in one pass: every case, or the first only. Without ``marker`` the fold does not say which cases went in one
    pass (an older autoseg)."""
    d = model_dir(run, "patch_free") / f"fold_{fold}" / VALIDATION_DIR
    m = json.loads((d / "metrics.json").read_text())
    classes = ["organ1", "organ2"]
    ids = sorted(m["cases"])[:1] if first_only else sorted(m["cases"])
    m["mirroring"] = mirrored
    m["cases"] = {c: {k: {"dice": 0.99 if mirrored else one_pass} for k in classes} for c in m["cases"]}
    if mirrored:
        m["without_mirroring"] = {"cases": {c: {k: one_pass for k in classes} for c in m["cases"]}}
    if marker:
        m["one_pass_cases"] = ids
    if tiles is not None:
        m["tiled_without_mirroring"] = {"cases": {c: {k: tiles for k in classes} for c in ids}}
    (d / "metrics.json").write_text(json.dumps(m))


@pytest.mark.parametrize("one_pass, tiles, mirrored, whole, words, extra", [
    (0.70, 0.80, True, False, "mean Dice -0.1000 on 2 case(s), tiles better by 0.001 or more: predicting by tiles "
                              "(the candidate scores, the mirroring decision and the post-processing were measured "
                              "on the one pass)", {}),
    (0.70, 0.80, False, False, "predicting by tiles", {}),
    (0.70, 0.80, True, False, "mean Dice -0.1000 on 1 case(s)", {"first_only": True}),
    (0.8, 0.8005, True, True, "mean Dice -0.0005 on 2 case(s): one pass kept", {}),
    (0.85, 0.80, False, True, "+0.0500 on 2 case(s): one pass kept", {}),
    (0.70, None, True, True, "not compared with tiles (patch_free/fold_0 was validated without tiles (its time "
                             "budget))", {}),
    (0.70, 0.80, True, True, "not compared with tiles (patch_free/fold_0 was validated by an older autoseg)",
     {"marker": False}),
])
def test_a_patch_free_choice_predicts_by_tiles_only_where_validation_measured_them_better(
        free_plan, capsys, one_pass, tiles, mirrored, whole, words, extra):
    _fake_fold(free_plan, "3d", 0, weak_class=2)  # worse than patch_free's exact probabilities
    _fake_fold(free_plan, "patch_free", 0, weak_class=None)
    _measured_one_pass(free_plan, 0, one_pass, tiles, mirrored, **extra)
    assert main(["find-best", "--run", str(free_plan), "--no-progress"]) == 0
    c = load_choice(free_plan)
    assert c is not None and c.configurations == ["patch_free"]
    assert c.whole_volume is whole and words in c.whole_volume_reason
    assert c.whole_volume_change == (None if tiles is None or "marker" in extra else pytest.approx(one_pass - tiles))
    assert f"one pass     {'on' if whole else 'off (tiles)'}: " in capsys.readouterr().out


def test_no_case_in_one_pass_leaves_nothing_to_compare(free_plan):
    _fake_fold(free_plan, "3d", 0, weak_class=2)
    _fake_fold(free_plan, "patch_free", 0, weak_class=None)
    d = model_dir(free_plan, "patch_free") / "fold_0" / VALIDATION_DIR
    m = json.loads((d / "metrics.json").read_text())
    (d / "metrics.json").write_text(json.dumps({**m, "one_pass_cases": []}))
    c = find_best(free_plan, progress=False)
    assert c.whole_volume is True and c.whole_volume_change is None
    assert c.whole_volume_reason == "one pass as planned: not compared with tiles (no validation case fitted in one " \
        "pass)"


def test_a_choice_without_patch_free_says_nothing_of_one_pass(free_plan, capsys):
    _fake_fold(free_plan, "3d", 0, weak_class=None)
    _fake_fold(free_plan, "patch_free", 0, weak_class=2)
    assert main(["find-best", "--run", str(free_plan), "--no-progress"]) == 0
    c = load_choice(free_plan)
    assert c is not None and c.configurations == ["3d"]
    assert c.whole_volume is True and c.whole_volume_change is None and c.whole_volume_reason == ""
    assert "one pass  " not in capsys.readouterr().out


def test_decide_whole_volume_at_the_threshold():
    from autoseg.defaults import TILES_MIN_GAIN
    from autoseg.workflows.findbest import OnePassComparison

    assert decide_whole_volume(OnePassComparison(-TILES_MIN_GAIN, 5))[0] is False
    assert decide_whole_volume(OnePassComparison(-TILES_MIN_GAIN * 0.99, 5))[0] is True
    assert decide_whole_volume(OnePassComparison(None, 0, "why"))[0] is True


def test_predict_slides_tiles_as_the_choice_decided_unless_told(tiny_run, monkeypatch):
    """A choice by tiles makes predict's default slide; --one-pass and --tiles override it either way; without a
    choice the plan's one pass stands."""
    from autoseg.inference.choice import Choice, predictor_for_run, save_choice
    from autoseg.inference.postprocessing import Postprocessing
    from autoseg.inference.predictor import Predictor

    made = []

    # records the one pass asked for
    def from_run(cls, run, folds, ckpt, dev, tta, step, config, whole_volume, bfloat16=None):
        made.append(whole_volume)
        return SimpleNamespace(plans=SimpleNamespace(configuration=config or "3d"))

    monkeypatch.setattr(Predictor, "from_run", classmethod(from_run))
    predictor_for_run(tiny_run)
    assert made.pop() is True
    predictor_for_run(tiny_run, whole_volume=False)
    assert made.pop() is False
    save_choice(Choice(["3d"], ["fold_0"], 2, Postprocessing([], {}, {}, 0), [], "best", True, 0.01, "kept",
                       False, -0.05, "tiles better"), tiny_run)
    _p, what = predictor_for_run(tiny_run)
    assert made.pop() is False and "by tiles (tiles better; --one-pass overrides)" in what
    predictor_for_run(tiny_run, whole_volume=True)
    assert made.pop() is True


def test_every_member_of_an_ensemble_choice_gets_the_one_pass_decision(free_plan, monkeypatch):
    """A 3d + patch_free choice by tiles: both members are made with whole_volume False (the 3d network ignores
    it: only a patch-free network planned for whole volumes ever predicts in one pass)."""
    import torch

    from autoseg.inference.choice import Choice, predictor_for_run, save_choice
    from autoseg.inference.postprocessing import Postprocessing
    from autoseg.inference.predictor import Predictor
    from autoseg.plans import select_configuration

    made = {}

    def from_run(cls, run, folds, ckpt, dev, tta, step, config, whole_volume, bfloat16=None):
        made[config] = whole_volume
        return Predictor(select_configuration(load_plans(run / "plans.json"), config),
                         [(torch.nn.Identity(), [8, 8, 8])], torch.device("cpu"), whole_volume=whole_volume)

    monkeypatch.setattr(Predictor, "from_run", classmethod(from_run))
    save_choice(Choice(["3d", "patch_free"], ["fold_0"], 2, Postprocessing([], {}, {}, 0), [], "best", True, 0.01,
                       "kept", False, -0.05, "tiles better"), free_plan)
    ensemble, what = predictor_for_run(free_plan)
    assert made == {"3d": False, "patch_free": False} and "by tiles" in what
    shape = [40, 40, 40]
    assert [m.tile([8, 8, 8], shape) for m in ensemble.members] == [[8, 8, 8], [8, 8, 8]]
    told, _what = predictor_for_run(free_plan, whole_volume=True)
    assert made == {"3d": True, "patch_free": True}
    three_d, free = told.members
    assert three_d.tile([8, 8, 8], shape) == [8, 8, 8] and free.tile([8, 8, 8], shape) != [8, 8, 8]


def test_one_pass_flags_exclude_each_other(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--run", str(tiny_run), "--one-pass",
              "--tiles"])
    assert "not allowed with argument" in capsys.readouterr().err
