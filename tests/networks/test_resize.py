"""Trilinear resizing by matrix products: the values and gradients of PyTorch's trilinear interpolation, and taken
only where deterministic algorithms are asked for and a gradient is needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoseg.networks import resize
from autoseg.networks.patchfree import PatchFreeUNet
from autoseg.networks.resize import linear_matrix, separable_trilinear, trilinear


@pytest.fixture
def deterministic(deterministic_setting_restored):
    torch.use_deterministic_algorithms(True, warn_only=True)


def test_linear_matrix_by_hand():
    # 2 -> 4 (factor 2): outputs read source positions -0.25, 0.25, 0.75, 1.25, clamped to 0 and 1
    torch.testing.assert_close(linear_matrix(2, 4, dtype=torch.float64), torch.tensor(
        [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64))
    # 3 -> 2: positions 0.25 and 1.75
    torch.testing.assert_close(linear_matrix(3, 2, dtype=torch.float64), torch.tensor(
        [[0.75, 0.25, 0.0], [0.0, 0.25, 0.75]], dtype=torch.float64))
    assert torch.equal(linear_matrix(5, 5), torch.eye(5))


@pytest.mark.parametrize("shape, size", [((4, 6, 5), (8, 12, 10)), ((3, 5, 5), (3, 10, 10)),
                                         ((2, 3, 3), (3, 4, 2)), ((5, 7, 2), (2, 3, 7))])
def test_values_and_gradients_equal_pytorch(shape, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, *size, dtype=torch.float64)
    ref = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    (ref_grad,) = torch.autograd.grad(ref, x, upstream)
    out = separable_trilinear(x, size)
    (grad,) = torch.autograd.grad(out, x, upstream)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_matrix_path_only_when_deterministic_and_a_gradient_is_needed(deterministic, monkeypatch):
    calls = []
    monkeypatch.setattr(resize, "separable_trilinear", lambda x, size: calls.append(size) or separable_trilinear(
        x, size))
    x = torch.randn(1, 2, 3, 4, 5, requires_grad=True)
    assert "Upsample" not in trilinear(x, (6, 8, 10)).grad_fn.name() and len(calls) == 1
    with torch.no_grad():
        trilinear(x, (6, 8, 10))  # prediction: no gradient, PyTorch's kernel
    trilinear(x.detach(), (6, 8, 10))
    assert len(calls) == 1
    torch.use_deterministic_algorithms(False)
    assert "UpsampleTrilinear3D" in trilinear(x, (6, 8, 10)).grad_fn.name() and len(calls) == 1
    assert trilinear(x, (3, 4, 5)) is x


def test_patch_free_training_step_is_the_same_in_deterministic_mode(deterministic):
    """The patch-free network's loss and gradients with the matrix path equal those with PyTorch's kernel."""
    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        net = PatchFreeUNet(1, 3, [8, 16], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1], 1, False, [1, 2, 2],
                            0.5, 0.5).train()
        out = net(torch.randn(2, 1, 8, 16, 16))
        loss = out.full_res.square().mean() + out.low_res[0].mean() + out.reconstruction.mean()
        return loss, torch.autograd.grad(loss, list(net.parameters()))

    loss_det, grads_det = grads()
    torch.use_deterministic_algorithms(False)
    loss, grads_ref = grads()
    torch.testing.assert_close(loss_det, loss)
    for a, b in zip(grads_det, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
