"""Sliding-window prediction: Gaussian weights, mirroring, agreement with a whole-volume pass, tile batches,
the chunked final division, and the memory decisions (where the sums live, how many tiles per batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.inference.sliding_window import (
    CPU_ITEMS_PER_CALL,
    choose_cpu_calls,
    choose_sums_device,
    choose_tiles_per_batch,
    cpu_call_inputs,
    divide_sums,
    division_chunk,
    gaussian_weights,
    predict_logits,
    sums_bytes,
)
from autoseg.networks.resunet import ResidualUNet

CPU = torch.device("cpu")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return ResidualUNet(1, 3, [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1]).eval()


def test_gaussian_weights():
    g = gaussian_weights([9, 9, 9], 1 / 8).numpy()
    assert g.max() == pytest.approx(1.0) and g[4, 4, 4] == g.max()
    assert g.min() > 0
    np.testing.assert_allclose(g, g[::-1, ::-1, ::-1])  # symmetric


@pytest.mark.parametrize("patch", [[9, 9, 9], [40, 56, 40], [1, 256, 256], [2, 7, 160], [80, 3, 1]])
@pytest.mark.parametrize("sigma_scale", [1 / 8, 0.3])
def test_gaussian_weights_equal_scipys_filtered_impulse(patch, sigma_scale):
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    want = gaussian_filter(impulse, [p * sigma_scale for p in patch], mode="constant", cval=0)
    want /= want.max()
    want[want == 0] = want[want > 0].min()
    np.testing.assert_allclose(gaussian_weights(patch, sigma_scale).numpy(), want.astype(np.float32), rtol=1e-6,
                               atol=0)


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
    """A 5x7x6 volume under an 8^3 patch is zero-padded symmetrically (lower pads 1, 0, 1), predicted as one
    tile (with one mirrored copy along axis 0) and cropped back: the same as the network on the padded volume
    by hand, whatever the Gaussian weights, since one tile's weights divide out."""
    net = small_net()
    x = torch.randn(1, 5, 7, 6)
    out = predict_logits(net, x, [8, 8, 8], 0.5, [0], 1 / 8, CPU)
    assert out.shape == (3, 5, 7, 6)
    padded = torch.zeros(1, 1, 8, 8, 8)
    padded[0, :, 1:6, 0:7, 1:7] = x
    with torch.no_grad():
        both = (net(padded) + torch.flip(net(torch.flip(padded, [2])), [2])) / 2
    torch.testing.assert_close(out, both[0, :, 1:6, 0:7, 1:7], rtol=1e-5, atol=1e-5)


def test_corner_weights_need_float32_sums():
    """The Gaussian's corner weight is below float16's smallest subnormal (2^-24): float16 sums would drop
    it while the float32 normaliser keeps it. A voxel covered only by a tile's corner gets that tile's value."""
    g = gaussian_weights([8, 8, 8], 1 / 8)
    assert float(g[0, 0, 0]) < 2.0**-25 and float(g[0, 0, 0].half()) == 0.0
    x = torch.zeros(1, 12, 12, 12)
    x[:, 8:, 8:, 8:] = 1.0  # 64 of the last tile's 512 voxels: its mean is 0.125, the first tile's 0
    got = predict_logits(_Constant(), x, [8, 8, 8], 0.5, [], 1 / 8, CPU)
    assert got.dtype == torch.float32
    assert float(got[0, 0, 0, 0]) == 0.0 and float(got[0, -1, -1, -1]) == pytest.approx(0.125, rel=1e-6)


def test_batched_tiles_equal_one_tile_at_a_time():
    net = small_net()
    x = torch.randn(1, 12, 16, 12)  # patch 8, step 0.5: 2 x 3 x 2 = 12 tiles
    one = predict_logits(net, x, [8, 8, 8], 0.5, [0], 1 / 8, CPU)
    for batch in (3, 5, 12):  # 5: a last batch of 2
        torch.testing.assert_close(predict_logits(net, x, [8, 8, 8], 0.5, [0], 1 / 8, CPU, tiles_per_batch=batch),
                                   one, rtol=1e-5, atol=1e-5)
    chunked = predict_logits(net, x, [8, 8, 8], 0.5, [0], 1 / 8, CPU, accumulate_on=CPU, chunk=1)
    torch.testing.assert_close(chunked, one, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tiles_per_batch 0"):
        predict_logits(net, x, [8, 8, 8], 0.5, [], 1 / 8, CPU, tiles_per_batch=0)


def test_mirrored_copies_in_one_call_equal_one_at_a_time():
    """Flips batched in one call (with several tiles per call too, and a last call holding fewer flips) sum to
    what one flip at a time gives, up to the convolutions' float rounding."""
    net = small_net()
    x = torch.randn(1, 12, 16, 12)  # 12 tiles of 8^3
    one = predict_logits(net, x, [8, 8, 8], 0.5, [0, 1, 2], 1 / 8, CPU)  # 8 flips
    for flips, tiles in ((2, 1), (3, 1), (8, 1), (2, 5)):
        got = predict_logits(net, x, [8, 8, 8], 0.5, [0, 1, 2], 1 / 8, CPU, tiles_per_batch=tiles,
                             flips_per_call=flips)
        torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="flips_per_call 0"):
        predict_logits(net, x, [8, 8, 8], 0.5, [0], 1 / 8, CPU, flips_per_call=0)


