"""The optimiser step: a non-finite step is skipped, not fatal; a run of them, or non-finite weights, stops
training with a clear message; AMP's GradScaler path is exercised on the CPU (bfloat16 autocast)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autoseg.device import is_gpu_out_of_memory, is_out_of_memory
from autoseg.training.step import (
    MAX_NON_FINITE_IN_A_ROW,
    MAX_SKIPPED_IN_A_ROW,
    NonFiniteGuard,
    OutOfMemory,
    Stepper,
    TrainingDiverged,
    out_of_memory_message,
)


class MSE(nn.Module):
    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out.float() - target) ** 2).mean()


def _stepper(amp: bool = False, loss_scale: float = 1.0) -> tuple[Stepper, nn.Module]:
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return Stepper(net, net, MSE(), opt, torch.device("cpu"), amp, grad_clip=12.0, loss_scale=loss_scale), net


def _weights(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


GOOD = (torch.ones(2, 4), torch.zeros(2, 1))
BAD = (torch.full((2, 4), float("nan")), torch.zeros(2, 1))


@pytest.mark.parametrize("amp", [False, True])
def test_a_non_finite_step_is_skipped_and_a_finite_one_resets_the_count(amp):
    stepper, net = _stepper(amp)
    before = _weights(net)
    r = stepper.step(*BAD, 0.1, "zoom_in step 0")
    assert r.skipped and r.loss != r.loss  # NaN
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(net)))  # no update from NaN gradients
    r = stepper.step(*GOOD, 0.1, "zoom_in step 1")
    assert not r.skipped
    assert not all(torch.equal(a, b) for a, b in zip(before, _weights(net)))


def test_the_grad_scaler_lowers_its_scale_on_an_overflow():
    stepper, _ = _stepper(amp=True)
    assert stepper.scaler is not None
    scale = stepper.scaler.get_scale()
    stepper.step(*BAD, 0.1, "zoom_in step 0")
    assert stepper.scaler.get_scale() == scale * 0.5  # GradScaler's backoff factor


def test_a_run_of_non_finite_losses_stops_training_and_a_finite_one_resets_the_count():
    guard = NonFiniteGuard()
    for _ in range(MAX_NON_FINITE_IN_A_ROW - 1):
        guard.observe(True, "zoom_in step 3")
    guard.observe(False, "zoom_in step 4")
    assert guard.in_a_row == 0
    for _ in range(MAX_NON_FINITE_IN_A_ROW - 1):
        guard.observe(True, "zoom_in step 5")
    with pytest.raises(TrainingDiverged, match=f"zoom_in step 14: the loss was not finite in {MAX_NON_FINITE_IN_A_ROW} "
                       "steps in a row"):
        guard.observe(True, "zoom_in step 14")


def test_overflowing_gradients_of_a_finite_loss_are_skipped_and_counted_apart_from_non_finite_losses():
    """Under AMP a scaled-gradient overflow is routine: the step is skipped and its loss is finite, so the
    non-finite-loss guard does not count it; it counts towards AMP's own, longer limit of skipped steps in a
    row (MAX_SKIPPED_IN_A_ROW[True] = 30, not 10), which a good step resets and the 30th overflow in a row
    reaches."""
    stepper, net = _stepper(amp=True)
    overflow = (torch.ones(2, 4), torch.full((2, 1), 1000.0))  # loss x 2^127 overflows float32
    guard = NonFiniteGuard()
    before = _weights(net)
    for i in range(MAX_SKIPPED_IN_A_ROW[True] - 1):
        stepper.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
        r = stepper.step(*overflow, 0.1, f"zoom_in step {i}")
        assert r.skipped and math.isfinite(r.loss)
        guard.observe(not math.isfinite(r.loss), f"zoom_in step {i}")
    assert stepper.skipped_in_a_row == MAX_SKIPPED_IN_A_ROW[True] - 1 > MAX_NON_FINITE_IN_A_ROW
    assert guard.in_a_row == 0
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(net)))
    stepper.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    assert not stepper.step(*GOOD, 0.1, "zoom_in step 29").skipped and stepper.skipped_in_a_row == 0
    for i in range(MAX_SKIPPED_IN_A_ROW[True] - 1):
        stepper.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
        stepper.step(*overflow, 0.1, f"zoom_in step {30 + i}")
    stepper.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    with pytest.raises(TrainingDiverged, match="zoom_in step 59: 30 steps in a row had non-finite gradients"):
        stepper.step(*overflow, 0.1, "zoom_in step 59")


def test_non_finite_weights_stop_training():
    stepper, net = _stepper()
    stepper.check_weights("zoom_in step 3")
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="weights are no longer finite"):
        stepper.check_weights("zoom_in step 3")


def test_learning_rate_and_loss_scale_reach_the_update():
    """SGD: w' = w - lr * scale * grad; the loss value reported is the unscaled one."""
    a, net_a = _stepper(loss_scale=1.0)
    b, net_b = _stepper(loss_scale=0.5)
    w0 = _weights(net_a)
    ra = a.step(*GOOD, 0.1, "s")
    rb = b.step(*GOOD, 0.2, "s")
    assert ra.loss == pytest.approx(rb.loss)
    for p, q, w in zip(net_a.parameters(), net_b.parameters(), w0):
        torch.testing.assert_close(p - w, q - w)  # 0.1 x 1.0 == 0.2 x 0.5


