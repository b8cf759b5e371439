"""The training augmentation of :func:`autoseg.training.data.build_augmentation`, written in torch and run on the
training device (the GPU, or the CPU process that trains), for plans whose ``augmentation.on_device`` is set
(planned for every device: :data:`autoseg.defaults.AUGMENT_ON_DEVICE`).

A data worker then only reads the enlarged region of each sample (:func:`~autoseg.training.data.initial_patch_size`);
rotating, scaling and cropping it to the patch, and the intensity transforms, run here on the batch: on a GPU's
parallel hardware instead of one CPU thread per worker (which takes ~14 s for one sample of a large 4-channel GPU
patch: docs/training.md, "Feeding a GPU"), on a CPU on the training process's threads, 5.5-11x faster per
sample than batchgenerators in a worker. The transforms, their order,
probabilities and ranges are batchgenerators' as planned (nnU-Net v2's), drawn from one generator per batch
(seeded by the batch, so a resumed run augments as an uninterrupted one would). What differs, by necessity of
torch's samplers: images are interpolated linearly (3D) or bicubically (2D) where batchgenerators uses cubic
splines, both when rotating/scaling and when simulating low resolution. Labels are interpolated as
batchgenerators does (each label's mask linearly, kept where it reaches 0.5, labels in increasing order).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from autoseg.plans import AugmentationPlan
from autoseg.training.data import Guidance

__all__ = ["DeviceAugmenter", "batch_tensors", "rotation_matrix", "gaussian_blur", "spatial_sample"]

#: batchgenerators' gamma transform divides by the intensity range plus this
_GAMMA_EPS = 1e-7


def rotation_matrix(angles: list[float]) -> np.ndarray:
    """batchgenerators' rotation of zero-centred voxel coordinates: in 3D, ``angles`` about array axes 0, 1, 2,
    composed as ``Rx @ Ry @ Rz``; in 2D one angle. A coordinate ``c`` (array axis order) goes to ``M @ c`` with
    the returned ``M`` (the transpose of the composed matrix, as batchgenerators right-multiplies rows)."""
    if len(angles) == 1:
        (a,) = angles
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        return rot.T
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return (rx @ ry @ rz).T


def _grid(matrix: np.ndarray, out_size: list[int], in_size: list[int], device: torch.device) -> torch.Tensor:
    """grid_sample's grid ``(1, *out_size, dims)``: output voxel ``o`` reads input voxel
    ``matrix @ (o - (out - 1) / 2) + (in - 1) / 2`` (batchgenerators' centre), normalised with align_corners."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2 for n in out_size]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*out, dims), array axis order
    m = torch.as_tensor(matrix, dtype=torch.float32, device=device)
    src = coords @ m.T
    scale = torch.tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in in_size], device=device)
    src = src * scale  # centred at the input's centre: already normalised to [-1, 1] around it
    return src.flip(-1)[None]  # grid_sample wants (x, y[, z]): the last array axis first


