"""``autoseg predict`` / ``Predictor`` / ``autoseg ensemble``: geometry, failures, reruns, averaging, and the
GPU paths that a CPU can observe: the memory fallbacks, out-of-memory messages, sticky device errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from autoseg.atomic import WriteError
from autoseg.cli import main
from autoseg.inference import predictor as predictor_module
from autoseg.inference.choice import predictor_for_run
from autoseg.inference.folder import ScanCase, find_scans, is_sticky_device_error, load_probabilities, share_by_size
from autoseg.inference.predictor import PredictionMemoryError, Predictor
from autoseg.inference.sliding_window import choose_tiles_per_batch, sums_bytes
from autoseg.io import read_image
from autoseg.planning.memory import step_cost
from autoseg.plans import PLANS_FILE, load_plans

from ..builders import DIRECTION, ORIGIN, write


def scans(folder, n=2, shape=(14, 30, 26), spacing=(0.8, 0.9, 2.5)):
    """Oblique, anisotropic, non-zero-origin scans in nnU-Net naming."""
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.normal(100, 10, shape).astype(np.float32)
        img[4:9, 8:20, 6:18] += 60
        write(folder / f"scan_{i}_0000.nii.gz", img, spacing=spacing)
    return folder


def test_prediction_has_the_input_geometry(trained_run, tmp_path, capsys):
    src = scans(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--no-tta"]) == 0
    assert "predicted 2 case(s)" in capsys.readouterr().out
    for i in range(2):
        img, g_in = read_image(src / f"scan_{i}_0000.nii.gz")
        seg, g_out = read_image(out / f"scan_{i}.nii.gz")
        assert seg.shape[1:] == img.shape[1:]
        assert g_out.spacing == pytest.approx(g_in.spacing) and g_out.origin == pytest.approx(ORIGIN)
        assert g_out.direction == pytest.approx(DIRECTION)
        assert set(np.unique(seg)) <= {0, 1, 2}


def test_bad_scan_is_named_and_the_others_are_written(trained_run, tmp_path, capsys):
    src = scans(tmp_path / "in")
    (src / "broken_0000.nii.gz").write_bytes(b"garbage")
    write(src / "nan_0000.nii.gz", np.full((8, 8, 8), np.nan, np.float32))
    out = tmp_path / "out"
    assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--no-tta"]) == 1
    captured = capsys.readouterr()
    assert "case broken" in captured.err and "case nan" in captured.err and "Traceback" not in captured.err
    assert "predicted 2 case(s)" in captured.out and "2 failed" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["scan_0.nii.gz", "scan_1.nii.gz"]
    # rerun: done cases are skipped, --overwrite redoes them
    (src / "broken_0000.nii.gz").unlink()
    (src / "nan_0000.nii.gz").unlink()
    assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--no-tta"]) == 0
    assert "skipped 2 already done" in capsys.readouterr().out
    assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--no-tta",
                 "--overwrite"]) == 0
    assert "predicted 2 case(s)" in capsys.readouterr().out


def test_empty_folder_and_missing_fold(trained_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--run",
                 str(trained_run)]) == 1
    assert "no images" in capsys.readouterr().err
    assert main(["predict", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--run", str(trained_run),
                 "--folds", "2"]) == 1
    assert "fold(s) 2 have no checkpoint_final.pt" in capsys.readouterr().err


def test_predictor_api(trained_run):
    p = Predictor.from_run(trained_run, folds=["0"], tta=False)
    rng = np.random.default_rng(1)
    image = rng.normal(100, 10, (12, 20, 18)).astype(np.float32)
    result = p.predict(image, spacing=(1.5, 1.0, 1.0), probabilities=True)
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert result.probabilities is not None and result.probabilities.shape == (3, *image.shape)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(result.labels, result.probabilities.argmax(0))
    with pytest.raises(ValueError, match="channel"):
        p.predict(np.zeros((2, 4, 4, 4)), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="NaN"):
        p.predict(np.full((4, 4, 4), np.nan), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        p.predict(image)


def test_the_cpu_predicts_with_a_contiguous_copy_of_a_channels_last_network(trained_run):
    """On the CPU a channels-last U-Net predicts through a contiguous copy (the caller's network keeps its
    layout: the trainer's is still training); the probabilities match the channels-last ones to float rounding,
    and a GPU (or channels_last=True) keeps the network as it is."""
    from autoseg.networks.resunet import ResidualUNet

    torch.manual_seed(0)
    net = ResidualUNet(1, 3, [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1], channels_last=True)
    channels_last = torch.channels_last_3d
    plans = load_plans(trained_run / PLANS_FILE)  # 1 channel, 3 classes
    contiguous = Predictor(plans, [(net, [8, 8, 8])], torch.device("cpu"))
    copy = contiguous.networks[0][0]
    assert copy is not net and copy.channels_last is False and net.channels_last is True
    assert all(p.is_contiguous() for p in copy.parameters())
    assert all(p.is_contiguous(memory_format=channels_last) for p in net.parameters() if p.dim() == 5)
    same = Predictor(plans, [(net, [8, 8, 8])], torch.device("cpu"), channels_last=True)
    assert same.networks[0][0] is net
    x = np.random.default_rng(0).normal(size=(1, 12, 10, 9)).astype(np.float32)
    np.testing.assert_allclose(contiguous.predict_preprocessed(x), same.predict_preprocessed(x), atol=1e-5)
    assert predictor_module._in_layout(net, torch.device("cuda"), None) is net  # a GPU predicts as trained


def test_the_cpu_predicts_with_a_channels_last_patch_free_network(trained_run):
    """A patch-free network is the exception (its full-resolution heads are faster channels-last on the CPU):
    a contiguous one predicts through a channels-last copy, flag included, with the same probabilities."""
    from autoseg.networks.patchfree import PatchFreeUNet

    torch.manual_seed(0)
    net = PatchFreeUNet(1, 3, [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1], 1, True, [2, 2, 2], 0.5, 0.5)
    plans = load_plans(trained_run / PLANS_FILE)  # 1 channel, 3 classes
    last = Predictor(plans, [(net, [8, 8, 8])], torch.device("cpu"))
    copy = last.networks[0][0]
    assert copy is not net and copy.channels_last is True and copy.body.channels_last is True
    assert net.channels_last is False and all(p.is_contiguous() for p in net.parameters())
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in copy.parameters() if p.dim() == 5)
    contiguous = Predictor(plans, [(net, [8, 8, 8])], torch.device("cpu"), channels_last=False)
    assert contiguous.networks[0][0] is net
    x = np.random.default_rng(0).normal(size=(1, 12, 10, 9)).astype(np.float32)
    np.testing.assert_allclose(last.predict_preprocessed(x), contiguous.predict_preprocessed(x), atol=1e-5)


def test_the_cpu_puts_two_inputs_in_a_call_mirrored_copies_first_then_tiles(trained_run):
    """On the CPU (with a plan that trained the patch at batch 2 or more) a network call takes two mirrored copies
    of a tile, or without mirroring two tiles of the volume; the probabilities equal one input per call to float
    rounding. A volume of one tile predicts unmirrored alone."""
    from dataclasses import replace

    from autoseg.networks.resunet import ResidualUNet

    torch.manual_seed(0)
    net = ResidualUNet(1, 3, [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1]).eval()
    plans = load_plans(trained_run / PLANS_FILE)
    plans = replace(plans, stages=[replace(st, patch_size=[8, 8, 8], batch_size=2) for st in plans.stages])
    batches: list[int] = []
    net.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    x = np.random.default_rng(0).normal(size=(1, 12, 16, 12)).astype(np.float32)  # 12 tiles of 8^3
    flips = 2 ** len(plans.inference.mirror_axes)
    assert flips >= 2
    for tta, calls in ((False, 12 // 2), (True, 12 * flips // 2)):
        paired = Predictor(plans, [(net, [8, 8, 8])], torch.device("cpu"), tta=tta)
        batches.clear()
        got = paired.predict_preprocessed(x)
        assert batches == [2] * calls
        alone = Predictor(plans, [(net, [8, 8, 8])], torch.device("cpu"), tta=tta)
        alone.max_items_per_call = 1
        batches.clear()
        np.testing.assert_allclose(got, alone.predict_preprocessed(x), atol=1e-5)
        assert set(batches) == {1}
    one_tile = Predictor(plans, [(net, [8, 8, 8])], torch.device("cpu"), tta=False)
    batches.clear()
    one_tile.predict_preprocessed(x[:, :8, :8, :8])
    assert batches == [1]


def test_two_folds_average_and_ensemble(trained_run, tmp_path, capsys):
    src = scans(tmp_path / "in", n=1)
    outs = {}
    for fold in ("0", "1"):
        outs[fold] = tmp_path / f"f{fold}"
        assert main(["predict", "-i", str(src), "-o", str(outs[fold]), "--run", str(trained_run), "--folds", fold,
                     "--no-tta", "--save-probabilities"]) == 0
    both = tmp_path / "both"
    assert main(["predict", "-i", str(src), "-o", str(both), "--run", str(trained_run), "--no-tta",
                 "--save-probabilities"]) == 0
    assert main(["ensemble", str(outs["0"]), str(outs["1"]), "-o", str(tmp_path / "ens")]) == 0
    p0, values, _ = load_probabilities(outs["0"] / "scan_0.npz")
    p1, _, _ = load_probabilities(outs["1"] / "scan_0.npz")
    pb, _, _ = load_probabilities(both / "scan_0.npz")
    np.testing.assert_allclose(pb, (p0 + p1) / 2, atol=2e-3)  # float16 storage
    ens, _ = read_image(tmp_path / "ens" / "scan_0.nii.gz")
    expected = np.asarray(values)[((p0 + p1) / 2).argmax(0)]
    assert np.mean(ens[0] == expected) > 0.999  # ties under float16 rounding may differ
    assert main(["ensemble", str(outs["0"]), "-o", str(tmp_path / "x")]) == 1
    assert "at least two" in capsys.readouterr().err


def _probabilities(folder, cid: str, shape=(2, 3, 4), values=(0, 1, 2), seed: int = 0) -> None:
    from autoseg.inference.folder import save_probabilities
    from autoseg.io import Geometry

    folder.mkdir(parents=True, exist_ok=True)
    probs = np.random.default_rng(seed).dirichlet(np.ones(len(values)), shape).transpose(3, 0, 1, 2)
    geo = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), shape[::-1])
    save_probabilities(probs.astype(np.float32), list(values), geo, folder / f"{cid}.npz")


@pytest.mark.parametrize("broken", ["empty", "truncated", "npy", "foreign"])
def test_ensemble_names_a_file_that_is_not_autoseg_probabilities(tmp_path, capsys, broken):
    """An empty, truncated or foreign .npz, or a bare .npy under an .npz name: one line naming the file,
    never a traceback (numpy raises EOFError, BadZipFile or hands back an array for these)."""
    a, b = tmp_path / "a", tmp_path / "b"
    _probabilities(a, "s0")
    _probabilities(b, "s0", seed=1)
    bad = b / "s0.npz"
    if broken == "empty":
        bad.write_bytes(b"")
    elif broken == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    elif broken == "npy":
        with open(bad, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        np.savez(bad, something=np.zeros(3))
    assert main(["ensemble", str(a), str(b), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: not a probabilities file written by autoseg")
    assert lines[0].endswith("stopped there: nothing was written") and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.nii.gz"))


@pytest.mark.parametrize("arrays", [{"labels": np.array(1)}, {"labels": np.array([0, 1])},
                                    {"direction": np.zeros(4)}])
def test_ensemble_names_probabilities_whose_arrays_do_not_fit(tmp_path, capsys, arrays):
    """A 0-d label array, fewer labels than probability channels, or a 2D direction: one line naming the file."""
    a, b = tmp_path / "a", tmp_path / "b"
    _probabilities(a, "s0")
    _probabilities(b, "s0", seed=1)
    with np.load(b / "s0.npz") as z:
        content = {k: z[k] for k in z.files}
    content.update(arrays)
    with open(b / "s0.npz", "wb") as f:
        np.savez(f, **content)
    assert main(["ensemble", str(a), str(b), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {b / 's0.npz'}: not a probabilities file written by")
    assert "Traceback" not in err


def test_ensemble_stopped_by_a_mismatch_says_what_it_already_wrote(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for cid in ("s0", "s1"):
        _probabilities(a, cid)
    _probabilities(b, "s0", seed=1)
    _probabilities(b, "s1", shape=(2, 3, 5))
    assert main(["ensemble", str(a), str(b), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{b / 's1.npz'}: shape [3, 2, 3, 5]" in err and f"differ from {a / 's1.npz'}" in err
    assert f"stopped there: the 1 case(s) before it are in {tmp_path / 'out'}" in err
    assert "nothing was written" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s0.nii.gz"]


def test_find_scans_naming(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b.nii.gz", "scan_2024.nii.gz", "notes.txt", "c_0001.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    cases, problems = find_scans(tmp_path, 2)
    assert [(c.case_id, len(c.files)) for c in cases] == [("a", 2), ("b", 1)]
    assert any("case c" in p for p in problems) and any("case scan" in p for p in problems)
    cases, problems = find_scans(tmp_path, 1)
    assert {c.case_id for c in cases} >= {"b", "scan_2024"} and not any("scan" in p for p in problems)


@pytest.mark.parametrize("channels", [1, 2])
def test_a_case_named_both_ways_is_a_problem_not_two_predictions_into_one_file(tmp_path, channels):
    names = ["a.nii.gz", *(f"a_{c:04d}.nii.gz" for c in range(channels)), "b.nii.gz", "d_0000.nii.gz"]
    for name in names + ([f"d_{c:04d}.nii.gz" for c in range(1, channels)]):
        (tmp_path / name).write_bytes(b"")
    cases, problems = find_scans(tmp_path, channels)
    assert [c.case_id for c in cases] == ["b", "d"]
    both = ", ".join(f"a_{c:04d}.nii.gz" for c in range(channels))
    assert problems == [f"case a: both a.nii.gz and channel file(s) {both}; keep one naming"]
    if channels == 2:  # an incomplete group beside the single file: both problems, and neither is predicted
        (tmp_path / "a_0001.nii.gz").unlink()
        cases, problems = find_scans(tmp_path, 2)
        assert [c.case_id for c in cases] == ["b", "d"]
        assert problems == ["case a: channel files ['_0000']; the run expects ['_0000', '_0001']",
                            "case a: both a.nii.gz and channel file(s) a_0000.nii.gz; keep one naming"]


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)")
GPU_OOM = "CUDA out of memory. Tried to allocate 1.00 GiB. GPU 0 has a total capacity of 8.00 GiB\nmore advice"
STICKY = ("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported at some "
          "other API call, so the stacktrace below might be incorrect.")


class _HeldOnCpu(nn.Module):
    """Stands in for a network on a GPU: a CPU build of PyTorch cannot move one there, so ``to`` only records."""

    def __init__(self) -> None:
        super().__init__()
        self.moves: list[str] = []

    def to(self, *args, **kwargs):  # type: ignore[override]
        self.moves.append(str(args[0]))
        return self


def fake_gpu(monkeypatch, run, free_bytes, error_on):
    """A Predictor that takes itself to be on a GPU with ``free_bytes`` free; its sliding window only records
    (network device, tiles per batch, sums device) and raises ``error_on(device type)`` when that is not None;
    ``torch.cuda.empty_cache`` records whether an exception was being handled when it was called."""
    plans = load_plans(run / PLANS_FILE)
    net = _HeldOnCpu()
    p = Predictor(plans, [(net, [8, 8, 8])], torch.device("cpu"), tta=False)
    p.device = torch.device("cuda")
    calls: list[tuple] = []
    handling: list = []

    def predict_logits(net, x, patch, step, mirror_axes, sigma_scale, device, tiles_per_batch=1, amp=False,
                       accumulate_on=None):
        calls.append((device.type, tiles_per_batch, accumulate_on.type if accumulate_on is not None else None))
        error = error_on(device.type)
        if error is not None:
            raise error
        return torch.zeros(len(plans.labels), *x.shape[1:])

    monkeypatch.setattr(predictor_module, "predict_logits", predict_logits)
    monkeypatch.setattr(predictor_module, "cuda_free_bytes", lambda device: free_bytes)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: handling.append(sys.exc_info()[0]))
    return p, net, calls, handling


def test_gpu_fallbacks_in_order_with_the_cache_emptied_outside_except(trained_run, monkeypatch):
    p, net, calls, handling = fake_gpu(monkeypatch, trained_run, 10**12,
                                       lambda dev: torch.cuda.OutOfMemoryError(GPU_OOM) if dev == "cuda" else None)
    probs = p.predict_preprocessed(np.zeros((1, 16, 16, 16), np.float32))  # patch 8, step 0.5: 27 tiles
    np.testing.assert_allclose(probs, 1 / 3)  # softmax of zero logits over 3 classes
    # sums on the GPU with 8 tiles a batch (the cap) -> sums in RAM one tile at a time -> the network on the CPU
    assert calls == [("cuda", 8, "cuda"), ("cuda", 1, "cpu"), ("cpu", 1, None)]
    assert handling == [None, None]  # emptied twice, never while the exception (and its frames) was alive
    assert net.moves[-2:] == ["cpu", "cuda"]  # to the CPU for the last rung and back


def test_sums_too_large_for_the_gpu_start_in_ram(trained_run, monkeypatch):
    plans = load_plans(trained_run / PLANS_FILE)
    need = sums_bytes(3, 1, [64, 64, 64])
    assert need == 5 * 64**3 * 4
    per_tile = step_cost(plans.network, [8, 8, 8], 1, 1, 3, plans.amp).activation_bytes
    free = need + 3 * per_tile  # the sums need more than 60 % of it; 80 % of it holds several tiles
    batch = choose_tiles_per_batch(per_tile, free, 15**3, "cuda")
    assert batch > 1
    p, _, calls, handling = fake_gpu(monkeypatch, trained_run, free, lambda dev: None)
    p.predict_preprocessed(np.zeros((1, 64, 64, 64), np.float32))
    assert calls == [("cuda", batch, "cpu")] and handling == []


def test_out_of_memory_after_every_fallback_is_one_line(trained_run, monkeypatch):
    p, _, calls, _ = fake_gpu(monkeypatch, trained_run, 10**12, lambda dev: torch.cuda.OutOfMemoryError(GPU_OOM)
                              if dev == "cuda" else RuntimeError(CPU_OOM))
    with pytest.raises(PredictionMemoryError) as err:
        p.predict_preprocessed(np.zeros((1, 16, 20, 12), np.float32))
    msg = str(err.value)
    assert len(calls) == 3 and "\n" not in msg
    assert msg.startswith("out of memory (RAM) predicting a 16x20x12 volume (after preprocessing, 1 channel(s), 3 "
                          "classes) with patch 8x8x8 on cuda (sums in RAM and the network on the CPU were tried too)")
    assert "free RAM" in msg and "--folds" not in msg  # one network: fewer folds would not help


def test_gpu_out_of_memory_that_escapes_says_so(trained_run, monkeypatch):
    p, _, _, _ = fake_gpu(monkeypatch, trained_run, 10**12, lambda dev: torch.cuda.OutOfMemoryError(GPU_OOM))
    with pytest.raises(PredictionMemoryError, match=r"^out of GPU memory predicting a 8x8x8 volume .* on cuda .*"
                       r"\(CUDA out of memory\. Tried to allocate 1\.00 GiB\. GPU 0 has a total capacity of 8\.00 "
                       r"GiB\); free the GPU of other processes or predict with --device cpu$"):
        p.predict_preprocessed(np.zeros((1, 8, 8, 8), np.float32))


def test_out_of_ram_names_the_case_in_one_line(trained_run, tmp_path, monkeypatch, capsys):
    def out_of_ram(*args, **kwargs):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(predictor_module, "predict_logits", out_of_ram)
    src = scans(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--folds", "0",
                 "--no-tta"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert re.match(rf"error: case scan_{i}: out of memory \(RAM\) predicting a \d+x\d+x\d+ volume \(after "
                        r"preprocessing, 1 channel\(s\), 3 classes\) with patch \d+x\d+x\d+ on cpu: its sums and "
                        r"input alone take \d+\.\d GiB; free RAM", line), line
    assert not out.exists() or not list(out.iterdir())


def test_is_sticky_device_error():
    sticky = [RuntimeError(STICKY), RuntimeError("CUDA error: an illegal memory access was encountered"),
              torch.AcceleratorError("CUDA error: unspecified launch failure")]
    not_sticky = [torch.cuda.OutOfMemoryError(GPU_OOM), RuntimeError("CUDA error: out of memory"),
                  RuntimeError(CPU_OOM),
                  RuntimeError("Given groups=1, weight of size [16, 1, 3, 3, 3]"), ValueError("CUDA error"),
                  MemoryError()]
    assert [is_sticky_device_error(e) for e in sticky] == [True] * 3
    assert [is_sticky_device_error(e) for e in not_sticky] == [False] * 6


def _fail_second_call(monkeypatch, error: Exception) -> list[int]:
    """Make the 2nd ``predict_preprocessed`` call raise ``error``; returns the list of calls made."""
    calls: list[int] = []
    real = Predictor.predict_preprocessed

    def flaky(self, data):
        calls.append(len(calls) + 1)
        if len(calls) == 2:
            raise error
        return real(self, data)

    monkeypatch.setattr(Predictor, "predict_preprocessed", flaky)
    return calls


def test_sticky_device_error_stops_the_run_and_a_rerun_continues(trained_run, tmp_path, monkeypatch, capsys):
    src = scans(tmp_path / "in", n=4)
    out = tmp_path / "out"
    cmd = ["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--folds", "0", "--no-tta"]
    calls = _fail_second_call(monkeypatch, RuntimeError(STICKY))
    assert main(cmd) == 1
    err = capsys.readouterr().err
    assert calls == [1, 2]  # scan_2 and scan_3 never reached the network
    assert sorted(p.name for p in out.iterdir()) == ["scan_0.nii.gz"]  # nothing half-written
    assert "Traceback" not in err and "asynchronously" not in err
    assert err.strip() == (
        "error: case scan_1: the GPU failed (CUDA error: device-side assert triggered) and stays unusable in this "
        "process, so the run stopped: 1 case(s) written in this run, 0 done before, 2 not attempted. Run the same "
        "command again to continue (finished cases are skipped); if case scan_1 fails again, predict it with "
        "--device cpu")
    monkeypatch.undo()
    assert main(cmd) == 0
    rerun = capsys.readouterr().out
    assert "predicted 3 case(s)" in rerun and "skipped 1 already done" in rerun
    assert sorted(p.name for p in out.iterdir()) == [f"scan_{i}.nii.gz" for i in range(4)]


def test_ordinary_case_error_fails_only_that_case(trained_run, tmp_path, monkeypatch, capsys):
    src = scans(tmp_path / "in", n=4)
    out = tmp_path / "out"
    calls = _fail_second_call(monkeypatch, ValueError("scan_1_0000.nii.gz: not a NIfTI file"))
    assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--folds", "0",
                 "--no-tta"]) == 1
    captured = capsys.readouterr()
    assert calls == [1, 2, 3, 4]
    assert captured.err.strip() == "error: case scan_1: scan_1_0000.nii.gz: not a NIfTI file"
    assert "predicted 3 case(s)" in captured.out and "1 failed" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["scan_0.nii.gz", "scan_2.nii.gz", "scan_3.nii.gz"]


def test_the_input_folder_as_output_and_nonfinite_scans(trained_run, tmp_path, capsys, caplog):
    """-o equal to -i is refused before anything is read; a scan with a few NaN voxels is refused with their
    count, and with --fix-nonfinite predicted as the same scan with its channel minimum there, with a line."""
    src = tmp_path / "in"
    shutil.copytree(trained_run.parent / "data" / "imagesTr", src)
    assert main(["predict", "-i", str(src), "-o", str(src / "."), "--run", str(trained_run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the input folder" in err, err
    scan = sorted(src.glob("*.nii.gz"))[0]
    img = sitk.ReadImage(str(scan))
    array = sitk.GetArrayFromImage(img).astype(np.float32)
    array[0, 0, :3] = np.nan
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(scan))
    out = tmp_path / "out"
    assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "contains 3 NaN and 0 infinite voxel(s)" in err and "--fix-nonfinite" in err, err
    with caplog.at_level("WARNING"):
        assert main(["predict", "-i", str(src), "-o", str(out), "--run", str(trained_run), "--no-progress",
                     "--fix-nonfinite"]) == 0
    assert "3 NaN/infinite voxel(s) set to the channel's minimum" in caplog.text
    image, geometry = read_image(scan)
    image[0, 0, 0, :3] = np.nanmin(image)
    expected = predictor_for_run(trained_run)[0].predict(image, geometry=geometry).labels
    np.testing.assert_array_equal(read_image(out / scan.name.replace("_0000", ""))[0][0], expected)


def test_a_full_disk_stops_prediction_with_one_line_and_a_rerun_continues(trained_run, tmp_path, monkeypatch,
                                                                          capsys):
    from autoseg.inference import folder

    out = tmp_path / "out"
    real, calls = folder.write_image, {"n": 0}

    def full_after_one(array, geometry, path):
        calls["n"] += 1
        if calls["n"] > 1:
            raise WriteError(f"{path}: could not be written: the disk is full (0 MiB free); nothing was written in "
                             "its place")
        real(array, geometry, path)

    monkeypatch.setattr(folder, "write_image", full_after_one)
    images = trained_run.parent / "data" / "imagesTr"
    assert main(["predict", "-i", str(images), "-o", str(out), "--run", str(trained_run), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the disk is full" in err[0] and "The run stopped: 1 case(s) written" in err[0], err
    assert len(list(out.glob("*.nii.gz"))) == 1 and not list(out.glob(".*"))
    monkeypatch.setattr(folder, "write_image", real)
    assert main(["predict", "-i", str(images), "-o", str(out), "--run", str(trained_run), "--no-progress"]) == 0
    assert len(list(out.glob("*.nii.gz"))) == len(list(images.glob("*.nii.gz")))


def test_share_by_size_balances_bytes_not_counts(tmp_path):
    sizes = {"a": 900, "b": 500, "c": 400, "d": 100, "e": 100}
    cases = []
    for cid, n in sizes.items():
        (tmp_path / f"{cid}.nii.gz").write_bytes(b"x" * n)
        cases.append(ScanCase(cid, (tmp_path / f"{cid}.nii.gz",), ".nii.gz"))
    shares = share_by_size(cases, 2)
    assert [[c.case_id for c in s] for s in shares] == [["a", "d"], ["b", "c", "e"]]  # 1000 and 1000 bytes
    assert share_by_size(cases, 1) == [sorted(cases, key=lambda c: c.case_id)]
    assert share_by_size(cases[:1], 3)[1:] == [[], []]


def test_two_processes_write_exactly_the_files_of_one(trained_run, tmp_path):
    """``--gpus 2 --device cpu``: two gloo processes share the scans, each writes its own, rank 0 prints one
    summary; the files equal a single process's byte for byte (both with one thread per process), and a rerun
    skips everything."""
    images = trained_run.parent / "data" / "imagesTr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "autoseg", "predict", "-i", str(images), "--run", str(trained_run),
            "--save-probabilities", "--no-progress", "--device", "cpu"]
    one = subprocess.run([*base, "-o", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*base, "-o", str(tmp_path / "two"), "--gpus", "2"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    n = len(list(images.glob("*.nii.gz")))
    assert [ln for ln in two.stdout.splitlines() if ln.startswith("predicted")] == [
        ln for ln in two.stdout.splitlines() if ln.startswith(f"predicted {n} case(s)") and "over 2 processes" in ln]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 2 * n
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    again = subprocess.run([*base, "-o", str(tmp_path / "two"), "--gpus", "2"], capture_output=True, text=True,
                           env=env, timeout=600)
    assert again.returncode == 0 and "predicted 0 case(s)" in again.stdout and f"skipped {n} already" in again.stdout
