"""Memory and compute of a training step of a network without a counted cost model, measured rather than modelled.

Our U-Net (:mod:`autoseg.planning.memory`) and MONAI's three networks (:mod:`autoseg.networks.monai_costs`) are
counted layer by layer; :func:`network_step_cost` gives every architecture's step and measures only the
patch-free network, whose up-sampling heads and guidance patch have no counted model. The planner runs its
forward pass of one sample on PyTorch's ``meta`` device, where tensors have shapes but no data, so a 3D network
costs milliseconds whatever the patch, and counts:

- the bytes autograd keeps for backward (every tensor a ``saved_tensors_hooks`` pack sees, each once, weights
  excluded): the activations term of the memory model;
- the floating-point operations of the step: three times the forward's (``torch.utils.flop_counter``'s
  formulas, summed by :class:`_FlopCount`). Its formulas count a backward of a convolution, a matrix product or
  attention as twice the forward (gradients of the input and of the weights), so running the backward too
  would only add the first layer's unneeded input gradient and the uncounted ops' time: three times the
  forward is within 0.5 % of counting both (tested), at half the planning time;
- the parameters.

It does so at small patches (2 and 3 times the network's total stride per axis) and fits ``c + a v`` in the
patch's voxels ``v``: convolutional networks are affine in ``v`` (``c``: per-channel statistics). The fit also
takes MONAI's networks, which the planner no longer measures but the tests compare with their counted models:
for UNETR, whose attention adds the square of its token count, a third patch (4 times) fits
``c + a v + b v^2``. The fit is exact for patches the network divides; ``tests/planning/test_measured.py``
checks it against a measurement at the planned patch. The same measurement is the reference the counted models
of MONAI's networks are tested against. The loss and the optimiser's copies are added by the same formulas as
for our U-Net.

Mixed precision is not measured on ``meta`` (autocast has no meta kernels): under CUDA AMP the activations are
taken at half the float32 bytes, as for our U-Net, whose saved activations are all float16.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

import numpy as np
import torch

from autoseg.networks.factory import MONAI_ARCHITECTURES
from autoseg.networks.monai_costs import monai_costs
from autoseg.networks.monai_nets import UNETR_TOKEN
from autoseg.planning.memory import (
    PARAM_COPIES,
    StepCost,
    default_supervision_weights,
    loss_bytes,
    output_voxels,
    step_cost,
)
from autoseg.plans import NetworkPlan

__all__ = ["Measurement", "measure_step", "measure_steps", "measured_step_cost", "fitted_step", "counted_step",
           "network_step_cost"]


@dataclass(frozen=True)
class Measurement:
    """One sample's training step at one patch, float32: bytes saved for backward, FLOPs (forward and
    backward), parameters."""

    saved_bytes: float
    flops: float
    parameters: int


#: a training step's FLOPs per forward FLOP: the backward counts twice the forward (see the module's docstring)
STEP_PER_FORWARD = 3

#: fitted coefficients per network, channels and classes (a plan fits a handful of networks)
_FITS: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray, int]] = {}


def measure_step(net: NetworkPlan, patch: list[int], in_channels: int, n_classes: int,
                 device: str = "meta") -> Measurement:
    """The step of one sample at ``patch``, from its forward on ``device`` (``meta``: shapes only, no data)."""
    return measure_steps(net, [patch], in_channels, n_classes, device)[0]


def measure_steps(net: NetworkPlan, patches: list[list[int]], in_channels: int, n_classes: int,
                  device: str = "meta") -> list[Measurement]:
    """:func:`measure_step` at each of ``patches`` with one network (UNETR's embedding sized for the first)."""
    from autoseg.networks import build_network

    if net.architecture == "unetr":
        net = replace(net, input_size=list(patches[0]))
    with torch.device(device):
        model = build_network(net, in_channels, n_classes)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    return [_measure(model, patch, in_channels, device, n_params) for patch in patches]


class _FlopCount:
    """FLOPs of a piece of code: the ops torch's flop counter has formulas for (convolutions, matrix products,
    attention) summed as it sums them. Unlike ``torch.utils.flop_counter.FlopCounterMode`` it neither tracks
    modules nor decomposes the other ops to look for counted ones inside (autograd has already decomposed the
    composite ones it could reach), which made it most of the planning time for MONAI's networks; a test checks
    that both count the same."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counter = self
        self.flops = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    counter.flops += int(formula(*args, **kwargs, out_val=out))
                return out

        self.mode = Mode()

    def __enter__(self) -> _FlopCount:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)


def _measure(model: torch.nn.Module, patch: list[int], in_channels: int, device: str, n_params: int) -> Measurement:
    params = {id(p) for p in model.parameters()}
    saved: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params:
            saved[id(t)] = (t, t.numel() * t.element_size())  # keep t alive so that its id stays unique
        return t

    x = torch.zeros(1, in_channels, *patch, device=device)
    with _FlopCount() as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return Measurement(float(sum(b for _, b in saved.values())), float(STEP_PER_FORWARD * counter.flops), n_params)


def _fit(net: NetworkPlan, in_channels: int, n_classes: int) -> tuple[np.ndarray, np.ndarray, int]:
    key = (repr(net), in_channels, n_classes)
    if key in _FITS:
        return _FITS[key]
    stride = net.total_stride
    quadratic = net.architecture == "unetr"  # attention: the square of the token count
    patches = [[k * s for s in stride] for k in ((2, 3, 4) if quadratic else (2, 3))]
    ms = measure_steps(net, patches, in_channels, n_classes)
    v = np.array([prod(p) for p in patches], dtype=float)
    design = np.stack([np.ones(len(v)), v] + ([v**2] if quadratic else []), axis=1)
    coef_mem = np.linalg.solve(design, np.array([m.saved_bytes for m in ms]))
    coef_flops = np.linalg.solve(design, np.array([m.flops for m in ms]))
    if not quadratic:
        coef_mem, coef_flops = np.append(coef_mem, 0.0), np.append(coef_flops, 0.0)
    _FITS[key] = coef_mem, coef_flops, ms[0].parameters - _embedding_parameters(net, patches[0])
    return _FITS[key]


def _embedding_parameters(net: NetworkPlan, patch: list[int]) -> int:
    """UNETR's position embedding: one ``hidden_size`` vector per token of the patch it is sized for."""
    return net.hidden_size * prod(e // UNETR_TOKEN for e in patch) if net.architecture == "unetr" else 0


def fitted_step(net: NetworkPlan, patch: list[int], in_channels: int, n_classes: int) -> Measurement:
    """One sample's step at ``patch`` from the fit over small measured patches (cached per network); UNETR's
    parameters with its position embedding sized for ``net.input_size`` (or ``patch`` when not set yet)."""
    coef_mem, coef_flops, params = _fit(replace(net, input_size=[]), in_channels, n_classes)
    v = float(prod(patch))
    basis = np.array([1.0, v, v * v])
    params += _embedding_parameters(net, net.input_size or patch)
    return Measurement(max(float(basis @ coef_mem), 0.0), max(float(basis @ coef_flops), 0.0), params)


def counted_step(net: NetworkPlan, patch: list[int], in_channels: int, n_classes: int) -> Measurement:
    """One sample's step of a MONAI network at ``patch`` from its counted model
    (:func:`autoseg.networks.monai_costs.monai_costs`), in the units of :func:`measure_step`; UNETR's parameters
    with its position embedding sized for ``net.input_size`` (or ``patch`` when not set yet)."""
    c = monai_costs(net, in_channels, n_classes, patch)
    return Measurement(4.0 * c.saved_elements, float(STEP_PER_FORWARD * c.forward_flops),
                       c.parameters + _embedding_parameters(net, net.input_size or patch))


def measured_step_cost(net: NetworkPlan, patch: list[int], batch: int, in_channels: int, n_classes: int,
                       amp: bool, optimizer: str = "sgd") -> StepCost:
    """:class:`StepCost` of a network without our U-Net's cost model: activations and FLOPs from MONAI's
    counted models (:func:`counted_step`) or, for the others, from :func:`fitted_step`; loss and parameter terms
    as :func:`autoseg.planning.memory.step_cost` counts them."""
    counted = net.architecture in MONAI_ARCHITECTURES
    m = (counted_step if counted else fitted_step)(net, patch, in_channels, n_classes)
    activations = batch * round(m.saved_bytes * (0.5 if amp else 1.0))
    voxels = output_voxels(net, patch)
    loss = batch * loss_bytes(voxels, default_supervision_weights(len(voxels)), n_classes, amp)
    params = m.parameters * (4 * PARAM_COPIES[optimizer] + (2 if amp else 0))
    return StepCost(activations, activations + loss + params, batch * m.flops, loss, params)


def network_step_cost(net: NetworkPlan, patch: list[int], batch: int, in_channels: int, n_classes: int,
                      amp: bool, optimizer: str = "sgd") -> StepCost:
    """The step's cost for any architecture: our U-Net's exact model, MONAI's networks' counted ones, else the
    measured fit; ``optimizer`` decides the optimiser state per parameter."""
    if net.architecture in ("residual_unet", "plain_unet"):
        return step_cost(net, patch, batch, in_channels, n_classes, amp, optimizer)
    return measured_step_cost(net, patch, batch, in_channels, n_classes, amp, optimizer)
