"""Every tunable default of autoseg in one place, with where it comes from.

Values that a run actually uses are copied into ``plans.json``; changing a constant here changes
new plans only, never an existing run.
"""

from __future__ import annotations

from typing import Literal

# --- verification -----------------------------------------------------------------------------
#: relative tolerance on voxel spacing when image channels and label are compared
SPACING_RTOL = 1e-3
#: absolute tolerance on origin (mm); nnU-Net users hit float32 round-off of ~1e-4 mm (issue #1267)
ORIGIN_ATOL_MM = 1e-2
#: absolute tolerance on direction cosines
DIRECTION_ATOL = 1e-3

# --- fingerprint ------------------------------------------------------------------------------
#: seed of the foreground intensity sampler (nnU-Net uses 1234 too)
FINGERPRINT_SEED = 1234
#: total number of foreground intensity samples kept per channel over the whole dataset
FINGERPRINT_SAMPLES_TOTAL = 1_000_000
#: bump when the fingerprint content changes so that cached fingerprints are recomputed
FINGERPRINT_VERSION = 1

# --- planning: spacing and topology (nnU-Net v2's rules) ---------------------------------------
#: an axis is "strongly anisotropic" when its spacing exceeds this multiple of the others
ANISO_THRESHOLD = 3.0
#: smallest edge (voxels) of a feature map in the bottleneck
FEATUREMAP_MIN_EDGE = 4
#: smallest bottleneck edge (voxels) of a zoom-in patch: a training sub-volume of the planned network, which
#: may go below the planned minimum when the zoom-out patch is itself at that minimum (small CPU budgets)
ZOOM_IN_MIN_EDGE = 2
#: maximum number of poolings per axis
MAX_POOLINGS = 5
#: initial patch volume (voxels) before fitting to memory: 256^3 as in nnU-Net
INITIAL_PATCH_VOXELS = 256**3
#: share of the dataset's voxels one batch may cover at most (nnU-Net: 5 %)
MAX_DATASET_COVERED = 0.05
#: zoom-in patch volume as a share of the zoom-out patch volume (seed 000 used 24 % vs 48 % of its volumes)
ZOOM_IN_FRACTION = 0.5

# --- planning: network width per device kind ----------------------------------------------------
GPU_BASE_FEATURES = 32
GPU_MAX_FEATURES = 320
CPU_BASE_FEATURES = 16
CPU_MAX_FEATURES = 128
#: residual blocks per encoder stage (stage 0 first); the last value repeats for deeper stages.
#: GPUs: once the patch is capped by the median image, extra memory buys depth, as nnU-Net's ResEnc
#: presets do (M at 8 GB, L at 24 GB): (budget GiB at least, blocks), largest first.
GPU_BLOCKS_BY_BUDGET = ((20.0, (1, 3, 4, 6, 6, 6)), (10.0, (1, 2, 3, 4, 4, 4)), (0.0, (1, 2, 2, 2, 2, 2)))
CPU_BLOCKS_PER_STAGE = (1, 1, 1, 1, 1, 1)
#: our U-Nets channels-last on the CPU: oneDNN's 3D convolutions then skip their layout conversions;
#: training steps of the Hippocampus CPU plan took 0.563 s instead of 0.607 (zoom-in) and 1.139 s instead of
#: 1.257 (zoom-out) on a 2-core AVX2 EPYC host (``benchmarks/bench_speed.py step``, same run). GPU plans
#: stay contiguous (nnU-Net's layout; not measured here: ``benchmarks/gpu_check.py`` times both). The patch-free
#: network too, heads included: its steps on the 4-channel brain set's CPU plan took 0.35 s instead of 0.47
#: (zoom-in) and 0.51 s instead of 0.72 (zoom-out) on an idle 2-core host, its few-channel full-resolution heads
#: gaining most
CPU_CHANNELS_LAST = True
#: prediction on the CPU runs our U-Nets contiguous whatever layout they trained in (a copy of a channels-last
#: network is converted; the trainer's own keeps its layout): with mirrored copies in pairs, the network part of
#: prediction took 0.91x the channels-last time on 10 Hippocampus cases and 0.79x on 2 CHAOS cases (2d) on a
#: 2-core AVX2 host (``benchmarks/bench_speed.py predict``, same run, labels identical)
CPU_INFERENCE_CHANNELS_LAST = False
#: except the patch-free network, whose full-resolution heads are faster channels-last: one pass over a
#: preprocessed brain scan (139x199x169, 4 channels, idle host) took 2.8-3.0 s instead of 4.4-4.5 s (labels
#: identical to 1 voxel in 4.7 million); by tiles 4.3-4.8 s against 3.9-4.5 s contiguous (the one pass is the
#: default; the tiled path's heads take channels-last input either way)
PATCH_FREE_CPU_INFERENCE_CHANNELS_LAST = True
#: on a CPU with bfloat16 arithmetic (AMX or AVX512-BF16), prediction runs our residual U-Nets channels-last under
#: bfloat16 autocast (``autoseg predict --fp32`` opts out): on a 2-core AVX512+AMX host the network part of
#: prediction took 0.40x the float32 time on 10 Hippocampus cases and 0.44x on 2 CHAOS cases (2d), with 99.996 %
#: and 99.977 % of the labels the same and the same Dice to 4 digits (``benchmarks/bench_speed.py predict``);
#: on CPUs without it bfloat16 is emulated, so they stay in float32
CPU_INFERENCE_BFLOAT16 = True

