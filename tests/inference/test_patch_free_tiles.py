"""Tiled prediction of the patch-free network: the U-Net slid over the low-resolution scan, the heads once over
the blended features (per mirrored copy), checked against the network's own forward and a hand-blended
computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoseg.inference import patch_free_tiles as pft
from autoseg.inference.patch_free_tiles import heads_by_blocks, predict_patch_free_tiles
from autoseg.inference.sliding_window import gaussian_weights
from autoseg.networks.patchfree import PatchFreeUNet
from autoseg.tiling import tile_boxes

CPU = torch.device("cpu")


def _net(factor: list[int], channels: int = 2, classes: int = 3) -> PatchFreeUNet:
    torch.manual_seed(0)
    net = PatchFreeUNet(channels, classes, [8, 16, 32], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                        [1, 1, 1], 1, True, factor, 0.5, 0.5)
    return net.eval()


def _blended_by_hand(net: PatchFreeUNet, x: torch.Tensor, region: list[int], step: float) -> torch.Tensor:
    """Features and logits of the U-Net on each low-resolution tile, Gaussian-weighted, summed, divided."""
    low = F.avg_pool3d(x[None], tuple(net.factor))[0]
    patch = [r // f for r, f in zip(region, net.factor)]
    w = gaussian_weights(patch, 0.125)
    acc, norm = None, torch.zeros(low.shape[1:])
    for box in tile_boxes(list(low.shape[1:]), patch, step):
        tile = low[(slice(None), *box)][None]
        features, logits = net.body.decode(tile)
        out = torch.cat([features, logits[0]], 1)[0]
        acc = torch.zeros((out.shape[0], *low.shape[1:])) if acc is None else acc
        acc[(slice(None), *box)] += out * w
        norm[box] += w
    return acc / norm


@pytest.mark.parametrize("factor", [[2, 2, 2], [1, 2, 2]])
def test_heads_by_blocks_equal_the_networks_forward(factor):
    """One block, whole planes or small squares: the same full-resolution logits as the eval forward, whose
    heads see the whole region."""
    net = _net(factor)
    x = torch.randn(1, 2, 16, 24, 32)
    with torch.no_grad():
        want = net(x)[0]
        features, logits = net.body.decode(net.low_resolution(x))
        blended = torch.cat([features, logits[0]], 1)[0]
        line = 4 * 5 * net.up_seg.out_channels * blended.shape[3] * 8 // (2 if factor[0] == 1 else 1)
        for budget in (pft.HEADS_BLOCK_BYTES,  # one block
                       line * blended.shape[2] * 9,  # whole planes, 5 slices a block (and 2 x 2 of margin)
                       1):  # square blocks over the first two axes, as small as the margins allow
            got = heads_by_blocks(net, blended, CPU, budget_bytes=budget)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_low_resolution_body_feeds_a_channels_last_u_net_channels_last_input():
    """The tiles' U-Net pass converts its input as the network's own forward does (weights and input in one
    layout: a mixed layout takes oneDNN's slower path), with the same values."""
    plain = _net([2, 2, 2])
    last = _net([2, 2, 2])
    last.to(memory_format=torch.channels_last_3d)
    last.channels_last = True
    seen: list[bool] = []
    last.body.stem.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    low = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pft.LowResolutionBody(last)(low), pft.LowResolutionBody(plain)(low),
                                   rtol=1e-4, atol=1e-5)
    assert seen == [True]


def test_blocks_fill_whole_planes_else_squares():
    assert pft._blocks([40, 60, 60], [2, 2, 2], 60 * 14) == [10, 60]  # 10 slices + 2 x 2 of margin
    assert pft._blocks([40, 60, 60], [2, 2, 2], 60 * 100) == [40, 60]  # the whole volume
    assert pft._blocks([40, 60, 60], [2, 2, 2], 60 * 7) == [16, 16]  # 3 slices: mostly margin; (16 + 4)^2 <= 420
    assert pft._blocks([40, 60, 60], [2, 2, 2], 0) == [4, 4]
    assert pft._blocks([3, 60, 60], [2, 2, 2], 60 * 7) == [3, 60]  # a thin volume: every slice in one block


