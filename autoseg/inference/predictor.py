"""Predict scans with a trained run: preprocess as planned, sliding-window every fold's network, average the
probabilities, and take them back to the scan's own geometry through preprocessing's inverse transform.

A Python API for people who embed autoseg::

    from autoseg.inference.predictor import Predictor
    predictor = Predictor.from_run("runs/hippocampus")            # every trained fold, final checkpoints
    result = predictor.predict(image, spacing=(1.0, 1.0, 1.0))    # image (C, z, y, x) or (z, y, x)
    result.labels                                                 # (z, y, x), same shape as the image
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoseg.checkpoint import load_checkpoint
from autoseg.inference.postprocessing import Postprocessing, apply_postprocessing, load_postprocessing
from autoseg.io import Geometry
from autoseg.networks import build_network
from autoseg.plans import PLANS_FILE, Plans, load_plans
from autoseg.preprocessing.transform import CaseProperties, forward, probabilities_to_labels, probabilities_to_original
from autoseg.runconfig import CONFIG_FILE

__all__ = ["Predictor", "Prediction", "trained_folds", "resolve_device"]

log = logging.getLogger(__name__)


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
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


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
    """

    def __init__(self, plans: Plans, networks: list[tuple[nn.Module, list[int]]], device: torch.device,
                 tta: bool = True, step: float | None = None, postprocessing: Postprocessing | None = None):
        if not networks:
            raise ValueError("a Predictor needs at least one network")
        if step is not None and not 0 < step <= 1:
            raise ValueError(f"step {step}: expected a share of the patch in (0, 1]")
        self.plans, self.networks, self.device, self.postprocessing = plans, networks, device, postprocessing
        self.mirror_axes = list(plans.inference.mirror_axes) if tta else []
        self.step = plans.inference.tile_step if step is None else step
        for net, _ in networks:
            net.to(device).eval()

    @classmethod
    def from_run(cls, run_dir: str | Path, folds: list[str] | None = None, checkpoint: str = "final",
                 device: str = "auto", tta: bool = True, step: float | None = None) -> Predictor:
        """Load the ``checkpoint`` of ``folds`` (default: every fold that has it) from ``run_dir``.

        Raises:
            ValueError: no such fold or checkpoint.
        """
        run_dir = Path(run_dir)
        plans = load_plans(run_dir / PLANS_FILE)
        available = trained_folds(run_dir, checkpoint)
        folds = available if folds is None else [str(f) for f in folds]
        if not folds:
            raise ValueError(f"{run_dir}: no fold has checkpoint_{checkpoint}.pt; train one with 'autoseg train 0 "
                             f"--run {run_dir}'")
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
        return cls(plans, nets, dev, tta, step, load_postprocessing(run_dir))

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
            raise ValueError("image contains NaN or infinite values")
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
        """Class probabilities ``(K, ...)`` of a preprocessed case, averaged over the networks."""
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        total: torch.Tensor | None = None
        for net, patch in self.networks:
            p = torch.softmax(self._logits(net, x, patch), 0)
            total = p if total is None else total + p
        assert total is not None
        return (total / len(self.networks)).numpy()

    def _logits(self, net: nn.Module, x: torch.Tensor, patch: list[int]) -> torch.Tensor:
        """Sliding-window logits; on a GPU out of memory, retried with the sums kept in RAM, then on the CPU."""
        from autoseg.inference.sliding_window import predict_logits

        args = (x, patch, self.step, self.mirror_axes, self.plans.inference.gaussian_sigma_scale)
        if self.device.type != "cuda":
            return predict_logits(net, *args, self.device)
        try:
            return predict_logits(net, *args, self.device, amp=self.plans.amp)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
        log.warning("GPU out of memory for a %s volume: keeping the sums in RAM", "x".join(map(str, x.shape[1:])))
        try:
            return predict_logits(net, *args, self.device, amp=self.plans.amp, accumulate_on=torch.device("cpu"))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
        log.warning("GPU out of memory again: predicting this volume on the CPU")
        net.to("cpu")
        try:
            return predict_logits(net, *args, torch.device("cpu"))
        finally:
            net.to(self.device)