# --- planning: memory and compute budget ----------------------------------------------------------
#: GiB of device memory kept aside for the CUDA context, cuDNN workspaces and allocator slack
GPU_RESERVED_GIB = 1.0
#: share of the remaining GPU memory a training step may plan to use
GPU_USABLE_SHARE = 0.85
#: share of physical RAM a CPU training step may plan to use
CPU_RAM_SHARE = 0.25
#: CPU: maximum floating-point operations of one training step (forward + backward = 3 x forward).
#: Calibrated on a 2-core x86 CPU (2026-11-25): the residual U-Net 16->128, batch 2, 40x56x40 costs 5.2e10
#: FLOPs and took 0.36-0.45 s per SGD step: a 30-minute budget buys ~4,000 steps.
CPU_MAX_STEP_FLOPS = 6.0e10
CPU_BATCH_SIZE = 2
MIN_BATCH_SIZE = 2

# --- planning: schedule ---------------------------------------------------------------------------
GPU_ITERATIONS_PER_EPOCH = 250
GPU_ZOOM_IN_EPOCHS = 800
CPU_ITERATIONS_PER_EPOCH = 50
CPU_ZOOM_IN_EPOCHS = 80
#: the zoom-out stage runs this share of the zoom-in epochs (seed 000: 150 / 1200)
ZOOM_OUT_EPOCH_SHARE = 1 / 8
#: the zoom-out stage starts at this share of the zoom-in learning rate (seed 000: 1e-4 / 1e-3)
ZOOM_OUT_LR_SHARE = 0.1
#: the optimiser and first learning rate per device kind, with poly decay (exponent 0.9). GPU plans: nnU-Net's SGD
#: (Nesterov, momentum 0.99) at 1e-2, made for its schedules of 250,000 steps. CPU plans: Adam at 3e-3 (seed 000's
#: optimiser), which learns far more per step in the few thousand steps a CPU budget buys: fold 0 of Hippocampus
#: after 15 CPU-minutes (800-900 steps), two seeds each: SGD 0.7988 / 0.8194, Adam 0.8382 / 0.8418
#: (``benchmarks/bench_train_budget.py RUN --minutes 15 --variants sgd adam --seeds 2024 7``, docs/training.md)
OPTIMIZER: dict[str, Literal["sgd", "adam"]] = {"cuda": "sgd", "cpu": "adam"}
LEARNING_RATE = {"cuda": 1e-2, "cpu": 3e-3}
MOMENTUM = 0.99
WEIGHT_DECAY = 3e-5
SCHEDULER: Literal["poly", "cosine_restarts", "onecycle"] = "poly"
#: poly decay exponent (nnU-Net): lr = lr0 * (1 - t / T) ** POLY_EXPONENT
POLY_EXPONENT = 0.9
#: cosine annealing with warm restarts (seed 000): cycles per stage, floor as a share of the initial LR
COSINE_CYCLES = 4
COSINE_MIN_SHARE = 0.01
#: OneCycle (seed 001, torch's defaults): warm-up share, start and end as divisions of the peak LR
ONECYCLE_WARMUP_SHARE = 0.3
ONECYCLE_DIV_START = 25.0
ONECYCLE_DIV_END = 1e4