def spatial_sample(data: torch.Tensor, seg: torch.Tensor, matrix: np.ndarray | None,
                   patch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample ``data (C, *region)``, ``seg (*region)`` int to ``patch``: the centre crop when ``matrix`` is
    None (batchgenerators' lower bound ``(region - patch) // 2``), else resampled through ``matrix`` about the
    region's centre, zero past the region's outermost voxel centres (as scipy's ``mode='constant'``); labels
    mask by mask, each kept where its interpolated mask reaches 0.5."""
    region = list(data.shape[1:])
    if matrix is None:
        lo = [(r - p) // 2 for r, p in zip(region, patch)]
        sl = tuple(slice(a, a + p) for a, p in zip(lo, patch))
        return data[(slice(None), *sl)], seg[sl]
    grid = _grid(matrix, patch, region, data.device)
    inside = (grid.abs() <= 1).all(-1)[0]  # as scipy's "constant": zero wherever the input's extent ends
    mode = "bicubic" if len(patch) == 2 else "bilinear"
    out = F.grid_sample(data[None], grid, mode=mode, padding_mode="border", align_corners=True)[0] * inside
    labels = torch.zeros(patch, dtype=seg.dtype, device=seg.device)
    for c in torch.unique(seg).tolist():
        if c == 0:
            continue  # the result starts as background
        mask = F.grid_sample((seg == c).float()[None, None], grid, mode="bilinear", padding_mode="border",
                             align_corners=True)[0, 0]
        labels[(mask >= 0.5) & inside] = c
    return out, labels


def _reflect_index(n: int, r: int, device: torch.device) -> torch.Tensor:
    """Indices of an axis of length ``n`` padded by ``r`` on each side as scipy's ``mode='reflect'``
    (``d c b a | a b c d | d c b a``), for any ``r``."""
    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` (spatial dims only) filtered as ``scipy.ndimage.gaussian_filter(x, sigma)`` (truncate 4, reflect)."""
    r = int(4.0 * sigma + 0.5)
    if r == 0:
        return x
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    out = x
    for axis in range(x.ndim):
        n = out.shape[axis]
        padded = out.index_select(axis, _reflect_index(n, r, x.device))
        moved = padded.movedim(axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        filtered = F.conv1d(flat, k.view(1, 1, -1)).reshape(*moved.shape[:-1], n)
        out = filtered.movedim(-1, axis)
    return out.contiguous()


def _uniform(rng: np.random.Generator, bounds: list[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _two_sided(rng: np.random.Generator, bounds: list[float]) -> float:
    """batchgenerators' draw for contrast, gamma and scale: below 1 or above 1 with even odds."""
    lo, hi = bounds
    if rng.random() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1))
    return float(rng.uniform(max(lo, 1), hi))


class DeviceAugmenter:
    """Augments batches of enlarged regions to ``patch`` on their own device.

    Args:
        patch: the stage's patch ``(z, y, x)``; one slice deep: the 2d configuration, augmented in 2D.
        aug: the plan's augmentation.
    """

    def __init__(self, patch: list[int], aug: AugmentationPlan):
        self.aug = aug
        self.flat = patch[0] == 1
        self.patch = list(patch[1:]) if self.flat else list(patch)
        self.mirror = [a - 1 for a in aug.mirror_axes if a > 0] if self.flat else list(aug.mirror_axes)
        self.low_res_fixed = [0] if aug.dummy_2d and not self.flat else []

    @classmethod
    def planned(cls, patch: list[int], aug: AugmentationPlan) -> DeviceAugmenter | None:
        """The augmenter of a stage whose plan augments on the training device, else None."""
        return cls(patch, aug) if aug.on_device else None

    def __call__(self, data: torch.Tensor, seg: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``data (B, C, *region)`` float, ``seg (B, *region)`` int → ``(B, C, *patch)``, ``(B, *patch)``."""
        rng = np.random.default_rng(seed)
        gen = torch.Generator(device=data.device)
        gen.manual_seed(int(rng.integers(2**62)))
        if self.flat:
            data, seg = data[:, :, 0], seg[:, 0]
        images, labels = [], []
        for b in range(data.shape[0]):
            x, y = spatial_sample(data[b], seg[b], self._draw_matrix(rng), self.patch)
            x = self._intensity(x.clone(), rng, gen)
            x, y = self._mirror(x, y, rng)
            images.append(x)
            labels.append(y)
        out_x, out_y = torch.stack(images), torch.stack(labels)
        if self.flat:
            out_x, out_y = out_x[:, :, None], out_y[:, None]
        return out_x.contiguous(), out_y.contiguous()

    def _draw_matrix(self, rng: np.random.Generator) -> np.ndarray | None:
        """The sample's rotation and scaling (None: neither drawn), in batchgenerators' order of draws."""
        a = self.aug
        dims = len(self.patch)
        matrix = None
        if a.p_rotation > 0 and rng.random() < a.p_rotation:
            limits = [math.radians(d) for d in a.rotation_degrees][:1 if dims == 2 else 3]
            matrix = rotation_matrix([float(rng.uniform(-lim, lim)) for lim in limits])
        if a.p_scale > 0 and rng.random() < a.p_scale:
            s = _two_sided(rng, a.scale_range)
            matrix = (np.eye(dims) if matrix is None else matrix) * s
        return matrix

    def _intensity(self, x: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        """Noise, blur, brightness, contrast, low resolution, inverted gamma, gamma on one sample ``(C, *patch)``."""
        a = self.aug
        if rng.random() < a.p_noise:
            std = a.noise_variance[0] if a.noise_variance[0] == a.noise_variance[1] else \
                _uniform(rng, a.noise_variance)  # batchgenerators draws the "variance" and uses it as std
            x = x + torch.randn(x.shape, generator=gen, device=x.device) * std
        if rng.random() < a.p_blur:
            for c in range(x.shape[0]):
                if rng.random() <= 0.5:
                    x[c] = gaussian_blur(x[c], _uniform(rng, a.blur_sigma))
        if rng.random() < a.p_brightness:
            for c in range(x.shape[0]):
                x[c] = x[c] * _uniform(rng, a.brightness_range)
        if rng.random() < a.p_contrast:
            for c in range(x.shape[0]):
                x[c] = _contrast(x[c], _two_sided(rng, a.contrast_range))
        if rng.random() < a.p_low_resolution:
            for c in range(x.shape[0]):
                if rng.random() < 0.5:
                    x[c] = self._low_resolution(x[c], _uniform(rng, a.low_resolution_zoom))
        for p, invert in ((a.p_gamma_inverted, True), (a.p_gamma, False)):
            if rng.random() < p:
                for c in range(x.shape[0]):
                    x[c] = _gamma(x[c], _two_sided(rng, a.gamma_range), invert)
        return x

    def _low_resolution(self, x: torch.Tensor, zoom: float) -> torch.Tensor:
        """Nearest-neighbour down to ``round(shape * zoom)`` (axes in ``low_res_fixed`` kept), back up linearly
        (bicubically in 2D)."""
        shape = list(x.shape)
        small = [n if i in self.low_res_fixed else max(int(round(n * zoom)), 1) for i, n in enumerate(shape)]
        down = F.interpolate(x[None, None], size=small, mode="nearest-exact")
        mode = "bicubic" if x.ndim == 2 else "trilinear"
        return F.interpolate(down, size=shape, mode=mode, align_corners=False)[0, 0]

    def _mirror(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        flips = [a for a in self.mirror if rng.random() < 0.5]
        if not flips:
            return x, y
        return x.flip([a + 1 for a in flips]), y.flip(flips)


def _contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Contrast about the mean by ``factor``, clipped to the original range."""
    lo, hi, mean = x.min(), x.max(), x.mean()
    return ((x - mean) * factor + mean).clamp(lo, hi)


def _gamma(x: torch.Tensor, gamma: float, invert: bool) -> torch.Tensor:
    """batchgenerators' gamma on the range-normalised intensities, mean and standard deviation kept."""
    if invert:
        x = -x
    mean, std = x.mean(), x.std(correction=0)
    lo = x.min()
    rng = x.max() - lo
    x = torch.pow((x - lo) / (rng + _GAMMA_EPS), gamma) * (rng + _GAMMA_EPS) + lo
    x = x - x.mean()
    x = x / (x.std(correction=0) + 1e-8) * std + mean
    return -x if invert else x



def batch_tensors(batch: dict, device: torch.device, augmenter: DeviceAugmenter | None, guidance: Guidance | None,
                  oversample: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A loader's training batch on ``device``: images, labels (int64) and the patch-free guidance corners (int64
    ``(B, 3)``, kept on the CPU: the network reads them as ints). A batch of enlarged regions (``"aug_seed"``)
    is augmented here by ``augmenter``, and its corners are chosen on the augmented labels as a worker would
    (:meth:`Guidance.corners`)."""
    x = batch["data"].to(device, non_blocking=True)
    y = batch["seg"].to(device, non_blocking=True).long()
    if "aug_seed" not in batch:
        return x, y, batch.get("guide")
    if augmenter is None:
        raise ValueError("a batch of unaugmented regions reached a trainer that does not augment on the device")
    seed = int(batch["aug_seed"])
    x, y = augmenter(x, y, seed)
    if guidance is None:
        return x, y, None
    rng = np.random.default_rng([seed, 1])
    return x, y, torch.from_numpy(guidance.corners(y.cpu().numpy(), oversample, rng))
