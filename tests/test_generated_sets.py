"""``autoseg plan`` and ``autoseg preprocess`` end to end on four small generated datasets, checked against numbers
computed by hand from the arrays the tests wrote.

1. CT in Hounsfield units, thick slices, an object touching the image border: dataset-wide CT normalisation
   (foreground 0.5/99.5 percentile clip, foreground mean and std), the border object kept voxel for voxel, and
   in-plane-only first kernels.
2. Two in-plane spacings: the target spacing is the per-axis median and every case is resampled to
   ``round(shape * spacing / target)``.
3. A class present in one case of six: counted in one case by the fingerprint, and sampled by the patch sampler
   there (and only there) on voxels of that class.
4. Four skull-stripped channels with three nested classes: z-score inside the non-zero mask for every channel,
   zero outside it, labels unchanged.

Every dataset is planned and preprocessed once per module (``-j 1``: in this process).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.fingerprint import Fingerprint, load_fingerprint
from autoseg.plans import Plans, load_plans
from autoseg.preprocessing.storage import read_case_arrays, read_properties
from autoseg.training.data import PatchSampler

from .builders import write


@dataclass
class GeneratedSet:
    """A written dataset, its planned and preprocessed run, and the arrays that were written (z, y, x)."""

    data: Path
    run: Path
    images: dict[str, np.ndarray]  # case id -> (C, z, y, x) as written
    labels: dict[str, np.ndarray]  # case id -> (z, y, x)
    spacings_xyz: dict[str, tuple[float, float, float]]
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # case id -> (z, y, x) body mask, if any

    @property
    def plans(self) -> Plans:
        return load_plans(self.run / "plans.json")

    @property
    def fingerprint(self) -> Fingerprint:
        return load_fingerprint(self.run / "fingerprint.json")

    @property
    def preprocessed(self) -> Path:
        return self.run / "preprocessed"

    def stored(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The preprocessed ``(data (C, z, y, x), seg (z, y, x))`` of a case, decompressed."""
        data, seg = read_case_arrays(self.preprocessed, case_id)
        return np.asarray(data[:]), np.asarray(seg[:])[0]


