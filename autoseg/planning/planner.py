"""The planner: a pure, deterministic function from fingerprint and device to a plan.

Patch fitting follows nnU-Net v2 (start isotropic in mm, clip to the median shape, shrink until a batch of 2
fits), with three differences: the physically longest side is shrunk first (nnU-Net: the side covering most
of the median shape), which keeps small CPU patches from losing thick-slice axes; the budget is the
measured-accurate cost model of :mod:`autoseg.planning.memory` rather than a feature-map proxy; and on a
CPU the binding budget is compute per step, so that a training budget in minutes buys thousands of steps.
The zoom-in stage (seed 000) trains long on patches of about half the zoom-out volume.
"""

from __future__ import annotations

from dataclasses import replace
from math import prod
from typing import Literal

import numpy as np

from autoseg import __version__, defaults
from autoseg.device import DeviceInfo
from autoseg.fingerprint import Fingerprint
from autoseg.networks.monai_nets import segresnet_strides
from autoseg.planning.measured import network_step_cost
from autoseg.planning.memory import StepCost
from autoseg.planning.spacing import resampled_shape, target_spacing
from autoseg.planning.splits import kfold_splits
from autoseg.planning.symmetry import lateral_axis
from autoseg.planning.topology import Topology, topology_for_patch
from autoseg.plans import (
    CONFIGURATIONS,
    SCHEMA_VERSION,
    TOP_CONFIGURATION,
    AugmentationPlan,
    ChannelNormalization,
    ConfigurationPlan,
    InferencePlan,
    NetworkPlan,
    Plans,
    ResamplingPlan,
    StagePlan,
    TrainingPlan,
    validate_plans,
)

__all__ = ["make_plan", "usable_memory_bytes", "normalization_for", "training_plan", "dice_weights",
           "default_configuration", "CONFIGURATIONS", "patch_free_factor"]

DiceWeighting = Literal["equal", "size-rank"]


def usable_memory_bytes(device: DeviceInfo) -> int:
    """Bytes a training step may use: GPU budget minus reserve, times a safety share; a share of RAM on CPU."""
    if device.kind == "cuda":
        return int(max(device.budget_gib - defaults.GPU_RESERVED_GIB, 0.0) * defaults.GPU_USABLE_SHARE * 2**30)
    return int(device.budget_gib * defaults.CPU_RAM_SHARE * 2**30)


def normalization_for(fp: Fingerprint, bias_correction: bool = False) -> list[ChannelNormalization]:
    """CT channels: dataset-wide clip to the foreground 0.5/99.5 percentiles and z-score; anything else:
    per-case z-score, inside the non-zero mask when cropping to it removes a quarter of the volume or more
    (brain-extracted MRI) so that the zero background does not skew mean and std; with ``bias_correction``
    those z-scored channels are N4-corrected first."""
    out = []
    for name, st in zip(fp.channel_names, fp.channels):
        if name.strip().lower() == "ct":
            out.append(ChannelNormalization(name, "ct", False, [st.percentile_00_5, st.percentile_99_5],
                                            st.mean, max(st.std, 1e-8)))
        elif name.strip().lower() in ("none", "nonorm", "no_norm"):
            out.append(ChannelNormalization(name, "none", False, None, None, None))
        else:
            out.append(ChannelNormalization(name, "zscore", fp.median_relative_size_after_crop < 0.75, None, None,
                                            None, bias_correction))
    return out


def _network(topo: Topology, device: DeviceInfo) -> NetworkPlan:
    gpu = device.kind == "cuda"
    base, cap = (defaults.GPU_BASE_FEATURES, defaults.GPU_MAX_FEATURES) if gpu else \
        (defaults.CPU_BASE_FEATURES, defaults.CPU_MAX_FEATURES)
    blocks = defaults.CPU_BLOCKS_PER_STAGE
    if gpu:
        blocks = next(b for least, b in defaults.GPU_BLOCKS_BY_BUDGET if device.budget_gib >= least)
    n = len(topo.strides)
    return NetworkPlan("residual_unet", [min(base * 2**s, cap) for s in range(n)], topo.kernel_sizes, topo.strides,
                       [blocks[min(s, len(blocks) - 1)] for s in range(n)], 1, True,
                       channels_last=not gpu and defaults.CPU_CHANNELS_LAST)