def test_one_tile_is_the_networks_forward():
    """A region that covers the scan: one low-resolution tile, whose Gaussian weights cancel."""
    net = _net([2, 2, 2])
    x = torch.randn(2, 16, 16, 24)
    got = predict_patch_free_tiles(net, x, [16, 16, 24], 0.5, [], 0.125, CPU)
    with torch.no_grad():
        torch.testing.assert_close(got, net(x[None])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("step", [0.5, 1.0])
def test_several_tiles_blend_features_then_run_the_heads_once(step):
    net = _net([2, 2, 2])
    x = torch.randn(2, 32, 24, 40)
    region = [16, 16, 16]
    got = predict_patch_free_tiles(net, x, region, step, [], 0.125, CPU)
    with torch.no_grad():
        blended = _blended_by_hand(net, x, region, step)
        want = net.segmentation(blended[None, :8], blended[None, 8:])[0]
    assert got.shape == (3, 32, 24, 40)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axes", [[0], [0, 2]])
def test_mirrored_tiles_average_each_flipped_copys_output(axes):
    """Mirrored, each copy goes through the whole tiled path (its own low-resolution grid, U-Net and heads) and
    the outputs, flipped back, are averaged; a scan not divisible by the factor along a mirrored axis is
    cropped before it is flipped back, so each copy's padding stays on its own far side."""
    net = _net([2, 2, 2])
    x = torch.randn(2, 31, 16, 20)
    region = [16, 16, 16]
    got = predict_patch_free_tiles(net, x, region, 0.5, axes, 0.125, CPU)
    combos = [[], [0]] if axes == [0] else [[], [0], [2], [0, 2]]
    copies = []
    for flip in combos:
        dims = [a + 1 for a in flip]
        out = predict_patch_free_tiles(net, x.flip(dims) if dims else x, region, 0.5, [], 0.125, CPU)
        copies.append(out.flip(dims) if dims else out)
    torch.testing.assert_close(got, torch.stack(copies).mean(0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, copies[0], atol=1e-3)  # the mirrored copies change the result


def test_a_scan_not_divisible_by_the_factor_is_padded_with_its_edge_and_cropped_back():
    net = _net([2, 2, 2])
    x = torch.randn(2, 33, 17, 30)
    got = predict_patch_free_tiles(net, x, [16, 16, 16], 0.5, [], 0.125, CPU)
    padded = F.pad(x[None], [0, 0, 0, 1, 0, 1], mode="replicate")[0]  # the last voxels repeated up to a multiple
    assert torch.equal(padded[:, 33, :17], x[:, 32]) and torch.equal(padded[:, :33, 17], x[:, :, 16])  # of 2
    want = predict_patch_free_tiles(net, padded, [16, 16, 16], 0.5, [], 0.125, CPU)
    assert got.shape == (3, 33, 17, 30)
    torch.testing.assert_close(got, want[:, :33, :17, :30])


def test_a_scan_thinner_than_the_region_on_one_axis_and_longer_on_another():
    """The low-resolution scan is padded to the low-resolution tile on the thin axis (the sliding window's
    symmetric zero padding) and slid along the long one; the result is the hand blend of the padded scan."""
    net = _net([2, 2, 2])
    x = torch.randn(2, 9, 40, 16)  # 9 slices: repeated to 10, then 5 low-resolution slices padded to the tile's 8
    region = [16, 16, 16]
    got = predict_patch_free_tiles(net, x, region, 0.5, [], 0.125, CPU)
    with torch.no_grad():
        low = net.low_resolution(F.pad(x[None], [0, 0, 0, 0, 0, 1], mode="replicate"))[0]
        low = F.pad(low, [0, 0, 0, 0, 1, 2])  # predict_logits: (8 - 5) // 2 before, the rest after
        up = F.interpolate(low[None], scale_factor=2, mode="nearest")[0]  # whose 2x2x2 means are `low` again
        blended = _blended_by_hand(net, up, region, 0.5)[:, 1:6]
        want = net.segmentation(blended[None, :8], blended[None, 8:])[0]
    assert got.shape == (3, 9, 40, 16)
    torch.testing.assert_close(got, want[:, :9], rtol=1e-4, atol=1e-5)


def test_wrong_inputs_are_refused():
    net = _net([2, 2, 2])
    with pytest.raises(TypeError, match="need a PatchFreeUNet, not Conv3d"):
        predict_patch_free_tiles(torch.nn.Conv3d(1, 2, 1), torch.zeros(1, 8, 8, 8), [8, 8, 8], 0.5, [], 0.125, CPU)
    with pytest.raises(ValueError, match="blended features of 5 channels; the network's heads take 8"):
        heads_by_blocks(net, torch.zeros(5, 4, 4, 4), CPU)


def _bare_predictor(device: torch.device = CPU):
    """A Predictor with only what ``_logits`` reads."""
    from autoseg.inference.predictor import Predictor

    predictor = Predictor.__new__(Predictor)
    predictor.device, predictor.step, predictor.mirror_axes, predictor.bfloat16 = device, 0.5, [], False
    predictor.plans = type("P", (), {"inference": type("I", (), {"gaussian_sigma_scale": 0.125})(), "amp": False})()
    return predictor


def test_the_predictor_slides_the_u_net_only_where_a_scan_needs_several_tiles(monkeypatch):
    """A patch-free network predicted by tiles goes through this path (the predictor's own composition, with its
    fallbacks, equal to predict_patch_free_tiles); in one pass (one tile) and for other networks the plain
    sliding window runs."""
    from autoseg.inference import predictor as predictor_module

    calls: list[str] = []
    real = pft.heads_by_blocks

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("heads")
        return real(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "heads_by_blocks", spy)
    net = _net([2, 2, 2], channels=1)
    predictor = _bare_predictor()
    x = torch.randn(1, 31, 16, 16)  # odd: padded with its edge, cropped back
    several = predictor._logits(net, x, [16, 16, 16])
    assert calls == ["heads"] and several.shape == (3, 31, 16, 16)
    torch.testing.assert_close(several, predict_patch_free_tiles(net, x, [16, 16, 16], 0.5, [], 0.125, CPU))
    one = predictor._logits(net, torch.randn(1, 16, 16, 16), [16, 16, 16])
    assert calls == ["heads"] and one.shape == (3, 16, 16, 16)
    predictor._logits(torch.nn.Conv3d(1, 3, 1).eval(), torch.randn(1, 32, 16, 16), [16, 16, 16])
    assert calls == ["heads"]
    predictor.mirror_axes = [0, 2]  # mirrored: the heads per copy; a CPU call's two inputs are two tiles
    mirrored = predictor._logits(net, x, [16, 16, 16], (1, 2))
    assert calls == ["heads"] * 5
    torch.testing.assert_close(mirrored, predict_patch_free_tiles(net, x, [16, 16, 16], 0.5, [0, 2], 0.125, CPU),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["heads", "sums"])
def test_gpu_out_of_memory_falls_back_once_per_scan_in_each_part(monkeypatch, where):
    """On a GPU the U-Net's low-resolution pass and the heads have their own fallbacks: out of memory in the
    heads retries them in smaller blocks, then on the CPU, without sliding the U-Net again; the next mirrored
    copy goes straight to the rung that worked; the cache is emptied outside the except block; the network
    comes back to the GPU after each CPU rung. Likewise for the U-Net's sums in GPU memory (``where``): the next
    copy keeps them in RAM, one tile at a time."""
    import sys

    from autoseg.inference import predictor as predictor_module
    from autoseg.plans import NetworkPlan

    from .test_predict import GPU_OOM

    net = _net([2, 2, 2], channels=1)
    moves: list[str] = []
    net.to = lambda device: moves.append(str(device)) or net  # type: ignore[method-assign]  # a CPU-only torch
    slides: list[tuple] = []
    heads: list[tuple[str, int]] = []
    handling: list = []

    def predict_logits(body, x, patch, step, mirror_axes, sigma, device, batch=1, amp=False, accumulate_on=None):
        slides.append((tuple(x.shape), tuple(patch), batch, accumulate_on.type))
        if where == "sums" and accumulate_on.type == "cuda":
            raise torch.cuda.OutOfMemoryError(GPU_OOM)
        return torch.zeros(net.up_seg.in_channels + 3, *x.shape[1:])

    def heads_by_blocks(net_, blended, device, amp=False, budget_bytes=pft.HEADS_BLOCK_BYTES):
        heads.append((device.type, budget_bytes))
        if where == "heads" and device.type == "cuda":
            raise torch.cuda.OutOfMemoryError(GPU_OOM)
        return torch.ones(3, *[n * 2 for n in blended.shape[1:]])

    monkeypatch.setattr(predictor_module, "predict_logits", predict_logits)
    monkeypatch.setattr(predictor_module, "heads_by_blocks", heads_by_blocks)
    monkeypatch.setattr(predictor_module, "cuda_free_bytes", lambda device: 10**12)
    monkeypatch.setattr(predictor_module, "choose_sums_device", lambda need, free: "cuda")
    monkeypatch.setattr(predictor_module, "choose_tiles_per_batch", lambda per_tile, free, n, kind: 4)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: handling.append(sys.exc_info()[0]))
    predictor = _bare_predictor(torch.device("cuda"))
    predictor.mirror_axes = [0]  # two mirrored copies
    predictor.plans.network = NetworkPlan("patch_free", [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1], 1,
                                          True, upsample_factor=[2, 2, 2], guidance_share=0.5,
                                          reconstruction_weight=0.5)
    predictor.plans.labels = {0: "a", 1: "b", 2: "c"}
    out = predictor._logits(net, torch.randn(1, 31, 16, 16), [16, 16, 16])
    assert out.shape == (3, 31, 16, 16) and bool((out == 1).all())
    low = ((1, 16, 8, 8), (8, 8, 8))  # the U-Net's input and tile: low resolution
    if where == "sums":  # the first copy's sums fall back to RAM; the second copy's start there
        assert slides == [(*low, 4, "cuda"), (*low, 1, "cpu"), (*low, 1, "cpu")]
        assert heads == [("cuda", pft.HEADS_BLOCK_BYTES)] * 2 and handling == [None] and moves == []
        return
    assert slides == [(*low, 4, "cuda")] * 2  # once per copy
    small = int(pft.HEADS_BLOCK_BYTES * pft.HEADS_FALLBACK_SHARE)
    cpu_rung = ("cpu", pft.HEADS_BLOCK_BYTES)
    assert heads == [("cuda", pft.HEADS_BLOCK_BYTES), ("cuda", small), cpu_rung, cpu_rung]
    assert handling == [None, None] and moves == ["cpu", "cuda"] * 2


def test_the_gpu_layout_prices_the_low_resolution_sums_and_tiles(monkeypatch):
    """On a GPU the sums of this path are the U-Net's features and logits at low resolution and a tile is the
    U-Net's alone on the region divided by the factor: that is what the layout must price (the full-resolution
    logit sums and whole-network tiles of the other path would be wrong both ways)."""
    from dataclasses import replace

    from autoseg.inference import predictor as predictor_module
    from autoseg.inference.predictor import Predictor
    from autoseg.inference.sliding_window import padded_shape, sums_bytes
    from autoseg.planning import make_plan
    from autoseg.planning.memory import step_cost
    from autoseg.plans import select_configuration

    from ..planning.fingerprints import CT, device

    p = select_configuration(make_plan(CT, device("cuda", 24), configurations=["3d", "patch_free"]), "patch_free")
    region, net = p.stages[-1].patch_size, p.network
    seen: dict[str, int] = {}
    monkeypatch.setattr(predictor_module, "cuda_free_bytes", lambda d: 2**40)
    monkeypatch.setattr(predictor_module, "choose_sums_device",
                        lambda need, free: seen.setdefault("need", need) and "cuda")
    monkeypatch.setattr(predictor_module, "choose_tiles_per_batch",
                        lambda per_tile, free, n, kind: seen.setdefault("per_tile", per_tile) and 1)
    predictor = Predictor(p, [(torch.nn.Identity(), region)], CPU)  # the layout reads the plan, not the net
    scan = [3 * r + 1 for r in region]
    low = [-(-s // f) for s, f in zip(scan, net.upsample_factor)]
    low_patch = [r // f for r, f in zip(region, net.upsample_factor)]
    predictor._gpu_layout(torch.zeros(1, *low), low_patch, low_resolution=True)
    k = len(p.labels)
    assert seen["need"] == sums_bytes(net.features[0] + k, 1, padded_shape(low, low_patch))
    body = replace(net, architecture="residual_unet", upsample_factor=[1, 1, 1])
    assert seen["per_tile"] == step_cost(body, low_patch, 1, 1, k, p.amp).activation_bytes
