"""Sliding-window prediction: tiling, Gaussian weights, mirroring, and agreement with a whole-volume pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.inference.sliding_window import gaussian_weights, predict_logits
from autoseg.networks.resunet import ResidualUNet
from autoseg.tiling import mirror_combinations, tile_starts

CPU = torch.device("cpu")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return ResidualUNet(1, 3, [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1]).eval()


def test_tile_starts_cover_the_volume_with_the_step():
    assert tile_starts([10, 16, 8], [8, 8, 8], 0.5) == [[0, 2], [0, 4, 8], [0]]
    # every start at most step*patch apart, first at 0, last flush with the end
    for s, p, st in [(100, 24, 0.5), (57, 16, 0.33), (24, 24, 0.5)]:
        (starts,) = tile_starts([s], [p], st)
        assert starts[0] == 0 and starts[-1] == s - p
        assert all(0 < b - a <= np.ceil(p * st) for a, b in zip(starts, starts[1:]))  # rounded to voxels
    with pytest.raises(ValueError, match="smaller than the patch"):
        tile_starts([4, 8, 8], [8, 8, 8], 0.5)


def test_gaussian_weights():
    g = gaussian_weights([9, 9, 9], 1 / 8).numpy()
    assert g.max() == pytest.approx(1.0) and g[4, 4, 4] == g.max()
    assert g.min() > 0
    np.testing.assert_allclose(g, g[::-1, ::-1, ::-1])  # symmetric


def test_one_tile_equals_a_whole_volume_forward():
    net = small_net()
    x = torch.randn(1, 8, 12, 8)
    got = predict_logits(net, x, [8, 12, 8], 0.5, [], 1 / 8, CPU)
    with torch.no_grad():
        want = net(x[None])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mirroring_averages_flipped_predictions():
    net = small_net()
    x = torch.randn(1, 8, 8, 8)
    got = predict_logits(net, x, [8, 8, 8], 0.5, [0, 2], 1 / 8, CPU)
    with torch.no_grad():
        outs = [torch.flip(net(torch.flip(x[None], [d + 2 for d in f])), [d + 2 for d in f])[0]
                for f in [(), (0,), (2,), (0, 2)]]
    torch.testing.assert_close(got, sum(outs) / 4, rtol=1e-5, atol=1e-5)
    assert mirror_combinations([0, 1, 2]) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


class _Constant(nn.Module):
    """Predicts the tile's own mean intensity everywhere: overlapping tiles then average by weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4), keepdim=True).expand(-1, 1, *x.shape[2:]).contiguous()


def test_overlapping_tiles_are_a_weighted_average():
    x = torch.zeros(1, 8, 8, 12)
    x[..., 6:] = 1.0  # tiles start at x = 0, 2, 4: tile means 0.25, 0.5, 0.75 (patch 8)
    got = predict_logits(_Constant(), x, [8, 8, 8], 0.25, [], 1 / 8, CPU)[0]
    g = gaussian_weights([8, 8, 8], 1 / 8)
    num = torch.zeros(8, 8, 12)
    den = torch.zeros(8, 8, 12)
    for start, mean in [(0, 0.25), (2, 0.5), (4, 0.75)]:
        num[..., start:start + 8] += mean * g
        den[..., start:start + 8] += g
    torch.testing.assert_close(got, num / den)
    assert float(got[..., 0].mean()) == pytest.approx(0.25)  # only the first tile covers x = 0


def test_small_volume_is_padded_and_cropped_back():
    net = small_net()
    x = torch.randn(1, 5, 7, 6)
    out = predict_logits(net, x, [8, 8, 8], 0.5, [0], 1 / 8, CPU)
    assert out.shape == (3, 5, 7, 6)
    assert torch.isfinite(out).all()