def _monai_network(arch: str, patch: list[int], spacing: list[float], device: DeviceInfo) -> NetworkPlan:
    """MONAI's networks, sized like ours for the device: the U-Net's base width; SegResNet's strides by MONAI's
    spacing rule, the Attention U-Net's by ours (:func:`topology_for_patch` on ``patch``); UNETR four stride-2
    stages of 16-voxel tokens with the transformer of :data:`defaults.UNETR_GPU` / ``UNETR_CPU``."""
    gpu = device.kind == "cuda"
    base = defaults.GPU_BASE_FEATURES if gpu else defaults.CPU_BASE_FEATURES
    if arch == "segresnet":
        blocks = list(defaults.SEGRESNET_BLOCKS)
        strides = segresnet_strides(spacing, len(blocks))
        kernels = [[3 if v == 2 else 1 for v in s] for s in strides[1:]] + [[3, 3, 3]]
        return NetworkPlan(arch, [base * 2**i for i in range(len(blocks))], kernels, strides, blocks, 1, True)
    if arch == "attention_unet":
        topo = topology_for_patch(patch, spacing)
        n = len(topo.strides)
        cap = defaults.GPU_MAX_FEATURES if gpu else defaults.CPU_MAX_FEATURES
        return NetworkPlan(arch, [min(base * 2**i, cap) for i in range(n)], [[3, 3, 3]] * n, topo.strides, [1] * n,
                           1, False)
    if arch == "unetr":
        fs, hidden, mlp, heads = defaults.UNETR_GPU if gpu else defaults.UNETR_CPU
        return NetworkPlan(arch, [fs, 2 * fs, 4 * fs, 8 * fs, hidden], [[3, 3, 3]] * 5, [[1, 1, 1]] + [[2, 2, 2]] * 4,
                           [1] * 5, 1, False, hidden, mlp, heads)
    raise ValueError(f"unknown architecture {arch!r}")


def patch_free_factor(spacing: list[float]) -> list[int]:
    """The patch-free configuration's down-sampling per axis: :data:`defaults.PATCH_FREE_FACTOR` on every axis
    whose spacing, multiplied by it, stays no coarser than the coarsest axis (every axis when the spacing is
    within that factor of isotropic), 1 elsewhere: a thick-slice axis keeps its few slices."""
    f = defaults.PATCH_FREE_FACTOR
    if max(spacing) / min(spacing) < f:
        return [f, f, f]
    return [f if s * f <= max(spacing) else 1 for s in spacing]


