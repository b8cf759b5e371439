"""Predict scans with a trained run: preprocess as planned, sliding-window every fold's network, average the
probabilities, and take them back to the scan's own geometry through preprocessing's inverse transform.

A Python API for people who embed autoseg::

    from autoseg.inference.predictor import Predictor
    predictor = Predictor.from_run("runs/hippocampus")            # every trained fold, final checkpoints
    result = predictor.predict(image, spacing=(1.0, 1.0, 1.0))    # image (C, z, y, x) or (z, y, x)
    result.labels                                                 # (z, y, x), same shape as the image
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoseg.checkpoint import load_checkpoint
from autoseg.defaults import (
    CPU_INFERENCE_BFLOAT16,
    CPU_INFERENCE_CHANNELS_LAST,
    PATCH_FREE_CPU_INFERENCE_CHANNELS_LAST,
)
from autoseg.device import cpu_has_native_bfloat16, first_line, is_gpu_out_of_memory, is_out_of_memory
from autoseg.inference.patch_free_tiles import (
    HEADS_BLOCK_BYTES,
    HEADS_FALLBACK_SHARE,
    heads_by_blocks,
    mirrored_patch_free,
)
from autoseg.inference.postprocessing import Postprocessing, apply_postprocessing, load_postprocessing
from autoseg.inference.sliding_window import (
    CPU_ITEMS_PER_CALL,
    choose_cpu_calls,
    choose_sums_device,
    choose_tiles_per_batch,
    cpu_call_inputs,
    cuda_free_bytes,
    padded_shape,
    predict_logits,
    sums_bytes,
)
from autoseg.io import Geometry
from autoseg.networks import build_network
from autoseg.networks.patchfree import PatchFreeUNet, prediction_bytes
from autoseg.networks.resunet import ResidualUNet
from autoseg.planning.measured import network_step_cost
from autoseg.plans import PLANS_FILE, Plans, configuration_names, load_plans, select_configuration
from autoseg.preprocessing.transform import CaseProperties, forward, probabilities_to_labels, probabilities_to_original
from autoseg.runconfig import CONFIG_FILE, model_dir
from autoseg.tiling import mirror_combinations, tile_boxes

__all__ = ["Predictor", "Prediction", "trained_folds", "resolve_device", "PredictionMemoryError", "first_line",
           "fill_nonfinite"]

log = logging.getLogger(__name__)

CPU = torch.device("cpu")


def fill_nonfinite(image: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``image`` ``(C, z, y, x)`` with each channel's NaN and infinite voxels set to that channel's smallest
    finite value, and one line per channel changed (count and value).

    Raises:
        ValueError: a channel has no finite voxel at all.
    """
    bad = ~np.isfinite(image)
    if not bad.any():
        return image, []
    image, notes = image.copy(), []
    for c in range(image.shape[0]):
        n = int(bad[c].sum())
        if not n:
            continue
        if n == bad[c].size:
            raise ValueError(f"channel {c} has no finite voxel; nothing to replace its NaN/inf values with")
        low = float(image[c][~bad[c]].min())
        image[c][bad[c]] = low
        notes.append(f"channel {c}: {n} NaN/infinite voxel(s) set to the channel's minimum {low:g}")
    return image, notes


def _in_layout(net: nn.Module, device: torch.device, channels_last: bool | None) -> nn.Module:
    """``net`` in the memory layout prediction uses (see :class:`Predictor`'s ``channels_last``): ``net`` itself
    when it is in that layout or has no layout switch (MONAI's networks), else a converted copy."""
    current = getattr(net, "channels_last", None)
    if not isinstance(current, bool):
        return net
    on_cpu = PATCH_FREE_CPU_INFERENCE_CHANNELS_LAST if isinstance(net, PatchFreeUNet) else CPU_INFERENCE_CHANNELS_LAST
    want = channels_last if channels_last is not None else (on_cpu if device.type == "cpu" else current)
    if want == current:
        return net
    other = copy.deepcopy(net)
    other.to(memory_format=torch.channels_last_3d if want else torch.contiguous_format)  # type: ignore[call-overload]
    other.channels_last = want  # type: ignore[assignment]  # the flag ResidualUNet.forward reads
    return other


