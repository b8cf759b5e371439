"""Finding cases in MSD and nnU-Net v2 layouts and reading dataset.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.dataset import DatasetError, load_dataset
from autoseg.demo import make_synthetic_dataset

from .builders import good_case, nnunet_dataset, write


def test_nnunet_layout(tmp_path):
    spec = load_dataset(nnunet_dataset(tmp_path / "d", n_cases=3, n_channels=2))
    assert spec.layout == "nnunet" and spec.channel_names == ["ch0", "ch1"]
    assert spec.labels == {0: "background", 1: "a", 2: "b"}
    assert [c.case_id for c in spec.cases] == ["c0", "c1", "c2"]
    assert [p.name for p in spec.cases[1].images] == ["c1_0000.nii.gz", "c1_0001.nii.gz"]
    assert spec.problems == []


def test_msd_layout_with_4d_images(tmp_path):
    root = make_synthetic_dataset(tmp_path / "msd", n_cases=3, layout="msd", n_channels=2, shape=(6, 8, 7))
    spec = load_dataset(root)
    meta = json.loads((root / "dataset.json").read_text())
    assert "modality" in meta and "channel_names" not in meta and meta["labels"]["0"] == "background"
    assert spec.layout == "msd" and spec.channel_names == ["MRI0", "MRI1"]
    assert spec.labels == {0: "background", 1: "organ1", 2: "organ2"}
    assert [len(c.images) for c in spec.cases] == [1, 1, 1]


def test_hidden_files_ignored_and_image_without_label_reported(tmp_path):
    root = nnunet_dataset(tmp_path / "d", n_cases=2)
    (root / "imagesTr" / "._c0_0000.nii.gz").write_bytes(b"macOS resource fork")
    image, _ = good_case()
    write(root / "imagesTr" / "orphan_0000.nii.gz", image)
    spec = load_dataset(root)
    assert [c.case_id for c in spec.cases] == ["c0", "c1"]
    assert len(spec.problems) == 1 and "orphan_0000.nii.gz: image has no matching label" in spec.problems[0]
    assert "labelsTr/orphan.nii.gz" in spec.problems[0]


def test_num_training_mismatch(tmp_path):
    root = nnunet_dataset(tmp_path / "d", n_cases=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["numTraining"] = 5
    (root / "dataset.json").write_text(json.dumps(meta))
    assert load_dataset(root).problems == [f"{root / 'dataset.json'}: numTraining is 5 but 2 cases were found"]


@pytest.mark.parametrize("content, message", [
    (None, "dataset.json: missing"),
    ("{not json", "not valid JSON"),
    ('{"channel_names": {"0": "CT"}, "labels": {"a": 1}}', r"has no background \(value 0\)"),
    ('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": [1, 2]}}', "region"),
    ('{"labels": {"background": 0}}', "needs 'channel_names'"),
    ('{"channel_names": {"0": "CT", "2": "PET"}, "labels": {"background": 0}}', "channel keys must be 0..1"),
    ('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": -1}}', "label 'x' has value -1; label values "
                                                                           "must be 0 or more"),
    ('{"channel_names": {"0000": "CT"}, "labels": {"background": 0}}', "without leading zeros or spaces"),
    ('{"channel_names": {" 0": "CT"}, "labels": {"background": 0}}', "without leading zeros or spaces"),
    ('{"channel_names": {"one": "CT"}, "labels": {"background": 0}}', "without leading zeros or spaces"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_dataset_json(tmp_path, content, message):
    root = tmp_path / "d"
    root.mkdir()
    if content is not None:
        (root / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(root)


def test_missing_folder_and_empty_dataset(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder does not exist"):
        load_dataset(tmp_path / "nope")
    root = tmp_path / "empty"
    (root / "imagesTr").mkdir(parents=True)
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}}')
    assert "no training cases found" in load_dataset(root).problems[0]


def test_other_file_types(tmp_path):
    root = tmp_path / "d"
    image, label = good_case()
    write(root / "imagesTr" / "a_0000.nrrd", image)
    write(root / "labelsTr" / "a.nrrd", label)
    write(root / "imagesTr" / "b_0000.mha", image)  # mixed endings: found through file_ending per label
    write(root / "labelsTr" / "b.mha", label)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0,
                                                   "a": 1, "b": 2}}))
    spec = load_dataset(root)
    assert [c.case_id for c in spec.cases] == ["a", "b"]
    assert spec.cases[0].images[0].name == "a_0000.nrrd"
    assert np.all([p.exists() for c in spec.cases for p in c.images])


@pytest.mark.parametrize("entry", [{"image": 1, "label": "./labelsTr/a.nii.gz"}, {"image": "./imagesTr/a.nii.gz",
                                                                                  "label": None},
                                   {"image": ["./imagesTr/a.nii.gz"], "label": "./labelsTr/a.nii.gz"}])
def test_an_msd_training_entry_that_is_not_a_path_is_a_problem_not_a_crash(tmp_path, entry):
    root = make_synthetic_dataset(tmp_path / "msd", n_cases=2, layout="msd", shape=(6, 8, 7))
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append(entry)
    (root / "dataset.json").write_text(json.dumps(meta))
    spec = load_dataset(root)
    assert len(spec.cases) == 2
    assert any("'image' and 'label' must be paths (strings)" in p and repr(entry) in p for p in spec.problems), \
        spec.problems
