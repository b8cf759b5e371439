"""A fold's own validation: predict its validation cases from the preprocessed arrays with the same
sliding-window path as ``autoseg predict``, take them back to the original geometry, and score them against
the original labels with ``autoseg evaluate``'s metrics. A mirrored validation also scores each case without
mirroring (the Dice only), so that ``autoseg find-best`` can decide whether mirroring pays for its cost; a
patch-free network that segments cases in one pass is also scored sliding its training region over them
(without mirroring, the Dice only), so that find-best can decide whether the one pass loses accuracy."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from autoseg.atomic import atomic_path, remove_temporaries
from autoseg.dataset import load_dataset
from autoseg.evaluation.evaluate import METRICS, dice_score, score_case
from autoseg.fingerprint import FINGERPRINT_FILE, load_fingerprint
from autoseg.inference.patch_free_tiles import LowResolutionBody, heads_by_blocks, low_resolution_tiles
from autoseg.inference.predictor import PredictionMemoryError, Predictor
from autoseg.inference.sliding_window import padded_shape
from autoseg.io import read_image, write_image
from autoseg.networks.patchfree import PatchFreeUNet
from autoseg.plans import Plans
from autoseg.preprocessing.run import PREPROCESSED_DIR
from autoseg.preprocessing.storage import read_case_arrays, read_properties, stored_references
from autoseg.preprocessing.transform import CaseProperties
from autoseg.tiling import mirror_combinations, tile_boxes
from autoseg.typedjson import write_json_atomic

__all__ = ["validate_fold", "reference_labels", "check_references", "validation_cost", "ValidationCost",
           "VALIDATION_DIR", "PROBABILITIES_DIR", "save_grid_probabilities", "load_grid_probabilities",
           "validated_folds", "unmirrored_dice"]

VALIDATION_DIR = "validation"
#: under ``validation/``: each case's class probabilities on the preprocessed grid, for ``autoseg find-best``
PROBABILITIES_DIR = "probabilities"
_clock = time.perf_counter  # what validation_seconds times with (a test replaces it)


def save_grid_probabilities(probs: np.ndarray, path: Path) -> None:
    """Class probabilities ``(K, z, y, x)`` on the preprocessed grid, float16, compressed, atomically. Every
    configuration of a plan shares that grid, so find-best averages them directly and takes the mean back to the
    scan's grid as prediction does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, probabilities=probs.astype(np.float16))


def load_grid_probabilities(path: Path) -> np.ndarray:
    """What :func:`save_grid_probabilities` wrote, as float32.

    Raises:
        ValueError: missing, truncated or not such a file.
    """
    try:
        with np.load(path) as z:
            return z["probabilities"].astype(np.float32)
    except (OSError, KeyError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a validation probabilities file ({e}); validate the fold again with "
                         "autoseg train (a trained fold only re-validates)") from None


def validated_folds(folder: Path) -> list[Path]:
    """The cross-validation fold folders of one configuration (``fold_all`` excluded) that have
    ``validation/metrics.json``, in name order."""
    return sorted(p for p in folder.glob("fold_*")
                  if p.name != "fold_all" and (p / VALIDATION_DIR / "metrics.json").is_file())


def reference_labels(run_dir: Path) -> dict[str, Path]:
    """Original label file of every training case: the copy ``autoseg preprocess`` keeps in the run, else (runs
    preprocessed before it kept copies) the file in the dataset folder, if that is still where it was planned."""
    refs = stored_references(run_dir / PREPROCESSED_DIR)
    dataset = Path(load_fingerprint(run_dir / FINGERPRINT_FILE).dataset_dir)
    if (dataset / "dataset.json").is_file():
        for c in load_dataset(dataset).cases:
            refs.setdefault(c.case_id, c.label)
    return refs


def check_references(run_dir: Path, case_ids: list[str]) -> None:
    """Make sure every case in ``case_ids`` has its original label to be scored against (before training, so
    that a run moved without its dataset fails now and not after hours of training).

    Raises:
        ValueError: names the first missing case and what to do.
    """
    refs = reference_labels(run_dir)
    missing = [c for c in case_ids if c not in refs or not refs[c].is_file()]
    if missing:
        dataset = load_fingerprint(run_dir / FINGERPRINT_FILE).dataset_dir
        raise ValueError(f"{run_dir}: no original label for {len(missing)} validation case(s) (e.g. {missing[0]}): "
                         f"the run keeps none (preprocessed by an older autoseg) and the dataset is not at {dataset} "
                         f"any more; put it back there and run autoseg preprocess {run_dir} once, which stores copies")


