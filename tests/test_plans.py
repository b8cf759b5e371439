"""plans.json: typed, versioned, validated on load with errors that name the field."""

from __future__ import annotations

import json

import pytest

from autoseg.planning import make_plan
from autoseg.plans import SCHEMA_VERSION, load_plans, save_plans
from autoseg.typedjson import SchemaError

from .planning.fingerprints import PROSTATE, device


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plans.json"
    save_plans(make_plan(PROSTATE, device("cuda", 8)), path)
    return path


def edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_round_trip(plan_file):
    plan = make_plan(PROSTATE, device("cuda", 8))
    assert load_plans(plan_file) == plan
    assert json.loads(plan_file.read_text())["schema_version"] == SCHEMA_VERSION
    assert not [p for p in plan_file.parent.iterdir() if p.name != "plans.json"]  # no temporary left


def test_a_plan_written_before_the_memory_layout_field_loads_contiguous(tmp_path):
    path = tmp_path / "plans.json"
    save_plans(make_plan(PROSTATE, device("cpu", 16)), path)
    assert load_plans(path).network.channels_last is True
    edit(path, lambda d: d["network"].pop("channels_last"))
    assert load_plans(path).network.channels_last is False


@pytest.mark.parametrize("change, field", [
    (lambda d: d["stages"][1].update(batch_size="2"), "stages[1].batch_size: expected an integer"),
    (lambda d: d["stages"][0]["patch_size"].__setitem__(2, 65.5), "stages[0].patch_size[2]: expected an integer"),
    (lambda d: d["network"].update(deep_supervision="yes"), "network.deep_supervision: expected true/false"),
    (lambda d: d.update(target_spacing="1mm"), "target_spacing: expected a list"),
    (lambda d: d["stages"][0].update(optimizer="rmsprop"), "stages[0].optimizer: must be one of"),
    (lambda d: d["stages"][1].update(epoch=3), "stages[1].epoch: unknown key"),
    (lambda d: d.update(colour="blue"), "colour: unknown key"),
    (lambda d: d["inference"].pop("tile_step"), "inference.tile_step: missing"),
    (lambda d: d["stages"][1].update(patch_size=[20, 320, 328]), "not divisible by the network's total stride"),
    (lambda d: d.update(schema_version=99), "schema_version: 99"),
    (lambda d: d["network"]["strides"].pop(), "network.strides: 5 entries"),
    (lambda d: d["normalization"].pop(), "normalization: 1 entries; channel_names has 2"),
    (lambda d: d["folds"][0]["val"].append(d["folds"][0]["train"][0]), "folds[0]: case(s)"),
    (lambda d: d["labels"].update({"x": "bad"}), "labels: key 'x' must be an integer"),
])
def test_hand_edited_plan_errors_name_the_field(plan_file, change, field):
    edit(plan_file, change)
    with pytest.raises(SchemaError) as err:
        load_plans(plan_file)
    assert field in str(err.value)
    assert str(err.value).startswith(str(plan_file))


def test_invalid_json_names_the_line(plan_file):
    plan_file.write_text('{"schema_version": 1,\n  "dataset_name": }')
    with pytest.raises(SchemaError, match=r"line 2"):
        load_plans(plan_file)


def test_save_refuses_invalid_plan(tmp_path):
    plan = make_plan(PROSTATE, device("cpu", 16))
    plan.stages[0].patch_size = [7, 64, 64]
    with pytest.raises(SchemaError, match="not divisible"):
        save_plans(plan, tmp_path / "plans.json")
    assert not list(tmp_path.iterdir())