# --- training: loss, sampling, bookkeeping ----------------------------------------------------------
#: Dice over the whole batch as one volume (nnU-Net: True for 3D full-resolution plans)
BATCH_DICE = True
#: smoothing of the soft Dice ratio (nnU-Net: 1e-5)
DICE_SMOOTH = 1e-5
#: probability that a training patch is centred on a voxel of a random foreground class (nnU-Net: 0.33)
OVERSAMPLE_FOREGROUND = 0.33
#: gradient norm clip (nnU-Net: 12)
GRAD_CLIP_NORM = 12.0
#: validation batches per epoch for the pseudo-Dice (nnU-Net: 50 of 250 training iterations)
GPU_VALIDATION_ITERATIONS = 50
CPU_VALIDATION_ITERATIONS = 10
#: write the ``latest`` checkpoint every this many epochs (and always on SIGINT / SIGTERM)
CHECKPOINT_EVERY_EPOCHS = 5
#: the ``best`` checkpoint follows an exponential moving average of pseudo-Dice (nnU-Net: 0.9)
EMA_MOMENTUM = 0.9
#: with a time budget, the final validation mirrors (test-time augmentation, as ``autoseg predict``) only if
#: that takes at most this share of the budget; otherwise it predicts without mirroring (recorded), which is
#: 2^(mirror axes) times cheaper
VALIDATION_TTA_MAX_BUDGET_SHARE = 0.25
#: ``autoseg find-best`` keeps mirroring at prediction only if, on the cross-validation cases, it raised the
#: mean per-case, per-class Dice by at least this much over the same network without mirroring: below that, it
#: buys nothing measurable for 2^(mirror axes) times the forward passes
MIRRORING_MIN_GAIN = 0.001
#: likewise, a patch-free network that segments scans in one pass predicts by tiles of its training region
#: instead only if, on the cross-validation cases (both without mirroring), tiles raised the mean Dice by at
#: least this much over the one pass
TILES_MIN_GAIN = 0.001
#: seed of patch sampling and augmentation; batch ``i`` depends on (seed, stage, i) only
TRAINING_SEED = 2024

# --- training: augmentation (nnU-Net v2's probabilities, ANCHORS.md 1.6) ------------------------------
P_ROTATION = 0.2
ROTATION_DEGREES = 30.0
#: rotation in-plane only, and by up to 180 degrees, when the patch is this much flatter than wide
DUMMY_2D_ASPECT = 3.0
#: N4 bias-field correction (``autoseg plan --bias-correction``): the field is fitted on a copy shrunk to about
#: this voxel size (mm), with this many fitting levels of this many iterations each
N4_SHRINK_MM = 4.0
N4_LEVELS = 3
N4_ITERATIONS = 50
#: the planner trains 2d by default when the 3d zoom-out patch sees less than this share of the median slice
THREE_D_MIN_INPLANE_SHARE = 0.25