def validate_fold(run_dir: Path, fold_dir: Path, plans: Plans, case_ids: list[str], net: nn.Module,
                  patch: list[int], device: torch.device, progress: bool = True, tta: bool = True,
                  tiles: bool = True) -> dict:
    """Predict ``case_ids`` (mirroring as ``predict`` unless not ``tta``), write their label maps, their
    probabilities on the preprocessed grid (``probabilities/``, for find-best) and ``metrics.json`` to
    ``fold_dir/validation``; returns the metrics: per case and class the five metrics of ``autoseg evaluate``,
    per-class mean Dice by class name, the mean over foreground classes, and whether the predictions were
    mirrored. Per case and class also the voxel counts ``tp``, ``fp``, ``fn`` (for the micro-Dice). With
    ``tta``, ``without_mirroring`` holds the same cases' Dice predicted without mirroring (one more forward pass
    per tile; per case and class, the per-class means and their mean). ``one_pass_cases`` lists the cases the
    network segmented in one pass (:meth:`Predictor.tile`: a patch-free network's whole volume); with ``tiles``,
    ``tiled_without_mirroring`` holds those cases' Dice predicted by sliding the trained ``patch`` without
    mirroring, to compare with ``without_mirroring`` (or, unmirrored, the main Dice) at equal mirroring."""
    out_dir = fold_dir / VALIDATION_DIR
    out_dir.mkdir(exist_ok=True)
    for folder in (out_dir, out_dir / PROBABILITIES_DIR):  # what a validation that was killed was writing
        remove_temporaries(folder)
    refs = reference_labels(run_dir)
    folder = run_dir / PREPROCESSED_DIR
    classes = sorted(plans.labels)[1:]
    predictor = Predictor(plans, [(net, patch)], device, tta=tta)
    plain = Predictor(plans, [(net, patch)], device, tta=False) if tta and predictor.mirror_axes else None
    tiled: Predictor | None = None  # made for the first case predicted in one pass
    cases: dict[str, dict[str, dict[str, float]]] = {}
    unmirrored: dict[str, dict[str, float]] = {}
    by_tiles: dict[str, dict[str, float]] = {}
    one_pass: list[str] = []
    for cid in tqdm(case_ids, desc="validation", unit="case", disable=not progress, leave=False):
        props = read_properties(folder, cid)
        data = np.asarray(read_case_arrays(folder, cid)[0][:])
        whole = predictor.tile(patch, list(data.shape[1:])) != list(patch)
        if whole:
            one_pass.append(cid)
        probs = _predicted(predictor, data, cid)
        save_grid_probabilities(probs, out_dir / PROBABILITIES_DIR / f"{cid}.npz")
        seg = predictor.finish(probs, props).labels
        write_image(seg, props.geometry, out_dir / f"{cid}.nii.gz")
        ref = read_image(refs[cid])[0][0]
        cases[cid] = {}
        for c in classes:
            s = score_case(cid, seg, ref, c, props.geometry.spacing_zyx)
            cases[cid][plans.labels[c]] = {**{m: getattr(s, m) for m in METRICS}, "tp": s.tp, "fp": s.fp, "fn": s.fn}
        del probs  # one case's probabilities in memory at a time, as without the predictions below
        if plain is not None:
            seg = plain.finish(_predicted(plain, data, cid), props).labels
            unmirrored[cid] = {plans.labels[c]: dice_score(seg, ref, c) for c in classes}
        if whole and tiles:
            tiled = tiled or Predictor(plans, [(net, patch)], device, tta=False, whole_volume=False)
            seg = tiled.finish(_predicted(tiled, data, cid), props).labels
            by_tiles[cid] = {plans.labels[c]: dice_score(seg, ref, c) for c in classes}
    metrics = {"metric": "Dice (and autoseg evaluate's metrics per case)", "cases": cases,
               **_means({k: {n: v["dice"] for n, v in per.items()} for k, per in cases.items()}), "mirroring": tta}
    if plain is not None:
        metrics["without_mirroring"] = {"cases": unmirrored, **_means(unmirrored)}
    metrics["one_pass_cases"] = one_pass
    if by_tiles:
        metrics["tiled_without_mirroring"] = {"cases": by_tiles, **_means(by_tiles)}
    write_json_atomic(metrics, out_dir / "metrics.json")
    return metrics


