"""Training batches: random patches of the preprocessed cases, a share centred on foreground, augmented with
batchgenerators, produced by ``torch.utils.data`` worker processes.

Batch ``i`` of a stage is a pure function of ``(seed, stage, i, rank)``: the same with any number of workers,
after a resume, and on every machine. A failing case does not kill a worker with a bare traceback: the
worker returns the error and the main process raises :class:`BatchError` naming the case.
"""

from __future__ import annotations

import math
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.networks.patchfree import guidance_size
from autoseg.plans import AugmentationPlan, NetworkPlan
from autoseg.preprocessing.storage import read_case_arrays, read_class_locations

__all__ = ["PatchSampler", "BatchDataset", "Guidance", "BatchError", "initial_patch_size", "read_size",
           "build_augmentation", "make_loader", "batch_seed", "with_resume_advice"]


class BatchError(ValueError):
    """Building a training batch failed; the message names the case."""


def with_resume_advice(e: ValueError, stage: str, step: int, run_dir: Path) -> ValueError:
    """``e`` (a batch that could not be built) saying what was kept and how to go on."""
    return type(e)(f"{e}; checkpoint_latest.pt written at {stage} step {step}: run 'autoseg preprocess {run_dir}' "
                   "(it redoes missing or damaged cases), then the same command to continue")


def batch_seed(seed: int, stage: int, index: int, rank: int = 0, purpose: int = 0) -> int:
    """A 32-bit seed unique to one batch (``purpose`` 0 training, 1 validation)."""
    return int(np.random.SeedSequence([seed, stage, index, rank, purpose]).generate_state(1)[0])


def initial_patch_size(patch: list[int], aug: AugmentationPlan) -> list[int]:
    """The region read before augmentation: large enough that rotating (by the plan's maximum angles) and
    scaling the final patch stays on real data (as nnU-Net's ``get_patch_size``, scale margin 1/0.85, except
    that a maximum angle of 45 degrees or more is checked at 45 degrees too, where a square's extent peaks)."""
    corners = np.array(np.meshgrid(*[[-p / 2, p / 2] for p in patch], indexing="ij")).reshape(3, -1)
    extent = np.array(patch, dtype=float)
    if aug.p_rotation > 0:
        for axis, deg in enumerate(aug.rotation_degrees):
            for a in {math.radians(min(deg, 90.0)), math.radians(min(deg, 45.0))}:
                i, j = [k for k in range(3) if k != axis]
                rot = np.eye(3)
                rot[i, i], rot[i, j], rot[j, i], rot[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
                extent = np.maximum(extent, np.ptp(rot @ corners, axis=1))
    if aug.p_scale > 0:
        extent = extent / 0.85
    return [int(math.ceil(e)) for e in extent]


def read_size(patch: list[int], aug: AugmentationPlan, augment: bool) -> list[int]:
    """The region a sample is read at: :func:`initial_patch_size` for training samples (one slice deep for a
    one-slice patch, augmented in 2D), the patch itself for validation samples."""
    if not augment:
        return list(patch)
    size = initial_patch_size(patch, aug)
    if patch[0] == 1:
        size[0] = 1
    return size


def _centre_range(shape: int, patch: int) -> tuple[int, int]:
    """Patch centres (voxels) for which the patch lies inside the volume, or holds it when larger."""
    lo_a, lo_b = sorted((0, shape - patch))
    return lo_a + patch // 2, lo_b + patch // 2


def _read_region(arr: Any, lo: list[int], size: list[int], fill: float) -> np.ndarray:
    """``arr[:, lo:lo+size]`` with ``fill`` wherever the region leaves the array."""
    shape = arr.shape[1:]
    src = tuple(slice(max(a, 0), min(a + s, n)) for a, s, n in zip(lo, size, shape))
    out = np.full((arr.shape[0], *size), fill, dtype=arr.dtype)
    if all(s.stop > s.start for s in src):
        dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))
        out[(slice(None), *dst)] = arr[(slice(None), *src)]
    return out


@dataclass(frozen=True)
class Sample:
    case_id: str
    centre: list[int]
    foreground_class: int | None