def test_out_of_memory_is_recognised_and_explained():
    gpu_oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1099511627776 bytes")
    assert is_out_of_memory(gpu_oom) and is_gpu_out_of_memory(gpu_oom)
    assert is_out_of_memory(cpu_oom) and not is_gpu_out_of_memory(cpu_oom)
    assert is_gpu_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_gpu_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    line = out_of_memory_message(False, torch.device("cpu"), "zoom_out training step", [40, 56, 40], 2, 0.16)
    assert line.startswith("out of memory (RAM) in zoom_out training step (patch 40x56x40, batch 2 per process")
    assert "0.16 GiB" in line and "\n" not in line
    assert issubclass(OutOfMemory, ValueError)  # the CLI prints ValueErrors as one line


def test_a_run_of_skipped_steps_with_finite_losses_stops_training():
    """Gradients that stay non-finite while the loss is finite never count as non-finite losses; the
    stepper stops them itself (10 in fp32; under AMP 30, room for the scaler to lower its scale)."""
    stepper, net = _stepper()
    net.bias.register_hook(lambda g: torch.full_like(g, float("nan")))  # a finite loss, a NaN gradient
    for i in range(MAX_SKIPPED_IN_A_ROW[False] - 1):
        r = stepper.step(*GOOD, 0.1, f"zoom_in step {i}")
        assert r.skipped and r.loss == r.loss
    with pytest.raises(TrainingDiverged, match="zoom_in step 9: 10 steps in a row had non-finite gradients"):
        stepper.step(*GOOD, 0.1, "zoom_in step 9")
    assert MAX_SKIPPED_IN_A_ROW[True] > MAX_SKIPPED_IN_A_ROW[False]


def test_training_step_out_of_memory_is_one_line(tiny_run, monkeypatch, capsys):
    """A CUDA out-of-memory error (constructed here: no GPU) in a step ends training with the one-line
    :class:`OutOfMemory` naming the stage, patch and batch; the CLI prints it without a traceback."""
    from autoseg.cli import main
    from autoseg.training.step import Stepper as RealStepper

    def out_of_memory(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(RealStepper, "step", out_of_memory)
    code = main(["train", "0", "--run", str(tiny_run), "--epochs", "1", "--iterations-per-epoch", "2", "-j", "0",
                 "--device", "cpu", "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (RAM) in zoom_in training step (patch ")
    assert "batch 2 per process" in err
    assert err.count("\n") == 1 and "Traceback" not in err