def _predicted(predictor: Predictor, data: np.ndarray, case_id: str) -> np.ndarray:
    """``predictor``'s probabilities for one validation case.

    Raises:
        ValueError: out of memory (one line naming the case and what to do).
    """
    try:
        return predictor.predict_preprocessed(data)
    except PredictionMemoryError as e:  # one line from the CLI, like every error a user can act on
        raise ValueError(f"validation of case {case_id}: {e}; the trained checkpoint_final.pt is kept: run the same "
                         "command again (with --device cpu if the GPU is too small) to validate") from None


def unmirrored_dice(metrics: dict) -> dict[str, dict[str, float]]:
    """Case -> class name -> Dice of a validation's prediction without mirroring: ``without_mirroring`` when it
    mirrored, else its main Dice."""
    plain = metrics.get("without_mirroring")
    if plain is not None:
        return plain["cases"]
    return {c: {k: v["dice"] for k, v in per.items()} for c, per in metrics["cases"].items()}


def _means(dice: dict[str, dict[str, float]]) -> dict:
    """``mean_per_class`` (class name -> mean Dice over the cases) and ``mean_foreground_dice`` of per-case Dice."""
    names = list(next(iter(dice.values()))) if dice else []
    means = {n: float(np.mean([per[n] for per in dice.values()])) for n in names}
    return {"mean_per_class": means, "mean_foreground_dice": float(np.mean(list(means.values()))) if means else 0.0}


@dataclass
class ValidationCost:
    """Measured cost of a fold validation: forward passes and the rest (back to the grid, written, scored).
    A mirrored validation (more than one flip) also predicts every case once without mirroring and takes it back
    to the scan's grid (``finish_seconds``, a part of ``rest_seconds``) to score its Dice. ``item_seconds`` is one
    input's share of a network call that takes several (on the CPU, :meth:`Predictor.call_inputs`: mirrored
    copies of a tile, or without mirroring the tiles of a case that has several); None: one input at a time,
    ``forward_seconds`` each. ``lone_tiles`` counts the tiles of cases that have only one: unmirrored, such a
    tile goes through the network alone. ``tiled_seconds``: the extra prediction of the cases a patch-free network
    segments in one pass, by tiles of the trained patch without mirroring, back to the grid and scored.

    Cases a patch-free network predicts by several tiles
    (:func:`~autoseg.inference.patch_free_tiles.predict_patch_free_tiles`) are not in ``tiles``:
    ``low_resolution_seconds`` is one unmirrored prediction of them (their U-Net's low-resolution tiles and
    their full-resolution heads), which a mirrored prediction repeats per mirrored copy
    (:func:`~autoseg.inference.patch_free_tiles.mirrored_patch_free`)."""

    #: tiles of every case not predicted by low-resolution tiles, counted in tiles of the size
    #: ``forward_seconds`` was measured at
    tiles: float
    flips: int
    forward_seconds: float
    rest_seconds: float
    finish_seconds: float = 0.0
    item_seconds: float | None = None
    lone_tiles: float = 0.0
    tiled_seconds: float = 0.0
    low_resolution_seconds: float = 0.0

    def seconds(self, tta: bool, tiles: bool = True) -> float:
        """The validation's seconds, mirrored or not (``tta``), with or without the tiled prediction of the cases
        a patch-free network segments in one pass (``tiles``)."""
        item = self.forward_seconds if self.item_seconds is None else self.item_seconds
        low = self.low_resolution_seconds
        unmirrored = self.lone_tiles * self.forward_seconds + (self.tiles - self.lone_tiles) * item + low
        extra = self.tiled_seconds if tiles else 0.0
        if not tta or self.flips == 1:
            return unmirrored + self.rest_seconds + extra
        mirrored = self.flips * (self.tiles * item + low)
        return mirrored + unmirrored + self.rest_seconds + self.finish_seconds + extra