class PatchSampler:
    """Chooses patch centres: with probability ``oversample`` on a stored voxel of a random foreground class
    of the case (nnU-Net's probabilistic oversampling; a fixed count per batch would force 50 % at batch 2),
    otherwise uniformly among centres that keep the ``patch`` inside the case."""

    def __init__(self, folder: Path, case_ids: list[str], patch: list[int], oversample: float):
        self.folder, self.case_ids, self.patch, self.oversample = folder, list(case_ids), list(patch), oversample
        self.locations = {c: read_class_locations(folder, c) for c in self.case_ids}
        self._arrays: dict[str, Any] = {}

    def arrays(self, case_id: str) -> Any:
        """The case's (data, seg) blosc2 arrays, opened once per process."""
        if case_id not in self._arrays:
            self._arrays[case_id] = read_case_arrays(self.folder, case_id)
        return self._arrays[case_id]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}  # open files stay in the process that opened them

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.place(self.case_ids[int(rng.integers(len(self.case_ids)))], rng)

    def place(self, case_id: str, rng: np.random.Generator) -> Sample:
        """A patch centre in ``case_id``."""
        shape = self.arrays(case_id)[0].shape[1:]
        ranges = [_centre_range(s, p) for s, p in zip(shape, self.patch)]
        fg = [c for c, v in self.locations[case_id].items() if c > 0 and len(v)]
        if fg and rng.random() < self.oversample:
            cls = fg[int(rng.integers(len(fg)))]
            voxels = self.locations[case_id][cls]
            v = voxels[int(rng.integers(len(voxels)))]
            return Sample(case_id, [int(np.clip(x, a, b)) for x, (a, b) in zip(v, ranges)], cls)
        return Sample(case_id, [int(rng.integers(a, b + 1)) for a, b in ranges], None)

    def read(self, s: Sample, size: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(C, *size)`` and label ``(1, *size)`` centred on ``s.centre``, zero-padded outside."""
        data, seg = self.arrays(s.case_id)
        lo = [c - n // 2 for c, n in zip(s.centre, size)]
        return _read_region(data, lo, size, 0.0), _read_region(seg, lo, size, 0)


@dataclass(frozen=True)
class Guidance:
    """Where the patch-free network's guidance patch goes in each training sample
    (:mod:`autoseg.networks.patchfree`): ``factor`` per axis between the region and the network's
    low-resolution input, ``share`` of the low-resolution region per axis."""

    factor: list[int]
    share: float

    @staticmethod
    def planned(net: NetworkPlan) -> Guidance | None:
        """The guidance of a patch-free network plan; None for any other architecture."""
        return Guidance(net.upsample_factor, net.guidance_share) if net.architecture == "patch_free" else None

    def corners(self, labels: np.ndarray, oversample: float, rng: np.random.Generator) -> np.ndarray:
        """One low-resolution corner per sample of the (augmented) label regions ``(B, *region)``, int64
        ``(B, 3)``: with probability ``oversample`` the patch is centred (as far as it fits) on a voxel of a
        random foreground class present, otherwise placed uniformly."""
        low = [n // f for n, f in zip(labels.shape[1:], self.factor)]
        size = guidance_size(low, self.share)
        room = [n - s for n, s in zip(low, size)]
        out = np.zeros((len(labels), 3), dtype=np.int64)
        for i, lab in enumerate(labels):
            counts = np.bincount(lab.ravel().astype(np.intp))
            classes = [c for c in range(1, len(counts)) if counts[c]]
            if classes and rng.random() < oversample:
                voxels = np.flatnonzero(lab == classes[int(rng.integers(len(classes)))])
                v = np.unravel_index(voxels[int(rng.integers(len(voxels)))], lab.shape)
                out[i] = [min(max(x // f - s // 2, 0), r) for x, f, s, r in zip(v, self.factor, size, room)]
            else:
                out[i] = [int(rng.integers(r + 1)) for r in room]
        return out


def build_augmentation(patch: list[int], aug: AugmentationPlan) -> Any:
    """batchgenerators transforms in nnU-Net's order: spatial (rotation, scaling, centre crop to ``patch``),
    noise, blur, brightness, contrast, low resolution, inverted gamma, gamma, mirroring.

    A patch one slice deep (the 2d configuration) gets 2D transforms, applied to ``(B, C, y, x)``: in-plane
    rotation by up to ``rotation_degrees[0]`` and scaling never blend neighbouring slices."""
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (
        BrightnessMultiplicativeTransform,
        ContrastAugmentationTransform,
        GammaTransform,
    )
    from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
    from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

    rad = [math.radians(d) for d in aug.rotation_degrees]
    flat = patch[0] == 1
    size, mirror = (patch[1:], [a - 1 for a in aug.mirror_axes if a > 0]) if flat else (patch, aug.mirror_axes)
    ts = [
        SpatialTransform(size, patch_center_dist_from_border=None, do_elastic_deform=False,
                         do_rotation=aug.p_rotation > 0, angle_x=(-rad[0], rad[0]), angle_y=(-rad[1], rad[1]),
                         angle_z=(-rad[2], rad[2]), p_rot_per_axis=1, do_scale=aug.p_scale > 0,
                         scale=tuple(aug.scale_range), border_mode_data="constant", border_cval_data=0, order_data=3,
                         border_mode_seg="constant", border_cval_seg=0, order_seg=1, random_crop=False,
                         p_scale_per_sample=aug.p_scale, p_rot_per_sample=aug.p_rotation),
        GaussianNoiseTransform(tuple(aug.noise_variance), p_per_sample=aug.p_noise),
        GaussianBlurTransform(tuple(aug.blur_sigma), different_sigma_per_channel=True, p_per_sample=aug.p_blur,
                              p_per_channel=0.5),
        BrightnessMultiplicativeTransform(tuple(aug.brightness_range), p_per_sample=aug.p_brightness),
        ContrastAugmentationTransform(tuple(aug.contrast_range), p_per_sample=aug.p_contrast),
        SimulateLowResolutionTransform(tuple(aug.low_resolution_zoom), per_channel=True, p_per_channel=0.5,
                                       order_downsample=0, order_upsample=3, p_per_sample=aug.p_low_resolution,
                                       ignore_axes=(0,) if aug.dummy_2d and not flat else None),
        GammaTransform(tuple(aug.gamma_range), True, True, retain_stats=True, p_per_sample=aug.p_gamma_inverted),
        GammaTransform(tuple(aug.gamma_range), False, True, retain_stats=True, p_per_sample=aug.p_gamma),
    ]
    if mirror:
        ts.append(MirrorTransform(tuple(mirror)))
    return Compose(ts)


class BatchDataset(torch.utils.data.Dataset):
    """Item ``i`` is a whole batch: ``{"data": float32 (B, C, *patch), "seg": int16 (B, *patch), "cases": [...]}``,
    or ``{"error": message}`` when a case could not be read or augmented. With ``guidance`` (the patch-free
    configuration), training batches also hold ``"guide"``: int64 ``(B, 3)`` guidance-patch corners
    (:meth:`Guidance.corners`), chosen on the augmented labels, so that the network's low-resolution input, its
    full-resolution patch and the labels all come from one augmented region. When the plan augments on the
    device (``aug.on_device``), training batches are the enlarged regions as read, with ``"aug_seed"``, the
    batch's seed for :class:`~autoseg.training.device_augment.DeviceAugmenter` (guidance is then the trainer's).

    Args:
        augment: training batches (augmented, from an enlarged region); False: validation batches (the
            patch itself, no augmentation).
    """

    def __init__(self, sampler: PatchSampler, batch_size: int, aug: AugmentationPlan, seed: int, stage: int,
                 augment: bool, rank: int = 0, length: int = 2**62, guidance: Guidance | None = None):
        self.sampler, self.batch_size, self.aug, self.guidance = sampler, batch_size, aug, guidance
        self.seed, self.stage, self.augment, self.rank, self.length = seed, stage, augment, rank, length
        self.read_size = read_size(sampler.patch, aug, augment)
        self.flat = sampler.patch[0] == 1  # one slice deep: augmented in 2D
        self._transform: Any = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        s = batch_seed(self.seed, self.stage, index, self.rank, 0 if self.augment else 1)
        rng = np.random.default_rng(s)
        case_id = "?"
        try:
            images, labels, cases = [], [], []
            for _ in range(self.batch_size):
                case_id = self.sampler.case_ids[int(rng.integers(len(self.sampler.case_ids)))]
                smp = self.sampler.place(case_id, rng)
                img, seg = self.sampler.read(smp, self.read_size)
                images.append(img)
                labels.append(seg)
                cases.append(case_id)
            data = np.stack(images).astype(np.float32, copy=False)
            seg = np.stack(labels).astype(np.float32)
            case_id = ",".join(cases)
            on_device = self.augment and self.aug.on_device  # the regions as read: the trainer augments them
            if self.augment and not on_device:
                data, seg = self._augment(data, seg, s)
            if not np.isfinite(data).all():
                raise ValueError("non-finite values in the image patch")
            labels_out = np.rint(seg[:, 0]).astype(np.int16)
            out = {"data": torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
                   "seg": torch.from_numpy(labels_out), "cases": cases}
            if on_device:
                out["aug_seed"] = s
            elif self.guidance is not None and self.augment:
                out["guide"] = torch.from_numpy(self.guidance.corners(labels_out, self.sampler.oversample, rng))
            return out
        except Exception as e:  # reported by the main process with the case id (see module docstring)
            return {"error": f"case {case_id}: {type(e).__name__}: {e}"}

    def _augment(self, data: np.ndarray, seg: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """batchgenerators' augmentation of a batch (:func:`build_augmentation`), seeded by ``seed``."""
        if self._transform is None:
            self._transform = build_augmentation(self.sampler.patch, self.aug)
        np.random.seed(seed)  # batchgenerators draws from numpy's and Python's global generators
        random.seed(seed)
        if self.flat:
            data, seg = data[:, :, 0], seg[:, :, 0]
        out = self._transform(data=data, seg=seg)
        data, seg = out["data"], out["seg"]
        if self.flat:
            data, seg = data[:, :, None], seg[:, :, None]
        return data, seg


def _worker_init(_: int) -> None:
    """One thread per worker; Ctrl-C and SIGTERM are the main process's to handle (it saves a checkpoint,
    then stops the workers): a worker dying of them first would look like a crash."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: BatchDataset, start: int, stop: int, workers: int, pin_memory: bool) -> Any:
    """An iterator over batches ``start..stop-1`` of ``dataset``, built by ``workers`` background processes
    (0: in this process), raising :class:`BatchError` for a failed batch."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, stop), num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=4 if workers else None, worker_init_fn=_worker_init if workers else None,
        persistent_workers=False)
    return _checked(loader)


def _checked(loader: Any) -> Any:
    try:
        for batch in loader:
            if "error" in batch:
                raise BatchError(batch["error"])
            yield batch
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise BatchError(f"a data-loading worker died ({str(e).splitlines()[0]}); it may have run out of memory: "
                         "try fewer workers (-j)") from None