def write_dataset(root: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                  spacings_xyz: dict[str, tuple[float, float, float]], channel_names: list[str],
                  label_names: dict[str, int]) -> Path:
    """Write cases in the nnU-Net v2 layout (one file per channel) with a dataset.json; returns ``root``."""
    for cid, image in images.items():
        for c, channel in enumerate(image):
            write(root / "imagesTr" / f"{cid}_{c:04d}.nii.gz", channel, spacing=spacings_xyz[cid])
        write(root / "labelsTr" / f"{cid}.nii.gz", labels[cid], spacing=spacings_xyz[cid])
    meta = {"name": root.name, "channel_names": {str(c): n for c, n in enumerate(channel_names)},
            "labels": label_names, "numTraining": len(images), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def plan_and_preprocess(data: Path, run: Path) -> None:
    """The two CLI steps, on the CPU, in this process."""
    assert main(["plan", str(data), "-o", str(run), "--device", "cpu", "--folds", "2", "--no-progress",
                 "-j", "1"]) == 0
    assert main(["preprocess", str(run), "--no-progress", "-j", "1"]) == 0


def build_set(tmp_path_factory, name: str, images, labels, spacings_xyz, channel_names, label_names) -> GeneratedSet:
    base = tmp_path_factory.mktemp(name)
    data = write_dataset(base / name, images, labels, spacings_xyz, channel_names, label_names)
    run = base / "run"
    plan_and_preprocess(data, run)
    return GeneratedSet(data, run, images, labels, spacings_xyz)


def ellipsoid(shape: tuple[int, int, int], centre, radii) -> np.ndarray:
    """Boolean ellipsoid, centre and radii in voxels (z, y, x)."""
    grid = np.indices(shape, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64)[:, None, None, None]
    r = np.asarray(radii, dtype=np.float64)[:, None, None, None]
    return (((grid - c) / r) ** 2).sum(0) <= 1


def bbox_of(mask: np.ndarray) -> list[list[int]]:
    """``[[z0, z1], [y0, y1], [x0, x1]]`` (end exclusive) of the True voxels."""
    hit = np.argwhere(mask)
    return [[int(a), int(b) + 1] for a, b in zip(hit.min(0), hit.max(0))]


# ---------------------------------------------------------------------------------------------------- 1. CT

CT_SHAPE = (12, 40, 40)
CT_SPACING = (0.8, 0.8, 5.0)  # x, y, z


def ct_case(i: int) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU: air around a body cylinder of soft tissue; label 1 a slab at the x = 0 border through every
    slice (enhancing tissue with a few calcifications and dark voxels, so that the percentile clip bites)."""
    rng = np.random.default_rng(100 + i)
    z, y, x = CT_SHAPE
    yy, xx = np.mgrid[:y, :x]
    body = np.broadcast_to(((yy - 20) / 19.5) ** 2 + ((xx - 20) / 30) ** 2 <= 1, CT_SHAPE)
    image = rng.normal(-1000, 8, CT_SHAPE)
    image[body] = rng.normal(30, 15, int(body.sum()))
    label = np.zeros(CT_SHAPE, np.uint8)
    label[:, 12 + i: 24 + i, 0: 6 + i] = 1
    fg = label == 1
    image[fg] = rng.normal(90, 20, int(fg.sum()))
    spots = np.argwhere(fg)[rng.choice(int(fg.sum()), 12, replace=False)]
    image[tuple(spots[:6].T)] = rng.uniform(900, 1500, 6)
    image[tuple(spots[6:].T)] = rng.uniform(-400, -200, 6)
    return np.rint(image).astype(np.int16)[None], label


@pytest.fixture(scope="module")
def ct_set(tmp_path_factory) -> GeneratedSet:
    cases = {f"ct{i}": ct_case(i) for i in range(6)}
    return build_set(tmp_path_factory, "CTBorder", {k: v[0] for k, v in cases.items()},
                     {k: v[1] for k, v in cases.items()}, dict.fromkeys(cases, CT_SPACING), ["CT"],
                     {"background": 0, "lesion": 1})


def ct_foreground(s: GeneratedSet) -> np.ndarray:
    """Every foreground voxel of every case, as float32 (what the fingerprint reads)."""
    return np.concatenate([s.images[c][0][s.labels[c] > 0] for c in s.images]).astype(np.float32)


def test_ct_normalisation_uses_foreground_percentiles_mean_and_std(ct_set):
    fg = ct_foreground(ct_set)
    lo, hi = np.percentile(fg, [0.5, 99.5])
    (norm,) = ct_set.plans.normalization
    assert norm.channel == "CT" and norm.scheme == "ct" and not norm.use_mask
    assert norm.clip == pytest.approx([lo, hi], rel=1e-6)
    assert norm.mean == pytest.approx(fg.astype(np.float64).mean(), rel=1e-6)
    assert norm.std == pytest.approx(fg.astype(np.float64).std(), rel=1e-6)
    # the clip is inside the written range: the calcifications and dark voxels are really clipped
    assert fg.min() < lo < hi < fg.max()


def test_ct_stored_intensities_are_clipped_then_standardised_with_dataset_values(ct_set):
    (norm,) = ct_set.plans.normalization
    for cid, image in ct_set.images.items():
        data, _ = ct_set.stored(cid)
        expected = (np.clip(image[0].astype(np.float32), *norm.clip) - norm.mean) / norm.std
        np.testing.assert_allclose(data[0], expected, rtol=0, atol=1e-5)


def test_ct_thick_slices_keep_target_spacing_and_get_in_plane_first_kernels(ct_set):
    plans = ct_set.plans
    # 5 mm > 3 x 0.8 mm and 12 slices x 3 < 40 voxels: nnU-Net's rule keeps the 10th percentile (5 mm) for z
    assert plans.target_spacing == pytest.approx([5.0, 0.8, 0.8], rel=1e-6)
    assert plans.network.kernel_sizes[0] == [1, 3, 3]
    assert plans.network.strides[1][0] == 1  # z is not pooled before the in-plane spacing reaches it


def test_ct_border_object_survives_preprocessing_voxel_for_voxel(ct_set):
    for cid, label in ct_set.labels.items():
        props = read_properties(ct_set.preprocessed, cid)
        assert props.bbox == [[0, 12], [0, 40], [0, 40]]  # air is -1000 HU, not 0: nothing is cropped
        assert props.shape_after_resampling == list(CT_SHAPE)
        _, seg = ct_set.stored(cid)
        assert int((seg == 1).sum()) == int((label == 1).sum())
        np.testing.assert_array_equal(seg, label)
        assert (seg[:, :, 0] == 1).any()  # still touching the border


# ---------------------------------------------------------------------------------------- 2. mixed spacings

MIXED_SHAPE = (10, 36, 44)
FINE, COARSE = (0.7, 0.75, 2.5), (1.0, 1.05, 2.5)  # x, y, z


def mixed_case(i: int) -> tuple[np.ndarray, np.ndarray]:
    """No zero voxel (nothing to crop); one ellipsoid of class 1 in the middle."""
    rng = np.random.default_rng(200 + i)
    label = ellipsoid(MIXED_SHAPE, (4.5, 17.5, 21.5), (3.5, 9, 11)).astype(np.uint8)
    image = rng.normal(50, 5, MIXED_SHAPE).astype(np.float32) + 40 * label
    return image[None], label


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory) -> GeneratedSet:
    cases = {f"m{i}": mixed_case(i) for i in range(6)}
    spacings = {cid: FINE if i < 3 else COARSE for i, cid in enumerate(cases)}
    return build_set(tmp_path_factory, "MixedSpacing", {k: v[0] for k, v in cases.items()},
                     {k: v[1] for k, v in cases.items()}, spacings, ["MRI"], {"background": 0, "organ": 1})


def test_mixed_spacings_target_is_the_per_axis_median(mixed_set):
    # z: all 2.5; y: median of three 0.75 and three 1.05 = 0.9; x: of three 0.7 and three 1.0 = 0.85.
    # 2.5 mm is not over 3 x 0.9 mm, so the anisotropy rule does not apply.
    assert mixed_set.fingerprint.median_spacing == pytest.approx([2.5, 0.9, 0.85], rel=1e-6)
    assert mixed_set.plans.target_spacing == pytest.approx([2.5, 0.9, 0.85], rel=1e-6)


def test_mixed_spacings_cases_are_resampled_to_rounded_physical_size(mixed_set):
    # fine:   y 36 * 0.75 / 0.9 = 30.0, x 44 * 0.7 / 0.85 = 36.2 -> [10, 30, 36]
    # coarse: y 36 * 1.05 / 0.9 = 42.0, x 44 * 1.0 / 0.85 = 51.8 -> [10, 42, 52]
    target = mixed_set.plans.target_spacing
    for cid, (x, y, z) in mixed_set.spacings_xyz.items():
        expected = [10, 30, 36] if (x, y, z) == FINE else [10, 42, 52]
        by_formula = [int(round(n * s / t)) for n, s, t in zip(MIXED_SHAPE, (z, y, x), target)]
        assert by_formula == expected
        data, seg = mixed_set.stored(cid)
        assert list(data.shape) == [1, *expected] and list(seg.shape) == expected
        assert read_properties(mixed_set.preprocessed, cid).shape_after_resampling == expected


def test_mixed_spacings_resampling_keeps_the_organ_volume_in_mm3(mixed_set):
    voxel_mm3 = float(np.prod(mixed_set.plans.target_spacing))
    for cid, label in mixed_set.labels.items():
        before = int(label.sum()) * float(np.prod(mixed_set.spacings_xyz[cid]))
        _, seg = mixed_set.stored(cid)
        assert int((seg == 1).sum()) * voxel_mm3 == pytest.approx(before, rel=0.05), cid


# ------------------------------------------------------------------------------------------- 3. rare class

RARE_SHAPE = (12, 40, 40)
RARE_CASE = "r3"
RARE_BOX = (slice(5, 8), slice(18, 24), slice(20, 26))  # class 2 in RARE_CASE only: 3 * 6 * 6 = 108 voxels


def rare_case(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(300 + i)
    label = np.zeros(RARE_SHAPE, np.uint8)
    label[2:6, 5 + i: 15 + i, 6:16] = 1
    if f"r{i}" == RARE_CASE:
        label[RARE_BOX] = 2
    image = rng.normal(100, 10, RARE_SHAPE).astype(np.float32) + 30 * label
    return image[None], label


@pytest.fixture(scope="module")
def rare_set(tmp_path_factory) -> GeneratedSet:
    cases = {f"r{i}": rare_case(i) for i in range(6)}
    return build_set(tmp_path_factory, "RareClass", {k: v[0] for k, v in cases.items()},
                     {k: v[1] for k, v in cases.items()}, dict.fromkeys(cases, (1.0, 1.0, 1.0)), ["MRI"],
                     {"background": 0, "common": 1, "rare": 2})


def test_rare_class_is_counted_in_exactly_one_case(rare_set):
    fp = rare_set.fingerprint
    rare = next(c for c in fp.classes if c.value == 2)
    assert (rare.cases_present, rare.total_voxels, rare.median_voxels) == (1, 108, 0.0)
    assert {c.case_id: c.class_voxels[2] for c in fp.cases} == {f"r{i}": 108 if f"r{i}" == RARE_CASE else 0
                                                                for i in range(6)}
    common = next(c for c in fp.classes if c.value == 1)
    assert common.cases_present == 6


def test_rare_class_centres_lie_on_rare_voxels_and_only_in_its_case(rare_set):
    case_ids = sorted(rare_set.images)
    sampler = PatchSampler(rare_set.preprocessed, case_ids, [4, 8, 8], oversample=1.0)
    segs = {cid: rare_set.stored(cid)[1] for cid in case_ids}
    rng = np.random.default_rng(0)
    samples = [sampler.sample(rng) for _ in range(600)]
    assert all(s.foreground_class in (1, 2) for s in samples)  # oversample 1: always on foreground
    rare = [s for s in samples if s.foreground_class == 2]
    assert len(rare) > 20
    assert {s.case_id for s in rare} == {RARE_CASE}
    for s in rare:  # a 4x8x8 patch centred in the rare box stays inside the case: the centre is not moved
        assert segs[s.case_id][tuple(s.centre)] == 2, s
    for s in samples:
        if s.foreground_class == 1:
            assert segs[s.case_id][tuple(s.centre)] == 1, s
    for cid in case_ids:
        if cid != RARE_CASE:
            assert 2 not in sampler.locations[cid]
            assert all(sampler.place(cid, rng).foreground_class == 1 for _ in range(50))
    # in the rare case the two classes are drawn about equally often
    share = np.mean([sampler.place(RARE_CASE, rng).foreground_class == 2 for _ in range(400)])
    assert 0.4 < share < 0.6


def test_rare_class_patches_of_the_planned_size_contain_it(rare_set):
    """With the planned patch (about the whole case) the centre is clipped so the patch stays inside the
    case; the rare voxel it was drawn for must still be in the patch."""
    patch = rare_set.plans.stages[-1].patch_size
    sampler = PatchSampler(rare_set.preprocessed, [RARE_CASE], patch, oversample=1.0)
    rng = np.random.default_rng(1)
    rare = [s for s in (sampler.sample(rng) for _ in range(100)) if s.foreground_class == 2]
    assert rare
    for s in rare:
        _, seg = sampler.read(s, patch)
        assert (seg == 2).any(), s


# ------------------------------------------------------------------------------- 4. skull-stripped multi-MRI

BRAIN_SHAPE = (16, 40, 40)
N_CHANNELS = 4


def brain_case(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four channels, zero outside an ellipsoid brain; classes 3 > 2 > 1 nested ellipsoids inside it.
    Channel 3 also reads zero in a small slab inside the brain (the mask is non-zero in *any* channel).

    Returns ``(image, label, brain)``."""
    rng = np.random.default_rng(400 + i)
    centre = np.array([7.5, 19.5 + i % 3, 19.5 - i % 2])
    brain = ellipsoid(BRAIN_SHAPE, centre, (6, 14, 16))
    label = np.zeros(BRAIN_SHAPE, np.uint8)
    for k, scale in ((3, 0.6), (2, 0.4), (1, 0.2)):
        label[ellipsoid(BRAIN_SHAPE, centre + [0, 1, -1], (6 * scale + 0.5, 14 * scale, 16 * scale))] = k
    assert not (label > 0)[~brain].any()
    image = np.zeros((N_CHANNELS, *BRAIN_SHAPE), np.float32)
    for c in range(N_CHANNELS):
        values = 200.0 * (c + 1) + rng.normal(0, 10 + 5 * c, BRAIN_SHAPE) + (c + 1) * 25.0 * label
        image[c][brain] = values[brain]
    dropout = brain.copy()
    dropout[:, :, 12:] = False
    dropout[:6] = False
    image[3][dropout] = 0
    return image, label, brain


@pytest.fixture(scope="module")
def brain_set(tmp_path_factory) -> GeneratedSet:
    cases = {f"b{i}": brain_case(i) for i in range(6)}
    s = build_set(tmp_path_factory, "BrainMRI", {k: v[0] for k, v in cases.items()},
                  {k: v[1] for k, v in cases.items()}, dict.fromkeys(cases, (1.0, 1.0, 1.0)),
                  ["T1", "T1ce", "T2", "FLAIR"], {"background": 0, "core": 1, "enhancing": 2, "edema": 3})
    s.masks = {k: v[2] for k, v in cases.items()}
    return s


def test_brain_channels_are_zscored_inside_the_mask(brain_set):
    fp, plans = brain_set.fingerprint, brain_set.plans
    brains = brain_set.masks
    assert all(brains[c].mean() < 0.6 for c in brains)
    ratios = [np.prod(np.diff(bbox_of(b)).ravel()) / np.prod(BRAIN_SHAPE) for b in brains.values()]
    assert fp.median_relative_size_after_crop == pytest.approx(float(np.median(ratios)), rel=1e-9)
    assert fp.median_relative_size_after_crop < 0.75
    assert [(n.channel, n.scheme, n.use_mask) for n in plans.normalization] == [
        (name, "zscore", True) for name in ("T1", "T1ce", "T2", "FLAIR")]


def test_brain_stored_channels_have_zero_mean_unit_std_in_mask_and_zero_outside(brain_set):
    for cid, image in brain_set.images.items():
        brain = brain_set.masks[cid]
        box = bbox_of(brain)
        props = read_properties(brain_set.preprocessed, cid)
        assert props.bbox == box
        crop = tuple(slice(a, b) for a, b in box)
        mask = brain[crop]
        data, _ = brain_set.stored(cid)
        assert data.shape == (N_CHANNELS, *mask.shape)
        for c in range(N_CHANNELS):
            x = image[c][crop]
            inside = x[mask].astype(np.float64)
            expected = (x.astype(np.float32) - inside.mean()) / inside.std()
            np.testing.assert_allclose(data[c][mask], expected[mask], rtol=0, atol=1e-5)
            assert abs(data[c][mask].astype(np.float64).mean()) < 1e-5
            assert data[c][mask].astype(np.float64).std() == pytest.approx(1.0, abs=1e-5)
            assert (data[c][~mask] == 0).all()
        # channel 3's zeros inside the brain are in the mask (other channels are non-zero there): standardised
        dropout = (image[3][crop] == 0) & mask
        assert dropout.any() and (data[3][dropout] < -1).all()


def test_brain_nested_labels_are_stored_as_written(brain_set):
    for cid, label in brain_set.labels.items():
        crop = tuple(slice(a, b) for a, b in bbox_of(brain_set.masks[cid]))
        _, seg = brain_set.stored(cid)
        np.testing.assert_array_equal(seg, label[crop])
        inner = [np.isin(seg, list(range(1, k + 1))) for k in (1, 2, 3)]
        assert all(inner[k].sum() > 0 for k in range(3))
        assert not (inner[0] & ~inner[1]).any() and not (inner[1] & ~inner[2]).any()
        assert not (seg > 0)[~brain_set.masks[cid][crop]].any()