def test_cpu_call_inputs():
    patch = [40, 56, 40]
    assert CPU_ITEMS_PER_CALL == 2
    assert cpu_call_inputs(patch, patch, 2) == 2
    assert cpu_call_inputs(patch, patch, 12, most=4) == 4
    assert cpu_call_inputs(patch, patch, 1) == 1  # trained one at a time: no more in memory
    assert cpu_call_inputs([48, 64, 48], patch, 2) == 1  # a tile larger than the trained patch goes alone
    with pytest.raises(ValueError, match="positive"):
        cpu_call_inputs(patch, patch, 0)


def test_choose_cpu_calls_puts_mirrored_copies_first_then_tiles():
    assert choose_cpu_calls(2, 8, 5) == (1, 2)  # mirroring: two copies of one tile
    assert choose_cpu_calls(2, 1, 5) == (2, 1)  # no mirroring: two tiles
    assert choose_cpu_calls(2, 1, 1) == (1, 1)  # a single tile goes alone
    assert choose_cpu_calls(4, 2, 7) == (2, 2)  # two tiles x their two copies
    assert choose_cpu_calls(4, 8, 7) == (1, 4)
    assert choose_cpu_calls(1, 8, 7) == (1, 1)
    assert choose_cpu_calls(3, 2, 7) == (1, 2)  # a third input would split a tile's copies: left out
    with pytest.raises(ValueError, match="positive"):
        choose_cpu_calls(2, 0, 5)


def test_divide_sums_in_chunks_equals_the_plain_division():
    gen = torch.Generator().manual_seed(0)
    acc = torch.randn(3, 9, 7, 6, generator=gen)
    norm = torch.rand(9, 7, 6, generator=gen) + 0.1
    crop = (slice(None), slice(1, 8), slice(0, 7), slice(2, 5))  # a padded volume cropped back
    want = acc[crop] / norm[crop[1:]]
    for chunk in (1, 3, 7, 100):
        out = torch.full((3, 7, 7, 3), float("nan"))
        got = divide_sums(acc.clone(), norm, crop, chunk, out=out)
        assert got is out
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    sums = acc.clone()
    in_place = divide_sums(sums, norm, crop, 2)  # on the CPU: divided in place, no second copy
    assert in_place.data_ptr() == sums[crop].data_ptr()
    torch.testing.assert_close(in_place, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="chunk 0"):
        divide_sums(acc.clone(), norm, crop, 0)
    with pytest.raises(ValueError, match="out of shape"):
        divide_sums(acc.clone(), norm, crop, 1, out=torch.empty(3, 9, 7, 6))


def test_division_chunk():
    assert division_chunk(3, 100 * 100) == 559  # 64 MiB // (3 x 10,000 voxels x 4 bytes = 120,000 bytes)
    assert division_chunk(3, 100 * 100, budget_bytes=240_000) == 2
    assert division_chunk(14, 512 * 512) == 4  # 67,108,864 // 14,680,064
    assert division_chunk(20, 1024 * 1024) == 1  # one slice (80 MiB) is more than the budget: still one slice


def test_sums_bytes_and_where_they_live():
    # 3 classes + the weights + 2 input channels, float32, on 10 x 20 x 30 voxels
    assert sums_bytes(3, 2, [10, 20, 30]) == 6 * 6000 * 4 == 144_000
    gib = 2**30
    assert choose_sums_device(6 * gib, 10 * gib) == "cuda"  # exactly 60 % of the free memory
    assert choose_sums_device(6 * gib + 1, 10 * gib) == "cpu"
    assert choose_sums_device(1, 0) == "cpu"
    assert choose_sums_device(5 * gib, 10 * gib, share=0.4) == "cpu"


def test_tiles_per_batch():
    gib = 2**30
    assert choose_tiles_per_batch(gib, 10 * gib, 27, "cuda") == 8  # 80 % of 10 GiB holds 8 tiles: the cap
    assert choose_tiles_per_batch(gib, 3 * gib, 27, "cuda") == 2  # 2.4 GiB
    assert choose_tiles_per_batch(gib, gib // 2, 27, "cuda") == 1  # not even one: still one
    assert choose_tiles_per_batch(gib, -gib, 27, "cuda") == 1
    assert choose_tiles_per_batch(gib, 100 * gib, 3, "cuda") == 3  # never more than the tiles
    assert choose_tiles_per_batch(gib, 100 * gib, 27, "cuda", cap=16) == 16
    assert choose_tiles_per_batch(gib, 100 * gib, 27, "cpu") == 1
    with pytest.raises(ValueError, match="positive"):
        choose_tiles_per_batch(0, gib, 27, "cuda")
