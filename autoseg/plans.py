"""The plan: typed, versioned, validated on load. Written to ``RUN_DIR/plans.json``.

Everything later steps need to know about *how* to preprocess, train and predict lives here, not in
globals or environment variables. A hand-edited plan is checked field by field on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path
from typing import Literal

from autoseg.device import DeviceInfo
from autoseg.networks.factory import ARCHITECTURES, MONAI_ARCHITECTURES
from autoseg.typedjson import SchemaError, from_jsonable, read_json, write_json_atomic

__all__ = ["SCHEMA_VERSION", "ChannelNormalization", "NetworkPlan", "StagePlan", "ResamplingPlan",
           "InferencePlan", "AugmentationPlan", "TrainingPlan", "Fold", "Plans", "load_plans", "save_plans",
           "validate_plans", "PLANS_FILE", "ConfigurationPlan", "select_configuration", "configuration_names",
           "TOP_CONFIGURATION", "CONFIGURATIONS"]

SCHEMA_VERSION = 2
#: the name of the configuration in the plan's top-level ``network`` and ``stages``
TOP_CONFIGURATION = "3d"
#: every configuration a plan can hold: our residual U-Net on 3D patches and on slices, MONAI's networks, and our
#: patch-free network (a low-resolution view of a large region, a full-resolution segmentation)
CONFIGURATIONS = (TOP_CONFIGURATION, "2d", *MONAI_ARCHITECTURES, "patch_free")
PLANS_FILE = "plans.json"


@dataclass
class ChannelNormalization:
    """How one input channel is normalised.

    ``zscore``: per case, (x - mean) / std over the case (inside the non-zero mask when ``use_mask``).
    ``ct``: clip to ``clip`` (dataset foreground 0.5/99.5 percentiles), then (x - mean) / std with the
    dataset's foreground ``mean`` and ``std``. ``none``: unchanged. ``bias_field``: divide out the N4 bias
    field first (MRI; ``autoseg plan --bias-correction``).
    """

    channel: str
    scheme: Literal["zscore", "ct", "none"]
    use_mask: bool
    clip: list[float] | None
    mean: float | None
    std: float | None
    bias_field: bool = False


@dataclass
class NetworkPlan:
    """Network topology. Per stage: features, kernel (z, y, x), downsampling stride (z, y, x), blocks.

    ``residual_unet`` / ``plain_unet``: ours. ``segresnet``: ``features`` doubles per stage from the first,
    ``blocks_per_stage`` are its encoder blocks, ``strides`` its per-axis downsampling. ``attention_unet``:
    ``features`` and ``strides`` per stage. ``unetr``: ``features`` ``[f, 2f, 4f, 8f, hidden_size]`` (its
    decoder widths and the transformer's), four stride-2 stages for its 16-voxel tokens, and the transformer's
    ``hidden_size``, ``mlp_dim`` and ``num_heads``; ``input_size`` is the patch its position embedding is sized
    for (the zoom-out patch; other patches resample it). See :mod:`autoseg.networks.monai_nets`. ``patch_free``:
    our U-Net on the region averaged down by ``upsample_factor`` per axis (its ``features``, ``strides``... are
    the low-resolution U-Net's), full-resolution heads, a guidance patch of ``guidance_share`` of the region per
    axis and a super-resolution loss weighted ``reconstruction_weight`` (:mod:`autoseg.networks.patchfree`);
    stage patches are full-resolution regions, the network's input is the region divided by the factor; with
    ``whole_volume_prediction`` a scan is predicted in one pass where its memory estimate fits the plan's budget
    (else by sliding the zoom-out region). ``channels_last``: our U-Nets keep weights and activations
    channels-last (``torch.channels_last_3d``); planned for the CPU, where it was measured faster
    (:data:`autoseg.defaults.CPU_CHANNELS_LAST`); the values are the same either way.
    """

    architecture: str
    features: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    blocks_per_stage: list[int]
    decoder_convs: int
    deep_supervision: bool
    hidden_size: int = 0
    mlp_dim: int = 0
    num_heads: int = 0
    input_size: list[int] = field(default_factory=list)
    upsample_factor: list[int] = field(default_factory=lambda: [1, 1, 1])
    guidance_share: float = 0.0
    reconstruction_weight: float = 0.0
    whole_volume_prediction: bool = False
    channels_last: bool = False

    @property
    def total_stride(self) -> list[int]:
        """Product of the strides (and the patch-free factor) per axis: every patch edge must be a multiple of it."""
        return [prod(s[a] for s in self.strides) * self.upsample_factor[a] for a in range(3)]


@dataclass
class StagePlan:
    """One training stage: zoom-in (small patches, long) or zoom-out (large patches, short, lower LR)."""

    name: Literal["zoom_in", "zoom_out"]
    patch_size: list[int]
    batch_size: int
    share_of_median_volume: float
    estimated_memory_gib: float
    estimated_step_gflops: float
    epochs: int
    iterations_per_epoch: int
    optimizer: Literal["sgd", "adam"]
    learning_rate: float
    momentum: float
    weight_decay: float
    scheduler: Literal["poly", "cosine_restarts", "onecycle"]
    init_from: str | None


@dataclass
class AugmentationPlan:
    """Training augmentation (batchgenerators); ``p_*`` are probabilities per sample, ranges are (low, high).

    Rotation is about each axis by up to ``rotation_degrees`` (per axis z, y, x); ``dummy_2d`` rotates and
    scales in-plane only (strongly anisotropic patches). Mirroring flips each of ``mirror_axes`` with p 0.5.
    ``on_device``: the data workers only read each sample's enlarged region, and the transforms run on the
    training device, in torch (:mod:`autoseg.training.device_augment`); else batchgenerators in the workers.
    """

    p_rotation: float
    rotation_degrees: list[float]
    p_scale: float
    scale_range: list[float]
    dummy_2d: bool
    p_noise: float
    noise_variance: list[float]
    p_blur: float
    blur_sigma: list[float]
    p_brightness: float
    brightness_range: list[float]
    p_contrast: float
    contrast_range: list[float]
    p_low_resolution: float
    low_resolution_zoom: list[float]
    p_gamma: float
    p_gamma_inverted: float
    gamma_range: list[float]
    mirror_axes: list[int]
    on_device: bool = False


@dataclass
class TrainingPlan:
    """Loss, sampling and bookkeeping shared by both stages.

    ``dice_class_weights``: one weight per foreground class for the Dice term (equal: all 1; seed 001's
    weighting: larger for rarer classes, ``autoseg plan --dice-weights size-rank``). ``deep_supervision_weights``:
    loss weight per network output, full resolution first (halving, the coarsest 0, summing to 1).
    ``oversample_foreground``: probability that a patch is centred on a voxel of a random foreground class.
    ``ema_momentum``: the best checkpoint follows ``ema = m * ema + (1 - m) * pseudo_dice``.
    """

    batch_dice: bool
    dice_class_weights: list[float]
    deep_supervision_weights: list[float]
    oversample_foreground: float
    grad_clip_norm: float
    validation_iterations: int
    checkpoint_every_epochs: int
    ema_momentum: float
    seed: int
    augmentation: AugmentationPlan


@dataclass
class ResamplingPlan:
    """Interpolation orders: images by splines of ``image_order``; labels one-hot with ``label_order``;
    for cases whose spacing anisotropy exceeds ``anisotropy_threshold`` the out-of-plane axis separately
    with ``out_of_plane_order``."""

    image_order: int
    label_order: int
    out_of_plane_order: int
    anisotropy_threshold: float


@dataclass
class InferencePlan:
    """Sliding-window settings: step as a share of the patch, mirrored axes for test-time augmentation."""

    tile_step: float
    mirror_axes: list[int]
    gaussian_sigma_scale: float


@dataclass
class Fold:
    """Case ids used for training and validation in one cross-validation fold."""

    train: list[str]
    val: list[str]


@dataclass
class ConfigurationPlan:
    """A further way to train the same preprocessed data, beside the plan's top-level one (``3d``).

    ``2d``: slices as samples, i.e. patches one voxel deep (z) through a network that never convolves or pools
    across slices; the same preprocessing; prediction slides one slice at a time and stacks them back. What
    differs from the top-level configuration is the network, the stages, the deep-supervision weights, the
    augmentation, the axes mirrored at prediction and, where set, the Dice class weights (None: the plan's
    ``training.dice_class_weights``); everything else is shared.
    """

    name: str
    network: NetworkPlan
    stages: list[StagePlan]
    deep_supervision_weights: list[float]
    augmentation: AugmentationPlan
    mirror_axes: list[int]
    dice_class_weights: list[float] | None = None


@dataclass
class Plans:
    """Everything autoseg decided about a dataset. Shapes and spacings in array order (z, y, x)."""

    schema_version: int
    autoseg_version: str
    dataset_name: str
    fingerprint_key: str
    channel_names: list[str]
    labels: dict[int, str]
    original_median_spacing: list[float]
    original_median_shape: list[int]
    target_spacing: list[float]
    median_shape_after_resampling: list[int]
    normalization: list[ChannelNormalization]
    resampling: ResamplingPlan
    network: NetworkPlan
    device: DeviceInfo
    amp: bool
    memory_budget_gib: float
    zoom_in_fraction: float
    stages: list[StagePlan]
    training: TrainingPlan
    folds: list[Fold]
    inference: InferencePlan
    #: the name of the configuration given by ``network`` and ``stages`` above
    configuration: str = TOP_CONFIGURATION
    #: further configurations (``2d``) on the same preprocessed data
    other_configurations: list[ConfigurationPlan] = field(default_factory=list)
    #: what ``autoseg train`` and ``autoseg predict`` use without ``--config``, and why
    default_configuration: str = TOP_CONFIGURATION
    default_reason: str = ""
    #: why mirroring (augmentation and prediction) leaves out an axis, if it does
    mirroring_note: str = ""
    #: why each known configuration is planned or not (``autoseg plan --configs``)
    configuration_reasons: dict[str, str] = field(default_factory=dict)


def configuration_names(p: Plans) -> list[str]:
    """The configurations a plan holds, the top-level one first."""
    return [p.configuration] + [c.name for c in p.other_configurations]


def select_configuration(p: Plans, name: str | None = None) -> Plans:
    """The plan as one configuration sees it: its network, stages, deep supervision, augmentation and
    mirroring in the top-level fields (``name`` None: the plan's default).

    Raises:
        ValueError: the plan has no such configuration (names those it has).
    """
    name = p.default_configuration if name is None else name
    if name == p.configuration:
        return p
    c = next((c for c in p.other_configurations if c.name == name), None)
    if c is None:
        raise ValueError(f"configuration {name!r}: the plan has {', '.join(configuration_names(p))} (autoseg plan "
                         "--configs adds others: 3d, 2d, segresnet, attention_unet, unetr, patch_free)")
    shared = p.training.dice_class_weights  # what a configuration without weights of its own has
    rest = [o if o.dice_class_weights is not None else replace(o, dice_class_weights=shared)
            for o in p.other_configurations if o.name != name]
    top = ConfigurationPlan(p.configuration, p.network, p.stages, p.training.deep_supervision_weights,
                            p.training.augmentation, p.inference.mirror_axes, p.training.dice_class_weights)
    weights = shared if c.dice_class_weights is None else c.dice_class_weights
    return replace(p, network=c.network, stages=c.stages, configuration=name, other_configurations=[top, *rest],
                   training=replace(p.training, deep_supervision_weights=c.deep_supervision_weights,
                                    augmentation=c.augmentation, dice_class_weights=weights),
                   inference=replace(p.inference, mirror_axes=c.mirror_axes))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise SchemaError(msg)


def _validate_configuration(p: Plans, where: str) -> None:
    """Network, stages, deep supervision, augmentation and mirroring of the configuration ``p`` shows."""
    net = p.network
    _check(net.architecture in ARCHITECTURES, f"{where}network.architecture: unknown {net.architecture!r}; "
           f"known: {', '.join(ARCHITECTURES)}")
    n = len(net.features)
    for name in ("kernel_sizes", "strides", "blocks_per_stage"):
        _check(len(getattr(net, name)) == n, f"{where}network.{name}: {len(getattr(net, name))} entries; "
               f"network.features has {n} stages")
    for name in ("kernel_sizes", "strides"):
        for i, v in enumerate(getattr(net, name)):
            _check(len(v) == 3 and all(x >= 1 for x in v),
                   f"{where}network.{name}[{i}]: {v}; expected 3 positive ints")
    _check(all(f > 0 for f in net.features), f"{where}network.features: {net.features}; expected positive ints")
    if net.architecture == "unetr":
        _check(net.hidden_size > 0 and net.num_heads > 0 and net.hidden_size % net.num_heads == 0
               and net.mlp_dim > 0, f"{where}network: unetr needs hidden_size divisible by num_heads and mlp_dim > 0 "
               f"(has {net.hidden_size}, {net.num_heads}, {net.mlp_dim})")
        _check(len(net.input_size) == 3 and all(e > 0 and e % 16 == 0 for e in net.input_size),
               f"{where}network.input_size: {net.input_size}; unetr needs 3 edges, multiples of 16")
    _check(len(net.upsample_factor) == 3 and all(f >= 1 for f in net.upsample_factor),
           f"{where}network.upsample_factor: {net.upsample_factor}; expected 3 positive ints")
    if net.architecture == "patch_free":
        _check(0 < net.guidance_share <= 1 and net.reconstruction_weight >= 0,
               f"{where}network: patch_free needs guidance_share in (0, 1] and reconstruction_weight >= 0 (has "
               f"{net.guidance_share}, {net.reconstruction_weight})")
    else:
        _check(net.upsample_factor == [1, 1, 1], f"{where}network.upsample_factor: {net.upsample_factor}; only "
               "patch_free down-samples its input")
    _check(bool(p.stages), f"{where}stages: empty; expected a zoom_in and a zoom_out stage")
    stride = net.total_stride
    for i, st in enumerate(p.stages):
        _check(len(st.patch_size) == 3, f"{where}stages[{i}].patch_size: {st.patch_size}; expected 3 edges (z, y, x)")
        _check(all(e > 0 and e % s == 0 for e, s in zip(st.patch_size, stride)),
               f"{where}stages[{i}].patch_size: {st.patch_size} is not divisible by the network's total stride "
               f"{stride}")
        _check(st.batch_size >= 1, f"{where}stages[{i}].batch_size: {st.batch_size}; expected at least 1")
        _check(st.epochs >= 0 and st.iterations_per_epoch >= 1,
               f"{where}stages[{i}]: epochs {st.epochs} / iterations_per_epoch {st.iterations_per_epoch} out of range")
        _check(st.learning_rate > 0, f"{where}stages[{i}].learning_rate: {st.learning_rate}; expected > 0")
    _check(all(a in (0, 1, 2) for a in p.inference.mirror_axes),
           f"{where}inference.mirror_axes: {p.inference.mirror_axes}; expected axes among 0, 1, 2")
    t = p.training
    n_out = len(net.features) - 1 if net.deep_supervision else 1
    _check(len(t.deep_supervision_weights) == n_out and sum(t.deep_supervision_weights) > 0,
           f"{where}training.deep_supervision_weights: {len(t.deep_supervision_weights)} entries; the network has "
           f"{n_out} output(s)")
    a = t.augmentation
    for name in ("p_rotation", "p_scale", "p_noise", "p_blur", "p_brightness", "p_contrast", "p_low_resolution",
                 "p_gamma", "p_gamma_inverted"):
        _check(0 <= getattr(a, name) <= 1,
               f"{where}training.augmentation.{name}: {getattr(a, name)}; expected in [0, 1]")
    _check(len(a.rotation_degrees) == 3, f"{where}training.augmentation.rotation_degrees: expected 3 values (z, y, x)")
    for name in ("scale_range", "noise_variance", "blur_sigma", "brightness_range", "contrast_range",
                 "low_resolution_zoom", "gamma_range"):
        v = getattr(a, name)
        _check(len(v) == 2 and v[0] <= v[1], f"{where}training.augmentation.{name}: {v}; expected [low, high]")
    _check(all(x in (0, 1, 2) for x in a.mirror_axes),
           f"{where}training.augmentation.mirror_axes: {a.mirror_axes}; expected axes among 0, 1, 2")


def validate_plans(p: Plans) -> Plans:
    """Check what types cannot: consistent lengths, divisible patches, sensible numbers, in every configuration.

    Raises:
        SchemaError: naming the offending field.
    """
    _check(p.schema_version == SCHEMA_VERSION,
           f"schema_version: {p.schema_version}; this autoseg reads version {SCHEMA_VERSION} (re-run autoseg plan)")
    _check(len(p.target_spacing) == 3 and all(s > 0 for s in p.target_spacing),
           f"target_spacing: {p.target_spacing}; expected 3 positive numbers (mm)")
    _check(len(p.normalization) == len(p.channel_names), f"normalization: {len(p.normalization)} entries; "
           f"channel_names has {len(p.channel_names)}")
    _check(0 < p.inference.tile_step <= 1, f"inference.tile_step: {p.inference.tile_step}; expected in (0, 1]")
    names = configuration_names(p)
    _check(len(set(names)) == len(names), f"other_configurations: names {names} repeat")
    _check(p.default_configuration in names,
           f"default_configuration: {p.default_configuration!r}; the plan has {', '.join(names)}")
    n_fg = len(p.labels) - 1
    weights = {"training.dice_class_weights": p.training.dice_class_weights} | {
        f"other_configurations[{i}] ({c.name}).dice_class_weights": c.dice_class_weights
        for i, c in enumerate(p.other_configurations) if c.dice_class_weights is not None}
    for where, w in weights.items():
        _check(len(w) == n_fg and all(x >= 0 for x in w),
               f"{where}: {w}; expected {n_fg} non-negative weights (one per foreground class)")
    _validate_configuration(p, "")
    for i, c in enumerate(p.other_configurations):
        _validate_configuration(select_configuration(p, c.name), f"other_configurations[{i}] ({c.name}): ")
    t = p.training
    _check(0 <= t.oversample_foreground <= 1,
           f"training.oversample_foreground: {t.oversample_foreground}; expected in [0, 1]")
    _check(t.validation_iterations >= 1 and t.checkpoint_every_epochs >= 1,
           "training.validation_iterations and training.checkpoint_every_epochs: expected at least 1")
    for i, f in enumerate(p.folds):
        overlap = set(f.train) & set(f.val)
        _check(not overlap, f"folds[{i}]: case(s) {sorted(overlap)[:3]} are in both train and val")
    return p


def load_plans(path: str | Path) -> Plans:
    """Read, type-check and validate ``plans.json``.

    Raises:
        SchemaError: the message starts with the file and names the field.
    """
    path = Path(path)
    try:
        return validate_plans(from_jsonable(Plans, read_json(path)))
    except SchemaError as e:
        msg = str(e)
        raise SchemaError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def save_plans(plans: Plans, path: str | Path) -> None:
    """Validate and write ``plans`` atomically."""
    write_json_atomic(validate_plans(plans), path)