def validation_cost(run_dir: Path, plans: Plans, case_ids: list[str], net: nn.Module, patch: list[int],
                    device: torch.device) -> ValidationCost:
    """What :func:`validate_fold` will cost for ``case_ids`` on this machine, measured in ~10 s.

    Prediction: the tiles of every case (from its shape after preprocessing) x the mirrorings (+ 1 for the
    unmirrored prediction a mirrored validation also scores) x the measured seconds of one forward pass of
    ``net`` (median of 3; its weights do not matter for the time); where the predictor puts several inputs in
    one call (mirrored copies; tiles of a case without mirroring), an input costs its share of such a call,
    measured the same way. A case a patch-free network predicts by several tiles costs, per mirrored copy, its
    low-resolution tiles x the U-Net's forward seconds on one (its share of a call) plus the full-resolution
    heads (their seconds on one region's features, scaled by the case's voxels). Cases a
    patch-free network segments in one pass are also predicted by tiles of the trained patch, unmirrored,
    priced the same way (the whole network per tile if the network is not a patch-free one), plus their way
    back to the grid. The rest (probabilities saved, back to the scan's grid, written, scored): timed on
    the case of median size after one untimed run (its first-time imports would otherwise be scaled to every
    case), scaled to the others by their voxel count; it is fed a random probability map and scores the
    reference against itself, because a trained network's prediction is close to the reference while a random
    network's noise would make the surface distances slower than they will be. On a GPU that batches tiles this
    overestimates.
    """
    folder = run_dir / PREPROCESSED_DIR
    props = {c: read_properties(folder, c) for c in case_ids}
    predictor = Predictor(plans, [(net, patch)], device, tta=True)
    flips = len(mirror_combinations(predictor.mirror_axes))
    shapes = {c: list(p.shape_after_resampling) for c, p in props.items()}
    sizes = {c: prod(s) for c, s in shapes.items()}
    probe = sorted(case_ids, key=lambda c: (sizes[c], c))[len(case_ids) // 2]
    # a patch-free network predicting whole volumes has one tile per case, of the case's size: its forward time
    # is measured at the median case's and scaled by voxels to the others
    tile = {c: predictor.tile(patch, s) for c, s in shapes.items()}
    n_tiles = {c: len(tile_boxes(padded_shape(s, tile[c]), tile[c], predictor.step)) for c, s in shapes.items()}
    inference_net = predictor.networks[0][0]  # in the layout prediction uses
    low_net = inference_net if isinstance(inference_net, PatchFreeUNet) else None
    by_low = [c for c in case_ids if low_net is not None and n_tiles[c] > 1]  # Predictor._logits: U-Net, heads
    direct = [c for c in case_ids if c not in by_low]  # through the whole network, tile by tile
    timed = sorted(direct, key=lambda c: (sizes[c], c))[len(direct) // 2] if direct else probe
    share = {c: prod(tile[c]) / prod(tile[timed]) for c in direct}
    tiles = sum(n_tiles[c] * share[c] for c in direct)
    lone = sum(share[c] for c in direct if n_tiles[c] == 1)
    shape = [len(plans.channel_names), *tile[timed]]
    forward, item = 0.0, None
    if direct:
        forward = _forward_seconds(inference_net, shape, device, plans.amp)
        inputs = predictor.call_inputs(tile[timed], patch)
        item = None if inputs == 1 else _forward_seconds(inference_net, shape, device, plans.amp, inputs) / inputs
    ref = read_image(reference_labels(run_dir)[probe])[0][0]
    _rest_seconds(predictor, props[probe], ref)  # untimed: first-time imports would be scaled to every case
    finish, rest = _rest_seconds(predictor, props[probe], ref)
    scale = sum(sizes.values()) / sizes[probe]
    whole = [c for c in case_ids if tile[c] != list(patch)]
    low = _LowResolutionCost()
    if low_net is not None and (by_low or whole):
        low = _low_resolution_cost(predictor, low_net, patch, device, plans.amp)
    tiled = 0.0
    if whole:
        if low_net is not None:
            tiled = low.seconds([shapes[c] for c in whole], patch, predictor.step)
        else:
            n_patch = sum(len(tile_boxes(padded_shape(shapes[c], patch), patch, predictor.step)) for c in whole)
            per_call = predictor.call_inputs(patch, patch)
            tiled = n_patch * _forward_seconds(inference_net, [shape[0], *patch], device, plans.amp,
                                               per_call) / per_call
        tiled += finish * sum(sizes[c] for c in whole) / sizes[probe]
    return ValidationCost(tiles, flips, forward, rest * scale, finish * scale, item, lone, tiled,
                          low.seconds([shapes[c] for c in by_low], patch, predictor.step))


@dataclass
class _LowResolutionCost:
    """Measured cost of :func:`~autoseg.inference.patch_free_tiles.predict_patch_free_tiles`: one low-resolution
    tile through the U-Net (its share of a call) and the full-resolution heads per voxel."""

    factor: list[int] = field(default_factory=lambda: [1, 1, 1])
    tile_seconds: float = 0.0
    heads_per_voxel: float = 0.0

    def seconds(self, shapes: list[list[int]], patch: list[int], step: float) -> float:
        """One unmirrored prediction of scans of spatial ``shapes``."""
        return sum(low_resolution_tiles(s, patch, self.factor, step) * self.tile_seconds
                   + prod(s) * self.heads_per_voxel for s in shapes)


def _low_resolution_cost(predictor: Predictor, net: PatchFreeUNet, patch: list[int], device: torch.device,
                         amp: bool) -> _LowResolutionCost:
    """:class:`_LowResolutionCost` measured for ``net`` and the region ``patch`` (median of 3 after a warm-up)."""
    low = [p // f for p, f in zip(patch, net.factor)]
    inputs = predictor.call_inputs(patch, patch)
    body = _forward_seconds(LowResolutionBody(net), [len(predictor.plans.channel_names), *low], device, amp, inputs)
    return _LowResolutionCost(list(net.factor), body / inputs, _heads_seconds(net, low, device, amp) / prod(patch))


def _rest_seconds(predictor: Predictor, props: CaseProperties, ref: np.ndarray) -> tuple[float, float]:
    """Seconds of one case's way back to its scan's grid, and of that plus saving its probabilities, writing
    its labels and scoring every class (a random probability map; the reference scored against itself)."""
    k = len(predictor.plans.labels)
    probs = np.random.default_rng(0).dirichlet(np.ones(k), size=props.shape_after_resampling)
    probs = np.moveaxis(probs.astype(np.float32), -1, 0)
    t0 = _clock()
    seg = predictor.finish(probs, props).labels
    finish = _clock() - t0
    with tempfile.TemporaryDirectory() as tmp:
        save_grid_probabilities(probs, Path(tmp) / f"{props.case_id}.npz")
        write_image(seg, props.geometry, Path(tmp) / f"{props.case_id}.nii.gz")
    for c in sorted(predictor.plans.labels)[1:]:
        score_case(props.case_id, ref, ref, c, props.geometry.spacing_zyx)
    return finish, _clock() - t0


@torch.no_grad()
def _forward_seconds(net: nn.Module, shape: list[int], device: torch.device, amp: bool, batch: int = 1) -> float:
    """Median seconds of one forward pass of ``batch`` tiles ``(C, *patch)`` (after one warm-up)."""
    net = net.to(device).eval()
    x = torch.randn(batch, *shape, device=device)

    def run() -> None:
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            net(x)
    return _median_seconds(run, device)


@torch.no_grad()
def _heads_seconds(net: PatchFreeUNet, low: list[int], device: torch.device, amp: bool) -> float:
    """Median seconds of the full-resolution heads over blended features of ``low`` low-resolution voxels (as
    :func:`~autoseg.inference.patch_free_tiles.heads_by_blocks` runs them after the U-Net's tiles)."""
    net = net.to(device).eval()
    blended = torch.randn(net.up_seg.in_channels + net.seg_out.out_channels, *low)
    return _median_seconds(lambda: heads_by_blocks(net, blended, device, amp), device)


def _median_seconds(run: Callable[[], object], device: torch.device) -> float:
    """Median seconds of three calls of ``run`` after one untimed warm-up."""
    times = []
    for i in range(4):
        t0 = _clock()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(_clock() - t0)
    return sorted(times)[1]