class PredictionMemoryError(RuntimeError):
    """A volume could not be predicted within the memory there is, after every fallback; the message is one
    line: what ran out, the volume, the patch, the device and what to do."""


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the first axis in place (``logits`` becomes the probabilities): no second K x volume."""
    logits -= logits.amax(0)
    logits.exp_()
    logits /= logits.sum(0)
    return logits


@dataclass
class Prediction:
    """Labels ``(z, y, x)`` in the input's array and, when asked for, class probabilities ``(K, z, y, x)``."""

    labels: np.ndarray
    probabilities: np.ndarray | None


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto``: CUDA when PyTorch sees a GPU, else the CPU.

    Raises:
        ValueError: ``cuda`` asked for but not available.
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to PyTorch (CPU-only build or no GPU)")
    if choice != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())  # an index: some CUDA queries need one
    return torch.device("cpu")


def trained_folds(run_dir: Path, checkpoint: str) -> list[str]:
    """Folds of ``run_dir`` that have ``checkpoint_<checkpoint>.pt``, in order."""
    names = sorted(p.name[len("fold_"):] for p in run_dir.glob("fold_*")
                   if (p / f"checkpoint_{checkpoint}.pt").is_file())
    return sorted(names, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))


class Predictor:
    """One or more trained networks of a run and how to apply them.

    Args:
        networks: ``(network, patch)`` per fold; the patch is the last trained stage's.
        tta: average over mirroring along the plan's mirror axes.
        step: sliding-window step as a share of the patch (default: the plan's).
        postprocessing: applied to the labels (``from_run`` loads the run's ``postprocessing.json``).
        channels_last: memory layout of our U-Nets during prediction (None: contiguous on the CPU,
            :data:`autoseg.defaults.CPU_INFERENCE_CHANNELS_LAST`, a patch-free network channels-last,
            :data:`~autoseg.defaults.PATCH_FREE_CPU_INFERENCE_CHANNELS_LAST`; as trained on a GPU); a network in the
            other layout is copied and converted, so the caller's keeps its own.
        whole_volume: a patch-free network planned with ``whole_volume_prediction`` segments a scan in one pass
            where it fits (:meth:`tile`); False slides its training region over the scan instead, as any other
            network does.
        bfloat16: run the networks under the CPU's bfloat16 autocast, channels-last unless ``channels_last``
            says otherwise (None: on a CPU with native bfloat16, :func:`~autoseg.device.cpu_has_native_bfloat16`,
            for our residual U-Nets, :data:`~autoseg.defaults.CPU_INFERENCE_BFLOAT16`; never on a GPU, whose
            precision the plan's ``amp`` sets). Recorded as ``self.bfloat16``.
        keep_layout: take the networks in the layout they have (they came from other predictors).
    """

    #: most inputs (mirrored copies, tiles) per network call on the CPU (1: one at a time)
    max_items_per_call = CPU_ITEMS_PER_CALL

    def __init__(self, plans: Plans, networks: list[tuple[nn.Module, list[int]]], device: torch.device,
                 tta: bool = True, step: float | None = None, postprocessing: Postprocessing | None = None,
                 channels_last: bool | None = None, whole_volume: bool = True, bfloat16: bool | None = None,
                 keep_layout: bool = False):
        if not networks:
            raise ValueError("a Predictor needs at least one network")
        if step is not None and not 0 < step <= 1:
            raise ValueError(f"step {step}: expected a share of the patch in (0, 1]")
        self.plans, self.device, self.postprocessing = plans, device, postprocessing
        if bfloat16 is None:
            bfloat16 = device.type == "cpu" and CPU_INFERENCE_BFLOAT16 and cpu_has_native_bfloat16() and all(
                isinstance(net, ResidualUNet) for net, _ in networks)
        self.bfloat16 = bfloat16 and device.type == "cpu"
        if self.bfloat16 and channels_last is None:
            channels_last = True  # bfloat16 on the CPU: channels-last measured 0.40x float32, contiguous 0.54x
        self.networks = networks if keep_layout else [(_in_layout(net, device, channels_last), patch)
                                                      for net, patch in networks]
        self.mirror_axes = list(plans.inference.mirror_axes) if tta else []
        self.step = plans.inference.tile_step if step is None else step
        self.whole_volume = whole_volume
        for net, _ in self.networks:
            net.to(device).eval()

    @classmethod
    def from_run(cls, run_dir: str | Path, folds: list[str] | None = None, checkpoint: str = "final",
                 device: str = "auto", tta: bool = True, step: float | None = None,
                 configuration: str | None = None, whole_volume: bool = True,
                 bfloat16: bool | None = None) -> Predictor:
        """Load the ``checkpoint`` of ``folds`` (default: every fold that has it) of ``configuration`` (default:
        the plan's) from ``run_dir``; ``whole_volume`` and ``bfloat16`` as in the class.

        Raises:
            ValueError: no such configuration, fold or checkpoint.
        """
        every = load_plans(Path(run_dir) / PLANS_FILE)
        plans = select_configuration(every, configuration)
        root, run_dir = Path(run_dir), model_dir(Path(run_dir), plans.configuration)
        available = trained_folds(run_dir, checkpoint)
        folds = available if folds is None else [str(f) for f in folds]
        if not folds:
            others = [n for n in configuration_names(every)
                      if n != plans.configuration and trained_folds(model_dir(root, n), checkpoint)]
            hint = f"; configuration {others[0]} has trained folds: add --config {others[0]}" if others else ""
            raise ValueError(f"{run_dir}: no fold of configuration {plans.configuration} has "
                             f"checkpoint_{checkpoint}.pt; train one with 'autoseg train 0 --run RUN_DIR --config "
                             f"{plans.configuration}'{hint}")
        missing = [f for f in folds if f not in available]
        if missing:
            raise ValueError(f"{run_dir}: fold(s) {', '.join(missing)} have no checkpoint_{checkpoint}.pt "
                             f"(trained: {', '.join(available) or 'none'})")
        dev = resolve_device(device)
        nets = []
        for f in folds:
            fold_dir = run_dir / f"fold_{f}"
            net = build_network(plans.network, len(plans.channel_names), len(plans.labels))
            net.load_state_dict(load_checkpoint(fold_dir / f"checkpoint_{checkpoint}.pt", dev)["network"])
            config = json.loads((fold_dir / CONFIG_FILE).read_text())
            nets.append((net, list(config["stages"][-1]["patch_size"])))
        return cls(plans, nets, dev, tta, step, load_postprocessing(run_dir), whole_volume=whole_volume,
                   bfloat16=bfloat16)

    def predict(self, image: np.ndarray, spacing: tuple[float, float, float] | None = None,
                geometry: Geometry | None = None, probabilities: bool = False) -> Prediction:
        """Segment one scan.

        Args:
            image: ``(C, z, y, x)``, or ``(z, y, x)`` for one channel, in the scan's intensities.
            spacing: voxel size in array order (z, y, x) mm; or give ``geometry`` (from :func:`autoseg.io.read_image`).
            probabilities: also return class probabilities.

        Raises:
            ValueError: wrong number of channels, not 3D, non-finite values, or no spacing.
        """
        data, props = self.preprocess(image, spacing, geometry)
        return self.finish(self.predict_preprocessed(data), props, probabilities)

    def preprocess(self, image: np.ndarray, spacing: tuple[float, float, float] | None = None,
                   geometry: Geometry | None = None) -> tuple[np.ndarray, CaseProperties]:
        """Check the scan and preprocess it as planned (first step of :meth:`predict`)."""
        image = np.asarray(image)
        if image.ndim == 3:
            image = image[None]
        n_ch = len(self.plans.channel_names)
        if image.ndim != 4 or image.shape[0] != n_ch:
            raise ValueError(f"image of shape {list(image.shape)}: the run expects {n_ch} channel(s) "
                             f"{self.plans.channel_names} as (C, z, y, x)")
        if not np.isfinite(image).all():
            n_nan = int(np.isnan(image).sum())
            raise ValueError(f"contains {n_nan} NaN and {int((~np.isfinite(image)).sum()) - n_nan} infinite voxel(s) "
                             f"of {image.size}; predict with --fix-nonfinite to replace them with each channel's "
                             "minimum")
        if geometry is None:
            if spacing is None:
                raise ValueError("give the voxel spacing (z, y, x) in mm, or a geometry")
            geometry = Geometry(tuple(float(s) for s in spacing[::-1]), (0.0, 0.0, 0.0),  # type: ignore[arg-type]
                                (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), tuple(image.shape[1:]))
        data, _, _, props = forward(image.astype(np.float32, copy=False), None, geometry, self.plans)
        return data, props

    def finish(self, probs: np.ndarray, props: CaseProperties, probabilities: bool = False) -> Prediction:
        """Probabilities at the plan's spacing back to the scan's grid, arg-max, post-processing (last step).
        Without ``probabilities`` the arg-max runs class by class, so a large scan never holds all its class
        probabilities at full resolution."""
        values = sorted(self.plans.labels)
        full = None
        if probabilities:
            full = probabilities_to_original(probs, props, self.plans.resampling)
            labels = np.asarray(values, dtype=np.uint8 if max(values) < 256 else np.uint16)[full.argmax(0)]
        else:
            labels = probabilities_to_labels(probs, props, self.plans.resampling, values)
        return Prediction(apply_postprocessing(labels, self.postprocessing), full)

    def predict_preprocessed(self, data: np.ndarray) -> np.ndarray:
        """Class probabilities ``(K, ...)`` of a preprocessed case, averaged over the networks.

        Raises:
            PredictionMemoryError: out of memory after every fallback of :meth:`_logits`.
        """
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        total: torch.Tensor | None = None
        for net, planned in self.networks:
            patch = self.tile(planned, list(x.shape[1:]))
            message = None
            try:
                p = _softmax_(self._logits(net, x, patch, self._cpu_calls(patch, planned, list(x.shape[1:]))))
                total = p if total is None else total.add_(p)
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                if log.isEnabledFor(logging.DEBUG):  # as text: a kept record would pin the frames and their tensors
                    log.debug("out of memory:\n%s", "".join(traceback.format_exception(e)))
                message = self._memory_message(e, list(x.shape), patch)
            if message is not None:  # raised here, not in the except block: the traceback would pin the tensors
                total = None
                raise PredictionMemoryError(message)
        assert total is not None
        return total.div_(len(self.networks)).numpy()

    def tile(self, patch: list[int], shape: list[int]) -> list[int]:
        """The sliding window's tile for a preprocessed ``shape``: the trained ``patch``; for a patch-free
        network planned with ``whole_volume_prediction``, the whole volume (rounded up to its total stride) when
        :func:`~autoseg.networks.patchfree.prediction_bytes` of it fits the plan's memory budget, so one pass
        segments the scan (unless this predictor was made without ``whole_volume``)."""
        net = self.plans.network
        if net.architecture != "patch_free" or not net.whole_volume_prediction or not self.whole_volume:
            return patch
        whole = [max(p, -(-s // t) * t) for p, s, t in zip(patch, shape, net.total_stride)]
        need = prediction_bytes(net.features, net.upsample_factor, whole, len(self.plans.channel_names),
                                len(self.plans.labels))
        return whole if need <= self.plans.memory_budget_gib * 2**30 else patch

    def call_inputs(self, tile: list[int], planned: list[int]) -> int:
        """Most inputs per network call on the CPU (:func:`cpu_call_inputs`, at most ``max_items_per_call``),
        bounded by the batch of the plan's stage trained at the ``planned`` patch (1 if no stage was); 1 on a
        GPU, which batches tiles by its free memory instead (:meth:`_gpu_layout`)."""
        if self.device.type != "cpu":
            return 1
        batch = next((st.batch_size for st in self.plans.stages if list(st.patch_size) == list(planned)), 1)
        return cpu_call_inputs(tile, planned, batch, self.max_items_per_call)

    def _cpu_calls(self, tile: list[int], planned: list[int], shape: list[int]) -> tuple[int, int]:
        """``(tiles, mirrored copies)`` per network call for a preprocessed volume of spatial ``shape``."""
        n_tiles = len(tile_boxes(padded_shape(shape, tile), tile, self.step))
        return choose_cpu_calls(self.call_inputs(tile, planned), len(mirror_combinations(self.mirror_axes)), n_tiles)

    def _memory_message(self, exc: BaseException, shape: list[int], patch: list[int]) -> str:
        """One line: what ran out, for which volume, patch and device, and what to do."""
        k = len(self.plans.labels)
        need = sums_bytes(k, shape[0], padded_shape(shape[1:], patch)) / 2**30
        where = f"{self.device}" if self.device.type == "cpu" else (
            f"{self.device} (sums in RAM and the network on the CPU were tried too)")
        volume = (f"a {'x'.join(map(str, shape[1:]))} volume (after preprocessing, {shape[0]} channel(s), {k} "
                  f"classes) with patch {'x'.join(map(str, patch))} on {where}")
        if is_gpu_out_of_memory(exc):
            return (f"out of GPU memory predicting {volume} ({first_line(exc)}); free the GPU of other processes "
                    f"or predict with --device cpu")
        folds = " or with fewer folds (--folds 0)" if len(self.networks) > 1 else ""
        return (f"out of memory (RAM) predicting {volume}: its sums and input alone take {need:.1f} GiB; free "
                f"RAM (other programs, fewer runs at once), predict on a machine with more RAM{folds}")

    def _gpu_layout(self, x: torch.Tensor, patch: list[int], low_resolution: bool = False) -> tuple[torch.device, int]:
        """Where the sums live and how many tiles go through the network at once, decided from the GPU's
        free memory before any tile runs (:func:`choose_sums_device`, :func:`choose_tiles_per_batch`).

        One tile's forward memory is estimated by the training memory model's ``activation_bytes``: what a
        training step keeps for backward, which bounds what a forward pass without gradients holds at once.
        ``low_resolution``: ``x`` and ``patch`` are the scan averaged down and the region divided by the factor
        that a patch-free network's U-Net alone slides over (:meth:`_logits`): its sums are its features and
        logits, its tiles the U-Net's alone.
        """
        k, c, net = len(self.plans.labels), x.shape[0], self.plans.network
        shape, sums = list(x.shape[1:]), k
        if low_resolution:
            net = dataclasses.replace(net, architecture="residual_unet", upsample_factor=[1, 1, 1])
            sums = net.features[0] + k
        padded = padded_shape(shape, patch)
        free = cuda_free_bytes(self.device)
        need = sums_bytes(sums, c, padded)
        on_gpu = choose_sums_device(need, free) == "cuda"
        per_tile = network_step_cost(net, patch, 1, c, k, self.plans.amp).activation_bytes
        n_tiles = len(tile_boxes(padded, patch, self.step))
        batch = choose_tiles_per_batch(per_tile, free - need if on_gpu else free, n_tiles, "cuda")
        log.debug("GPU: %.2f GiB free; sums %.2f GiB in %s; %d tile(s) of %d per batch (%.2f GiB each)",
                  free / 2**30, need / 2**30, "GPU memory" if on_gpu else "RAM", batch, n_tiles, per_tile / 2**30)
        return (self.device if on_gpu else CPU), batch

    def _logits(self, net: nn.Module, x: torch.Tensor, patch: list[int],
                cpu_calls: tuple[int, int] = (1, 1)) -> torch.Tensor:
        """Sliding-window logits ``(K, *spatial)``, float32 on the CPU; ``cpu_calls`` tiles and mirrored copies
        per network call on the CPU (:meth:`_cpu_calls`; a GPU batches tiles by its free memory instead).

        A patch-free network that needs several tiles slides its U-Net alone over each mirrored copy of the scan
        at low resolution (:meth:`_slide`) and runs its full-resolution heads over the blended features
        (:meth:`_heads`), as :func:`~autoseg.inference.patch_free_tiles.predict_patch_free_tiles` does, each part
        with its own fallbacks on a GPU, so that running out of memory in the heads does not repeat the U-Net's
        pass; a rung that ran out of memory for one copy is not tried again for the next. On the CPU a call's
        inputs are tiles (each copy slides unmirrored).

        Raises:
            RuntimeError: the network on the CPU, the last rung, fails too (out of RAM or otherwise).
        """
        several = len(tile_boxes(padded_shape(list(x.shape[1:]), patch), patch, self.step)) > 1
        if not (isinstance(net, PatchFreeUNet) and several):
            return self._slide(net, x, patch, cpu_calls)
        calls = (cpu_calls[0] * cpu_calls[1], 1)
        slide_failed: set[str] = set()
        heads_failed: set[int] = set()

        def slide(body: nn.Module, low: torch.Tensor, low_patch: list[int]) -> torch.Tensor:
            return self._slide(body, low, low_patch, calls, low_resolution=True, failed=slide_failed)

        def heads(net: PatchFreeUNet, blended: torch.Tensor) -> torch.Tensor:
            return self._heads(net, blended, heads_failed)
        return mirrored_patch_free(net, x, patch, self.mirror_axes, slide, heads)

    def _slide(self, net: nn.Module, x: torch.Tensor, patch: list[int], cpu_calls: tuple[int, int],
               low_resolution: bool = False, failed: set[str] | None = None) -> torch.Tensor:
        """:func:`predict_logits` of ``net`` over ``x``, mirrored along the predictor's axes
        (``low_resolution``: a patch-free network's U-Net over one copy of the scan averaged down, unmirrored,
        :meth:`_gpu_layout`).

        On a GPU, the fallback chain is: sums in GPU memory -> sums in RAM -> the network on the CPU. The first
        rung is only tried when :meth:`_gpu_layout` finds that the sums fit the free GPU memory, and only the
        first rung tried batches tiles; after an out-of-memory error the next rung runs one tile at a time. The
        cache is emptied after leaving the ``except`` block: inside it, the exception's traceback still holds
        the failed attempt's frames and so its GPU tensors, and ``empty_cache`` could free nothing. ``failed``
        collects the rungs that ran out of memory and skips them (shared by the calls for one scan); tiles are
        batched only while none has.
        """
        failed = set() if failed is None else failed
        mirror_axes = [] if low_resolution else self.mirror_axes
        args = (x, patch, self.step, mirror_axes, self.plans.inference.gaussian_sigma_scale)
        if self.device.type != "cuda":
            return predict_logits(net, *args, self.device, cpu_calls[0], flips_per_call=cpu_calls[1],
                                  cpu_bfloat16=self.bfloat16)
        sums_on, batch = self._gpu_layout(x, patch, low_resolution)
        shape = "x".join(map(str, x.shape[1:]))
        if sums_on.type == "cpu":
            log.info("keeping the sums of the %s volume in RAM: they do not fit the free GPU memory", shape)
        rungs = [r for r in ([self.device] if sums_on.type == "cuda" else []) + [CPU] if r.type not in failed]

        def attempt(acc_on: torch.device) -> Callable[[], torch.Tensor]:
            return lambda: predict_logits(net, *args, self.device, 1 if failed else batch, self.plans.amp, acc_on)

        def warn(acc_on: str, failure: str, more: bool) -> None:
            log.warning("GPU out of memory for the %s volume with the sums in %s (%s): %s", shape,
                        "GPU memory" if acc_on == "cuda" else "RAM", failure,
                        "keeping the sums in RAM" if more else "predicting it on the CPU")
        return self._down_the_ladder(net, [(r.type, attempt(r)) for r in rungs], failed, warn,
                                     lambda: predict_logits(net, *args, CPU))

    def _heads(self, net: PatchFreeUNet, blended: torch.Tensor, failed: set[int] | None = None) -> torch.Tensor:
        """:func:`heads_by_blocks` of the blended low-resolution features; on a GPU, after an out-of-memory
        error, again in blocks of :data:`HEADS_FALLBACK_SHARE` of the memory, then on the CPU (the cache
        emptied outside the ``except`` block, as in :meth:`_slide`; ``failed``: the block budgets that ran out
        of memory for an earlier copy of the scan, skipped)."""
        if self.device.type != "cuda":
            return heads_by_blocks(net, blended, self.device)
        failed = set() if failed is None else failed
        budgets = [b for b in (HEADS_BLOCK_BYTES, int(HEADS_BLOCK_BYTES * HEADS_FALLBACK_SHARE)) if b not in failed]

        def attempt(budget: int) -> Callable[[], torch.Tensor]:
            return lambda: heads_by_blocks(net, blended, self.device, self.plans.amp, budget)

        def warn(budget: int, failure: str, more: bool) -> None:
            log.warning("GPU out of memory in the patch-free heads with blocks of %d MiB (%s): %s", budget >> 20,
                        failure, "smaller blocks" if more else "running them on the CPU")
        return self._down_the_ladder(net, [(b, attempt(b)) for b in budgets], failed, warn,
                                     lambda: heads_by_blocks(net, blended, CPU))

    def _down_the_ladder(self, net: nn.Module, rungs: list[tuple[Any, Callable[[], torch.Tensor]]], failed: set[Any],
                         warn: Callable[[Any, str, bool], None], last: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The first of ``rungs`` (a key and an attempt each, on the GPU) that does not run out of GPU memory;
        after each that does, its key is added to ``failed``, the cache emptied (outside the ``except`` block,
        whose traceback still holds the attempt's GPU tensors) and ``warn(key, first line, rungs left)`` called;
        after all of them, ``last()`` with ``net`` on the CPU. Other errors propagate."""
        for i, (key, run) in enumerate(rungs):
            try:
                return run()
            except RuntimeError as e:
                if not is_gpu_out_of_memory(e):
                    raise
                failure = first_line(e)
            failed.add(key)
            torch.cuda.empty_cache()
            warn(key, failure, i + 1 < len(rungs))
        return self._on_cpu(net, last)

    def _on_cpu(self, net: nn.Module, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``run()`` with ``net`` moved to the CPU, and back to the device afterwards (the last rung)."""
        net.to(CPU)
        try:
            return run()
        finally:
            net.to(self.device)