class _Fitter:
    """Evaluates patches against the device budget for one architecture; one instance per configuration.

    Our U-Net's topology follows the patch (nnU-Net's rules); MONAI's networks are fixed from the first patch
    asked for, and patches are rounded up to a multiple of their total stride.
    """

    def __init__(self, fp: Fingerprint, device: DeviceInfo, spacing: list[float], arch: str = "residual_unet"):
        self.device, self.spacing, self.arch = device, spacing, arch
        self.in_ch, self.n_cls = len(fp.channel_names), len(fp.labels)
        self.amp = device.kind == "cuda"
        self.memory = usable_memory_bytes(device)
        self._fixed: NetworkPlan | None = None

    def network(self, patch: list[int]) -> tuple[list[int], NetworkPlan]:
        """The patch rounded up to what the network divides, and the network."""
        if self.arch == "residual_unet":
            topo = topology_for_patch(patch, self.spacing)
            return topo.patch, _network(topo, self.device)
        if self.arch == "patch_free":
            factor = patch_free_factor(self.spacing)
            topo = topology_for_patch([-(-p // f) for p, f in zip(patch, factor)],
                                      [s * f for s, f in zip(self.spacing, factor)])
            net = replace(_network(topo, self.device), architecture="patch_free", upsample_factor=factor,
                          guidance_share=defaults.PATCH_FREE_GUIDANCE_SHARE,
                          reconstruction_weight=defaults.PATCH_FREE_RECONSTRUCTION_WEIGHT,
                          whole_volume_prediction=defaults.PATCH_FREE_WHOLE_VOLUME)
            return [p * f for p, f in zip(topo.patch, factor)], net
        if self._fixed is None:
            self._fixed = _monai_network(self.arch, patch, self.spacing, self.device)
        stride = self._fixed.total_stride
        return [max(s, -(-p // s) * s) for p, s in zip(patch, stride)], self._fixed

    def cost(self, net: NetworkPlan, patch: list[int], batch: int) -> StepCost:
        return network_step_cost(net, patch, batch, self.in_ch, self.n_cls, self.amp,
                                 defaults.OPTIMIZER[self.device.kind])

    def fits(self, net: NetworkPlan, patch: list[int], batch: int) -> bool:
        c = self.cost(net, patch, batch)
        if self.device.kind == "cpu" and c.flops > defaults.CPU_MAX_STEP_FLOPS:
            return False
        return c.total_bytes <= self.memory


def _initial_patch(spacing: list[float], median_shape: list[int]) -> list[int]:
    """Isotropic in mm, :data:`defaults.INITIAL_PATCH_VOXELS` voxels, clipped to the median shape."""
    aspect = 1 / np.asarray(spacing)
    scale = (defaults.INITIAL_PATCH_VOXELS / prod(aspect)) ** (1 / 3)
    return [int(min(round(a * scale), m)) for a, m in zip(aspect, median_shape)]


def _fit_zoom_out(f: _Fitter, median_shape: list[int], patch: list[int]) -> tuple[list[int], NetworkPlan]:
    """Shrink ``patch`` until a batch of ``MIN_BATCH_SIZE`` fits; returns the patch and its network."""
    patch, net = f.network(patch)
    while not f.fits(net, patch, defaults.MIN_BATCH_SIZE):
        # shrink the physically longest side first (ties: the one covering most of the median shape), so that
        # small budgets keep patches isotropic in mm instead of cutting thick-slice axes to a few slices
        extent = [p * s for p, s in zip(patch, f.spacing)]
        order = sorted(range(3), key=lambda a: (-round(extent[a], 6), -patch[a] / median_shape[a]))
        step = net.total_stride
        axis = next((a for a in order if patch[a] - step[a] >= step[a]), None)
        if axis is None:
            raise ValueError(f"no patch fits the budget: {f.device.budget_gib:g} GiB on {f.device.kind} leaves "
                             f"{f.memory / 2**30:.2f} GiB for a training step, and even patch {patch} "
                             "needs more; plan for a device with more memory (--gpu-memory)")
        patch = list(patch)
        patch[axis] -= step[axis]
        patch, net = f.network(patch)
    return patch, net


def _zoom_in_patch(out_patch: list[int], net: NetworkPlan, spacing: list[float], fraction: float) -> list[int]:
    """Shrink the zoom-out patch, longest side in mm first, in steps of the total stride, to about
    ``fraction`` of its volume, keeping at least ``ZOOM_IN_MIN_EDGE`` voxels per axis in the bottleneck
    (or the zoom-out bottleneck edge where that is smaller)."""
    stride = net.total_stride
    floor_ = [s * min(defaults.ZOOM_IN_MIN_EDGE, p // s) for p, s in zip(out_patch, stride)]
    target = fraction * prod(out_patch)
    patch, prev = list(out_patch), list(out_patch)
    while prod(patch) > target:
        axes = [a for a in range(3) if patch[a] - stride[a] >= floor_[a]]
        if not axes:
            return patch
        axis = max(axes, key=lambda a: (patch[a] * spacing[a], -a))
        prev = list(patch)
        patch[axis] -= stride[axis]
    # take whichever of the last two candidates is closer to the target volume (in log ratio)
    return prev if abs(np.log(prod(prev) / target)) < abs(np.log(prod(patch) / target)) else patch


def _batch_size(f: _Fitter, net: NetworkPlan, patch: list[int], n_cases: int, median_shape: list[int]) -> int:
    """GPU: as many as fit the memory budget, capped so that a batch covers at most ``MAX_DATASET_COVERED`` of
    the dataset. CPU: ``CPU_BATCH_SIZE`` for 3D patches (they were sized for it); slices fill the compute
    budget the same way a GPU batch fills memory."""
    if f.device.kind == "cpu" and patch[0] > 1:
        return defaults.CPU_BATCH_SIZE
    per_sample = f.cost(net, patch, 1)
    fixed = f.cost(net, patch, 0)
    by_memory = int((f.memory - fixed.total_bytes) // max(per_sample.total_bytes - fixed.total_bytes, 1))
    by_dataset = int(defaults.MAX_DATASET_COVERED * n_cases * prod(median_shape) / prod(patch))
    batch = min(by_memory, by_dataset)
    if f.device.kind == "cpu":
        batch = min(batch, int(defaults.CPU_MAX_STEP_FLOPS // max(per_sample.flops - fixed.flops, 1)))
    return max(defaults.MIN_BATCH_SIZE, batch)


def _stage(f: _Fitter, net: NetworkPlan, name: Literal["zoom_in", "zoom_out"], patch: list[int], batch: int,
           median_shape: list[int], epochs: int, lr: float, init_from: str | None) -> StagePlan:
    c = f.cost(net, patch, batch)
    iters = defaults.GPU_ITERATIONS_PER_EPOCH if f.device.kind == "cuda" else defaults.CPU_ITERATIONS_PER_EPOCH
    share = prod(min(p, m) for p, m in zip(patch, median_shape)) / prod(median_shape)
    return StagePlan(name, list(patch), batch, round(share, 4), round(c.total_bytes / 2**30, 3),
                     round(c.flops / 1e9, 2), epochs, iters, defaults.OPTIMIZER[f.device.kind], lr, defaults.MOMENTUM,
                     defaults.WEIGHT_DECAY, defaults.SCHEDULER, init_from)


def dice_weights(fp: Fingerprint, weighting: DiceWeighting) -> list[float]:
    """One Dice weight per foreground class. ``equal``: all 1. ``size-rank`` (seed 001): rank the classes by
    voxels over the dataset, largest first, weight them 1, 2, ..., n, and rescale so the weights average 1."""
    n = len(fp.labels) - 1
    if weighting == "equal" or n == 0:
        return [1.0] * n
    by_value = {c.value: c.total_voxels for c in fp.classes}
    sizes = [by_value.get(v, 0) for v in sorted(fp.labels)[1:]]
    order = sorted(range(n), key=lambda i: -sizes[i])
    ranks = [0.0] * n
    for r, i in enumerate(order):
        ranks[i] = float(r + 1)
    return [round(w * n / sum(ranks), 6) for w in ranks]


def _augmentation(patch: list[int], device: DeviceInfo, lateral: int | None = None) -> AugmentationPlan:
    """nnU-Net v2's augmentation; in-plane only for flat patches (``dummy_2d``); mirroring as
    :func:`_mirror_axes`; where it runs: :data:`defaults.AUGMENT_ON_DEVICE`."""
    flat = max(patch) / patch[0] > defaults.DUMMY_2D_ASPECT
    deg = [180.0, 0.0, 0.0] if flat else [defaults.ROTATION_DEGREES] * 3
    return AugmentationPlan(
        defaults.P_ROTATION, deg, defaults.P_SCALE, list(defaults.SCALE_RANGE), flat, defaults.P_NOISE,
        list(defaults.NOISE_VARIANCE), defaults.P_BLUR, list(defaults.BLUR_SIGMA), defaults.P_BRIGHTNESS,
        list(defaults.BRIGHTNESS_RANGE), defaults.P_CONTRAST, list(defaults.CONTRAST_RANGE),
        defaults.P_LOW_RESOLUTION, list(defaults.LOW_RESOLUTION_ZOOM), defaults.P_GAMMA, defaults.P_GAMMA_INVERTED,
        list(defaults.GAMMA_RANGE), _mirror_axes(patch, lateral), defaults.AUGMENT_ON_DEVICE[device.kind])


def _mirror_axes(patch: list[int], lateral: int | None = None) -> list[int]:
    """The axes the patch extends along (flipping a one-voxel axis does nothing), except ``lateral``, the axis
    that separates left/right label pairs (:mod:`autoseg.planning.symmetry`)."""
    return [a for a in range(3) if patch[a] > 1 and a != lateral]


def _deep_supervision_weights(net: NetworkPlan) -> list[float]:
    """nnU-Net's: 1/2^i per output (full resolution first), the coarsest 0, normalised to sum 1."""
    n = len(net.features) - 1 if net.deep_supervision else 1
    w = [0.5**i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    return [round(x / sum(w), 6) for x in w]


def training_plan(fp: Fingerprint, device: DeviceInfo, net: NetworkPlan, patch: list[int],
                  weighting: DiceWeighting = "equal", lateral: int | None = None) -> TrainingPlan:
    """Loss, sampling and bookkeeping settings for both stages."""
    gpu = device.kind == "cuda"
    return TrainingPlan(
        defaults.BATCH_DICE, dice_weights(fp, weighting), _deep_supervision_weights(net),
        defaults.OVERSAMPLE_FOREGROUND, defaults.GRAD_CLIP_NORM,
        defaults.GPU_VALIDATION_ITERATIONS if gpu else defaults.CPU_VALIDATION_ITERATIONS,
        defaults.CHECKPOINT_EVERY_EPOCHS, defaults.EMA_MOMENTUM, defaults.TRAINING_SEED,
        _augmentation(patch, device, lateral))


def _stages(f: _Fitter, net: NetworkPlan, out_patch: list[int], n_cases: int,
            median_shape: list[int]) -> list[StagePlan]:
    """The zoom-in stage (``ZOOM_IN_FRACTION`` of the zoom-out patch, long) and the zoom-out stage."""
    in_patch = _zoom_in_patch(out_patch, net, f.spacing, defaults.ZOOM_IN_FRACTION)
    batch = _batch_size(f, net, out_patch, n_cases, median_shape)
    zoom_in_epochs = defaults.GPU_ZOOM_IN_EPOCHS if f.device.kind == "cuda" else defaults.CPU_ZOOM_IN_EPOCHS
    lr = defaults.LEARNING_RATE[f.device.kind]
    return [
        _stage(f, net, "zoom_in", in_patch, batch, median_shape, zoom_in_epochs, lr, None),
        _stage(f, net, "zoom_out", out_patch, batch, median_shape,
               max(1, round(zoom_in_epochs * defaults.ZOOM_OUT_EPOCH_SHARE)), lr * defaults.ZOOM_OUT_LR_SHARE,
               "zoom_in"),
    ]


def _plan_2d(f: _Fitter, median_shape: list[int], n_cases: int, lateral: int | None) -> ConfigurationPlan:
    """Slices as samples: the whole median slice (shrunk in-plane if even two do not fit), batch to the budget."""
    out_patch, net = _fit_zoom_out(f, median_shape, [1, median_shape[1], median_shape[2]])
    stages = _stages(f, net, out_patch, n_cases, median_shape)
    return ConfigurationPlan("2d", net, stages, _deep_supervision_weights(net),
                             _augmentation(out_patch, f.device, lateral), _mirror_axes(out_patch, lateral))


def _plan_monai(f: _Fitter, median_shape: list[int], n_cases: int, lateral: int | None) -> ConfigurationPlan:
    """A MONAI network (``f.arch``) on 3D patches, fitted and staged by the same rules as our U-Net; UNETR's
    position embedding is sized for the zoom-out patch."""
    out_patch, net = _fit_zoom_out(f, median_shape, _initial_patch(f.spacing, median_shape))
    if net.architecture == "unetr":
        net = replace(net, input_size=list(out_patch))
    stages = _stages(f, net, out_patch, n_cases, median_shape)
    return ConfigurationPlan(f.arch, net, stages, _deep_supervision_weights(net),
                             _augmentation(out_patch, f.device, lateral), _mirror_axes(out_patch, lateral))


def _plan_patch_free(f: _Fitter, median_shape: list[int], n_cases: int, lateral: int | None,
                     weights: list[float] | None) -> ConfigurationPlan:
    """The patch-free network: the zoom-out region starts as the whole median volume and shrinks until a batch
    fits the device (its U-Net sees it at low resolution, so it covers up to ``factor**3`` times what a 3D
    patch of the same cost covers); zoom-in and batch by the same rules as the others; its own Dice class
    ``weights`` (None: the plan's)."""
    out_patch, net = _fit_zoom_out(f, median_shape, list(median_shape))
    stages = _stages(f, net, out_patch, n_cases, median_shape)
    return ConfigurationPlan("patch_free", net, stages, _deep_supervision_weights(net),
                             _augmentation(out_patch, f.device, lateral), _mirror_axes(out_patch, lateral), weights)


def _patch_free_reason(share: float) -> tuple[bool, str]:
    """Whether the patch-free configuration is planned by default, given the share of the median volume the 3d
    zoom-out patch covers, and why."""
    seen = f"the 3d zoom-out patch covers {100 * share:.0f}% of the median volume"
    if share < defaults.PATCH_FREE_MAX_SHARE:
        return True, f"{seen} (under {100 * defaults.PATCH_FREE_MAX_SHARE:.0f}%): a low-resolution view of a " \
            "region several times larger, segmented at full resolution"
    return False, f"{seen} (at least {100 * defaults.PATCH_FREE_MAX_SHARE:.0f}%): sliding windows already see " \
        "most of a scan"


_WHY_NOT_DEFAULT = {
    "2d": "not planned: not asked for in --configs",
    "segresnet": "on a CPU each configuration's cross-validation costs hours, and the residual U-Net is the one "
                 "measured against nnU-Net here",
    "attention_unet": "on a CPU each configuration's cross-validation costs hours, and the residual U-Net is the one "
                      "measured against nnU-Net here",
    "unetr": "a ViT needs more data and time than the CNNs (in a four-way comparison on brain-metastasis MRI it "
             "had the lowest Dice at ~4x the training time)",
}


def _other_configurations(fp: Fingerprint, device: DeviceInfo, spacing: list[float], median_shape: list[int],
                          lateral: int | None, wanted: list[str], asked: bool, share_3d: float,
                          weighting: DiceWeighting | None = None) -> tuple[list[ConfigurationPlan], dict[str, str]]:
    """Plan every configuration of ``wanted`` but the top-level one; the reason each known configuration is
    planned or not (``asked``: ``wanted`` came from ``--configs``; otherwise ``patch_free`` joins the device's
    defaults when the 3d zoom-out patch covers less than :data:`defaults.PATCH_FREE_MAX_SHARE` of the median
    volume, ``share_3d``). A configuration that fits no patch is left out with the reason, not an error.
    ``weighting``: ``--dice-weights`` for every configuration; None: ``patch_free`` gets
    :data:`defaults.PATCH_FREE_DICE_WEIGHTING`, the others the plan's (equal)."""
    default = list(defaults.DEFAULT_CONFIGURATIONS[device.kind])
    big, why_patch_free = _patch_free_reason(share_3d)
    if big:
        default.append("patch_free")
        wanted = wanted if asked else [*wanted, "patch_free"]
    reasons = {TOP_CONFIGURATION: "our residual U-Net on 3D patches: always planned"}
    out = []
    for name in CONFIGURATIONS[1:]:
        why = "asked for with --configs" if asked else \
            "planned by default on " + ("a GPU" if device.kind == "cuda" else "a CPU")
        if name == "patch_free":
            why = f"{why}; {why_patch_free}" if asked else f"planned by default: {why_patch_free}"
        if name not in wanted:
            reasons[name] = "not planned (add it with --configs): " + (
                (why_patch_free if name == "patch_free" else _WHY_NOT_DEFAULT[name]) if name not in default
                else "left out of --configs")
            continue
        try:
            if name == "2d":
                c = _plan_2d(_Fitter(fp, device, spacing), median_shape, fp.n_cases, lateral)
            elif name == "patch_free":
                own = dice_weights(fp, defaults.PATCH_FREE_DICE_WEIGHTING) if weighting is None else None
                c = _plan_patch_free(_Fitter(fp, device, spacing, name), median_shape, fp.n_cases, lateral, own)
            else:
                c = _plan_monai(_Fitter(fp, device, spacing, name), median_shape, fp.n_cases, lateral)
        except ValueError as e:
            reasons[name] = f"not planned: {e}"
            continue
        out.append(c)
        reasons[name] = why
    return out, reasons


def default_configuration(plan_3d: list[StagePlan], median_shape: list[int]) -> tuple[str, str]:
    """``2d`` when the 3D zoom-out patch sees less than ``THREE_D_MIN_INPLANE_SHARE`` of the median slice
    (thick slices, big scans, small devices: too little in-plane context per sample), else ``3d``; with the
    reason in words. ``autoseg train --config`` overrides it."""
    p = plan_3d[-1].patch_size
    share = min(p[1], median_shape[1]) * min(p[2], median_shape[2]) / (median_shape[1] * median_shape[2])
    seen = f"the 3d zoom-out patch {p[1]}x{p[2]} in-plane sees {100 * share:.0f}% of the median slice " \
           f"{median_shape[1]}x{median_shape[2]}"
    if share < defaults.THREE_D_MIN_INPLANE_SHARE:
        return "2d", f"{seen} (under {100 * defaults.THREE_D_MIN_INPLANE_SHARE:.0f}%): 2d sees whole slices"
    return TOP_CONFIGURATION, f"{seen} (at least {100 * defaults.THREE_D_MIN_INPLANE_SHARE:.0f}%)"


def make_plan(fp: Fingerprint, device: DeviceInfo, n_folds: int = defaults.N_FOLDS,
              seed: int = defaults.SPLIT_SEED, dice_weighting: DiceWeighting | None = None,
              bias_correction: bool = False, configurations: list[str] | None = None) -> Plans:
    """Plan preprocessing, the configurations (network and both training stages each), folds and inference for
    ``fp`` on ``device``.

    Args:
        configurations: names from :data:`CONFIGURATIONS` (the top-level ``3d`` is always planned); default: the
            device's :data:`defaults.DEFAULT_CONFIGURATIONS`.
        dice_weighting: every configuration's Dice class weights; None: equal, and for ``patch_free``
            :data:`defaults.PATCH_FREE_DICE_WEIGHTING`.

    Raises:
        ValueError: no patch fits the budget, too few cases for cross-validation, or an unknown configuration.
    """
    wanted = list(defaults.DEFAULT_CONFIGURATIONS[device.kind] if configurations is None else configurations)
    unknown = [c for c in wanted if c not in CONFIGURATIONS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGURATIONS)}")
    spacings = np.array([c.spacing for c in fp.cases])
    cropped = np.array([c.shape_after_crop for c in fp.cases])
    spacing = target_spacing(spacings, np.array([c.shape for c in fp.cases]))
    resampled = np.array([resampled_shape(s, sp, spacing) for s, sp in zip(cropped, spacings)])
    median_shape = [int(v) for v in np.median(resampled, axis=0)]
    f = _Fitter(fp, device, spacing)
    out_patch, net = _fit_zoom_out(f, median_shape, _initial_patch(spacing, median_shape))
    stages = _stages(f, net, out_patch, fp.n_cases, median_shape)
    side = lateral_axis(fp)
    lateral = side[0] if side else None
    training = training_plan(fp, device, net, out_patch, dice_weighting or "equal", lateral)
    others, reasons = _other_configurations(fp, device, spacing, median_shape, lateral, wanted,
                                            configurations is not None, stages[-1].share_of_median_volume,
                                            dice_weighting)
    default, reason = default_configuration(stages, median_shape)
    if default not in [c.name for c in others]:
        default, reason = TOP_CONFIGURATION, f"{reason}; 2d is not planned" if default == "2d" else reason
    plans = Plans(
        SCHEMA_VERSION, __version__, fp.dataset_name, fp.dataset_key, list(fp.channel_names), dict(fp.labels),
        list(fp.median_spacing), list(fp.median_shape), spacing, median_shape,
        normalization_for(fp, bias_correction),
        ResamplingPlan(3, 1, 0, defaults.ANISO_THRESHOLD), net, device, f.amp, round(f.memory / 2**30, 3),
        defaults.ZOOM_IN_FRACTION, stages, training,
        kfold_splits([c.case_id for c in fp.cases], n_folds, seed),
        InferencePlan(defaults.TILE_STEP, _mirror_axes(out_patch, lateral), defaults.GAUSSIAN_SIGMA_SCALE),
        TOP_CONFIGURATION, others, default, reason, f"axis {side[0]} is never flipped: {side[1]}" if side else "",
        reasons)
    return validate_plans(plans)