# --- planning: MONAI configurations (autoseg plan --configs) ----------------------------------------
#: SegResNetDS encoder blocks per stage (MONAI's and Auto3DSeg's default); its width is the U-Net's base width
SEGRESNET_BLOCKS = (1, 2, 2, 4)
#: UNETR (feature size, hidden size, MLP size, heads): MONAI's defaults on a GPU; a quarter of the transformer's
#: width on a CPU, where MONAI's 768-wide ViT costs ~10x our U-Net per voxel
UNETR_GPU = (16, 768, 3072, 12)
UNETR_CPU = (16, 192, 768, 4)
#: configurations planned when --configs is not given, per device kind, with the reason the plan records
#: the patch-free configuration (:mod:`autoseg.networks.patchfree`) is planned by default when the 3d zoom-out
#: patch covers less than this share of the median (resampled) volume: sliding windows then see little of a scan
PATCH_FREE_MAX_SHARE = 0.25
#: its down-sampling factor on every axis whose spacing stays no coarser than the coarsest axis's
PATCH_FREE_FACTOR = 2
#: its guidance patch: this share of the low-resolution region per axis (an eighth of its voxels)
PATCH_FREE_GUIDANCE_SHARE = 0.5
#: weight of its super-resolution (image reconstruction) loss beside the segmentation losses (seed 004: 0.5)
PATCH_FREE_RECONSTRUCTION_WEIGHT = 0.5
#: predict a scan in one pass where it fits the memory budget, not by sliding the training region over it
PATCH_FREE_WHOLE_VOLUME = True
#: its Dice class weights when ``autoseg plan`` is not given ``--dice-weights`` (the other configurations: equal):
#: seed 001's size-rank weighting. With equal weights, its full-resolution heads learned the smallest class late
#: or not at all within a CPU budget, its low-resolution U-Net seeing a small class as a few voxels (measured on
#: the generated brain set, two seeds at equal steps: docs/planning.md)
PATCH_FREE_DICE_WEIGHTING: Literal["equal", "size-rank"] = "size-rank"
DEFAULT_CONFIGURATIONS = {
    "cpu": ("3d", "2d"),
    "cuda": ("3d", "2d", "segresnet", "attention_unet"),
}
P_SCALE = 0.2
SCALE_RANGE = (0.7, 1.4)
P_NOISE = 0.1
NOISE_VARIANCE = (0.0, 0.1)
P_BLUR = 0.2
BLUR_SIGMA = (0.5, 1.0)
P_BRIGHTNESS = 0.15
BRIGHTNESS_RANGE = (0.75, 1.25)
P_CONTRAST = 0.15
CONTRAST_RANGE = (0.75, 1.25)
P_LOW_RESOLUTION = 0.25
LOW_RESOLUTION_ZOOM = (0.5, 1.0)
P_GAMMA = 0.3
P_GAMMA_INVERTED = 0.1
GAMMA_RANGE = (0.7, 1.5)
#: where the augmentation runs, per device kind: in the data workers (batchgenerators), or on the training device
#: (:mod:`autoseg.training.device_augment`, torch). GPU plans augment on the GPU: a CPU worker makes one
#: 4-channel 160x224x192 sample of a 24 GiB plan in ~14 s (docs/training.md, "Feeding a GPU"), so no number of
#: workers feeds such a plan. CPU plans augment in the training process too: a sample takes torch, on the
#: process's threads, 5.5-11x less time than batchgenerators on a worker's one thread, whose work competes with
#: the step for the same cores anyway (Hippocampus: a step 0-8 % faster in process; the 4-channel brain set's
#: patch-free regions: one worker fed at most one step per 1.1-1.4 s, torch takes 0.12-0.15 s a batch); fold-0
#: Dice at equal steps did not drop (docs/training.md, "Where the augmentation runs")
AUGMENT_ON_DEVICE = {"cuda": True, "cpu": True}

# --- preprocessing -------------------------------------------------------------------------------
#: voxel coordinates kept per class and case for foreground oversampling during training
CLASS_LOCATIONS_PER_CLASS = 2000
#: seed of the class-location sampler (the case id is mixed in)
CLASS_LOCATIONS_SEED = 4321
#: bump when preprocessed files change meaning, so that reruns redo every case
PREPROCESSING_VERSION = 1

# --- splits and inference -------------------------------------------------------------------------
N_FOLDS = 5
SPLIT_SEED = 12345
TILE_STEP = 0.5
GAUSSIAN_SIGMA_SCALE = 1 / 8
