"""Prove autoseg's CUDA paths on a GPU machine in a few minutes: one row per check, PASS/FAIL/skipped and the
measured figure; exit code 1 if any check fails.

Usage: python benchmarks/gpu_check.py [--device auto|cuda|cpu] [--gpus N] [--hippocampus DIR] [--keep DIR]

Checks: device detection and the plan's memory budget; a short two-stage training (AMP on CUDA); per stage, the
peak memory allocated by training steps against the plan's estimate; SIGTERM in the middle of a stage, rerun, and
final weights equal to an uninterrupted run (``--deterministic``); two-process DDP (NCCL on 2 GPUs, gloo on the
CPU) with replicas identical and the same stop on SIGTERM; prediction on the GPU against the same network on the
CPU (fp32 on both; AMP reported beside) over a real case mirrored out to several tiles; MONAI's SegResNet,
Attention U-Net and UNETR planned for the device (``plan --configs all``): per configuration and stage a training
step at the plan's patch and batch in the plan's precision, and on CUDA its peak memory against the plan's measured
estimate; the patch-free network's tiles on the GPU against the CPU, and the predictor's own path for them (on CUDA
also with the sums kept in RAM) against the plain function; training and prediction throughput of the Hippocampus
plan (figures only; training also in the memory layout the plan did not choose, channels-last or contiguous, to
check the plan's choice on this GPU); whether the default data workers feed the device (one worker's batches per
second against the steps per second, which include the augmentation on the device where the plan puts it there, as
GPU plans do; on a GPU a FAIL says it would starve).
With ``--device cpu`` (what CI runs, to keep this script from rotting) the CUDA-only rows say "skipped: no
CUDA". Data: a generated dataset (larger on a GPU), and ``--hippocampus`` (default
``../shared/data/MSD_Task04_Hippocampus``) for the throughput rows when it exists.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _measure import batches_per_second, device_augment_seconds

from autoseg.checkpoint import load_checkpoint
from autoseg.cli import main as autoseg_main
from autoseg.demo import make_synthetic_dataset
from autoseg.device import detect_device
from autoseg.inference.predictor import Predictor
from autoseg.networks import build_network
from autoseg.parallel import available_cores
from autoseg.plans import Plans, configuration_names, load_plans, select_configuration
from autoseg.runconfig import Overrides
from autoseg.training.budget import measure_step_seconds
from autoseg.training.config import stage_runs
from autoseg.training.data import BatchDataset, PatchSampler
from autoseg.training.interrupt import TrainingInterrupted
from autoseg.training.losses import planned_loss
from autoseg.training.runtime import Runtime, configure_backends, data_workers, distributed_runtime
from autoseg.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
#: the peak allocated memory of a training step must be within this share of the plan's estimate
MEMORY_TOLERANCE = 0.25
#: share of voxels whose label must agree between GPU and CPU prediction
AGREEMENT = 0.999


@dataclass
class Row:
    check: str
    status: str  # PASS, FAIL or "skipped: ..."
    figure: str


def quiet(fn: Callable[[], object]) -> object:
    """Run ``fn`` with its stdout swallowed (autoseg's commands print summaries)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


def cli(*args: str) -> None:
    code = quiet(lambda: autoseg_main(list(args)))
    if code != 0:
        raise RuntimeError(f"autoseg {' '.join(args)} exited {code}")


def prepare_run(root: Path, device: str, shape: tuple[int, int, int], cases: int) -> Path:
    data = make_synthetic_dataset(root / "data", n_cases=cases, shape=shape, spacing_xyz=(1.0, 1.0, 1.0))
    run = root / "run"
    cli("plan", str(data), "-o", str(run), "--device", device, "--folds", "3", "--no-progress")
    cli("preprocess", str(run), "--no-progress")
    return run


def check_device(device: torch.device) -> Row:
    info = detect_device(device="cuda" if device.type == "cuda" else "cpu")
    ok = info.kind == device.type and info.budget_gib > 0
    mem = f"{info.gpu_memory_gib:.1f} GiB GPU" if info.gpu_memory_gib else f"{info.ram_gib:.1f} GiB RAM"
    return Row("device and memory budget", "PASS" if ok else "FAIL",
               f"{info.kind}: {info.name}, {mem}, plan budget {info.budget_gib:.1f} GiB")


def check_training(run: Path, device: torch.device, iterations: int) -> Row:
    """Two stages, 2 + 1 epochs (AMP when the plan says so on CUDA), finite losses."""
    rt = Runtime(device, workers=2, progress=False)
    t0 = time.perf_counter()
    trainer = Trainer(run, "0", Overrides("both", 2, iterations, None), rt, say=lambda s: None)
    trainer.fit()
    seconds = time.perf_counter() - t0
    state = load_checkpoint(run / "fold_0" / "checkpoint_final.pt")["state"]
    losses = state.history["train_loss"]
    ok = state.stage == 2 and all(np.isfinite(losses)) and len(losses) == 3
    amp = "AMP" if trainer.amp else "fp32"
    return Row(f"two-stage training ({amp})", "PASS" if ok else "FAIL",
               f"{len(losses)} epochs x {iterations} steps in {seconds:.0f} s, last loss {losses[-1]:.3f}, "
               f"skipped steps {int(sum(state.history.get('skipped_steps', [0])))}")


def check_memory(run: Path, device: torch.device) -> list[Row]:
    """Per stage: the peak memory allocated by training steps at the plan's patch and batch (AMP as planned)
    against the plan's estimate. cuDNN autotuning is off and the peak is taken from the third step on, so
    that its workspace trials and first-call set-up, which the estimate leaves out, are not counted."""
    if device.type != "cuda":
        return [Row("peak GPU memory vs plan", "skipped: no CUDA", "")]
    return _memory_rows(load_plans(run / "plans.json"), device, "")


def _replan(run: Path, dest: Path, device: torch.device, configs: str) -> Plans:
    """``run`` copied to ``dest`` without its trained folds, its dataset planned again there for ``device`` with
    ``--configs configs`` (the preprocessed data reused): the returned plan holds those configurations."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("fold_*", "2d"))
    dataset = json.loads((dest / "fingerprint.json").read_text())["dataset_dir"]
    cli("plan", dataset, "-o", str(dest), "--device", device.type, "--configs", configs, "--no-progress")
    return load_plans(dest / "plans.json")


def check_monai(run: Path, root: Path, device: torch.device) -> list[Row]:
    """MONAI's networks and the patch-free network planned for this device beside ours: on CUDA the peak memory
    of their steps against the plan's estimate (measured on the meta device and scaled), on the CPU one step per
    stage, finite."""
    data = load_plans(run / "plans.json")
    plans = _replan(run, root / "monai_run", device, "all")
    names = [n for n in configuration_names(plans) if n not in configuration_names(data)]
    missing = [n for n in ("segresnet", "attention_unet", "unetr", "patch_free") if n not in names]
    rows = [Row(f"plan {n}", "FAIL", plans.configuration_reasons.get(n, "")) for n in missing]
    for name in names:
        p = select_configuration(plans, name)
        if device.type == "cuda":
            rows += _memory_rows(p, device, f"{name}, ")
            continue
        k, c = len(p.labels), len(p.channel_names)
        for st, st_run in zip(p.stages, stage_runs(p, Overrides("both", None, None, None))):
            net = build_network(p.network, c, k)
            sec = measure_step_seconds(net, planned_loss(p.training), st_run, st.batch_size, c, k, device, p.amp,
                                       warmup=0, timed=1)
            ok = all(torch.isfinite(t).all() for t in net.parameters())
            rows.append(Row(f"{name} step, {st.name}", "PASS" if ok else "FAIL",
                            f"{sec:.2f} s at patch {'x'.join(map(str, st.patch_size))}, batch {st.batch_size} "
                            f"({st.estimated_step_gflops:.0f} GFLOP planned)"))
    return rows


def _memory_rows(plans: Plans, device: torch.device, label: str) -> list[Row]:
    k, c = len(plans.labels), len(plans.channel_names)
    configure_backends(device, True)
    rows = []
    for st, st_run in zip(plans.stages, stage_runs(plans, Overrides("both", None, None, None))):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        net = build_network(plans.network, c, k)
        loss = planned_loss(plans.training)
        measure_step_seconds(net, loss, st_run, st.batch_size, c, k, device, plans.amp, warmup=2, timed=1)
        torch.cuda.reset_peak_memory_stats(device)
        measure_step_seconds(net, loss, st_run, st.batch_size, c, k, device, plans.amp, warmup=0, timed=2)
        peak = torch.cuda.max_memory_allocated(device) - base
        del net, loss
        ratio = peak / (st.estimated_memory_gib * 2**30)
        rows.append(Row(f"peak GPU memory vs plan, {label}{st.name}",
                        "PASS" if abs(ratio - 1) <= MEMORY_TOLERANCE else "FAIL",
                        f"{peak / 2**30:.2f} GiB measured / {st.estimated_memory_gib:.2f} GiB planned = {ratio:.2f} "
                        f"(target 1 +- {MEMORY_TOLERANCE:g}; patch {'x'.join(map(str, st.patch_size))}, batch "
                        f"{st.batch_size})"))
    configure_backends(device, False)
    return rows


def _train_cmd(run: Path, device: str, epochs: int, iterations: int) -> list[str]:
    return [sys.executable, "-m", "autoseg", "train", "0", "--run", str(run), "--epochs", str(epochs),
            "--iterations-per-epoch", str(iterations), "--device", device, "--deterministic", "-j", "1",
            "--no-progress"]


def check_resume(run: Path, root: Path, device: str, iterations: int) -> Row:
    """SIGTERM after the first epoch line, rerun, and compare with an uninterrupted run."""
    reference, stopped = root / "reference", root / "stopped"
    for d in (reference, stopped):
        shutil.copytree(run, d)
        shutil.rmtree(d / "fold_0", ignore_errors=True)
    if subprocess.run(_train_cmd(reference, device, 3, iterations), capture_output=True).returncode != 0:
        return Row("SIGTERM, resume = uninterrupted", "FAIL", "the uninterrupted run failed")
    proc = subprocess.Popen(_train_cmd(stopped, device, 3, iterations), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log, deadline = stopped / "fold_0" / "training_log.txt", time.time() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    where = load_checkpoint(stopped / "fold_0" / "checkpoint_latest.pt")["state"] \
        if (stopped / "fold_0" / "checkpoint_latest.pt").is_file() else None
    resumed = subprocess.run(_train_cmd(stopped, device, 3, iterations), capture_output=True, text=True)
    if proc.returncode != 128 + signal.SIGTERM or where is None or resumed.returncode != 0:
        last = (err + resumed.stderr).strip().splitlines()
        return Row("SIGTERM, resume = uninterrupted", "FAIL", f"exit {proc.returncode}: {last[-1] if last else ''}")
    a = load_checkpoint(reference / "fold_0" / "checkpoint_final.pt")["network"]
    b = load_checkpoint(stopped / "fold_0" / "checkpoint_final.pt")["network"]
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return Row("SIGTERM, resume = uninterrupted", "PASS" if diff <= 1e-5 else "FAIL",
               f"stopped at stage {where.stage} step {where.step}; max weight difference {diff:.2e}")


def _ddp_worker(rank: int, run: str, out: str, port: int, device: str, stop_at: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    rt = distributed_runtime(device, 0, False)
    trainer = Trainer(Path(run), "0", Overrides("zoom-in", 2, 6, None), rt, say=lambda s: None)
    if stop_at and rank == 1:  # one rank alone is signalled: both must stop on the same step
        agree = trainer._agree_to_stop
        calls = {"n": 0}

        def signal_rank_1(batch: dict | None, where: str) -> bool:
            calls["n"] += 1
            if calls["n"] == stop_at:
                trainer.stop.handle(signal.SIGTERM, None)
            return agree(batch, where)

        trainer._agree_to_stop = signal_rank_1  # type: ignore[method-assign]
    try:
        net = trainer.fit()
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, Path(out) / f"rank{rank}.pt")
    except TrainingInterrupted as e:
        Path(out, f"rank{rank}.stopped").write_text(str(e))
    finally:
        rt.close()


def _spawn(run: Path, out: Path, device: str, stop_at: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.spawn(_ddp_worker, args=(str(run), str(out), port, device, stop_at), nprocs=2,
                                      join=False)
    deadline = time.time() + 600
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise RuntimeError("the DDP ranks hung")


def check_ddp(run: Path, root: Path, device: torch.device, gpus: int) -> Row:
    name = "DDP 2 processes (NCCL)" if device.type == "cuda" else "DDP 2 processes (gloo, CPU)"
    if device.type == "cuda" and min(gpus, torch.cuda.device_count()) < 2:
        return Row(name, f"skipped: {torch.cuda.device_count()} GPU", "")
    kind = "cuda" if device.type == "cuda" else "cpu"
    full, stopped = root / "ddp_full", root / "ddp_stop"
    for d in (full, stopped):
        shutil.copytree(run, d)
        shutil.rmtree(d / "fold_0", ignore_errors=True)
    t0 = time.perf_counter()
    _spawn(full, full, kind, 0)
    seconds = time.perf_counter() - t0
    a, b = (torch.load(full / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    same = all(torch.equal(a[k], b[k]) for k in a)
    _spawn(stopped, stopped, kind, 8)
    messages = [(stopped / f"rank{r}.stopped").read_text() if (stopped / f"rank{r}.stopped").is_file() else ""
                for r in (0, 1)]
    latest = stopped / "fold_0" / "checkpoint_latest.pt"
    step = load_checkpoint(latest)["state"].step if latest.is_file() else -1
    same_stop = messages[0] != "" and messages[0] == messages[1] and step == 7
    ok = same and same_stop
    return Row(name, "PASS" if ok else "FAIL",
               f"replicas identical: {same} ({seconds:.0f} s); SIGTERM to rank 1 only: both stopped at step {step} "
               f"({'same' if same_stop else 'DIFFERENT'} message)")


def check_prediction(run: Path, device: torch.device) -> Row:
    """The trained fold-0 network on the GPU and on the CPU, in fp32 on both, over a real preprocessed case
    mirrored out to 2.5 patches per axis (several tiles); the GPU's AMP difference is reported beside."""
    if device.type != "cuda":
        return Row("prediction GPU vs CPU", "skipped: no CUDA", "")
    from autoseg.preprocessing.storage import read_case_arrays

    plans = load_plans(run / "plans.json")
    patch = list(plans.stages[-1].patch_size)
    state = load_checkpoint(run / "fold_0" / "checkpoint_final.pt")["network"]
    case = sorted(p.stem for p in (run / "preprocessed").glob("*.json"))[0]
    image = np.asarray(read_case_arrays(run / "preprocessed", case)[0][:], dtype=np.float32)
    target = [int(p * 2.5) for p in patch]
    volume = np.pad(image, [(0, 0)] + [(0, max(0, t - s)) for t, s in zip(target, image.shape[1:])],
                    mode="symmetric")
    fp32 = dataclasses.replace(plans, amp=False)
    probs = []
    for dev, p in ((device, fp32), (torch.device("cpu"), fp32), (device, plans)):
        net = build_network(plans.network, len(plans.channel_names), len(plans.labels))
        net.load_state_dict(state)
        # float32 on the CPU too: a CPU with bfloat16 arithmetic would otherwise predict under bfloat16 autocast
        probs.append(Predictor(p, [(net, patch)], dev, bfloat16=False).predict_preprocessed(volume))
    agree = float((probs[0].argmax(0) == probs[1].argmax(0)).mean())
    diff = float(np.abs(probs[0] - probs[1]).max())
    amp_agree = float((probs[2].argmax(0) == probs[1].argmax(0)).mean())
    return Row("prediction GPU vs CPU", "PASS" if agree >= AGREEMENT else "FAIL",
               f"{'x'.join(map(str, volume.shape[1:]))} volume, fp32: labels agree on {agree:.5%} of voxels, max "
               f"probability difference {diff:.2e}; with AMP on the GPU: {amp_agree:.5%}")


def check_patch_free_tiles(device: torch.device) -> Row:
    """The patch-free network predicted by tiles (per mirrored copy, its U-Net slid at low resolution and its
    heads run over the blended features) on the GPU, in fp32 and under AMP, against the CPU: a seeded network, a
    2-channel volume of 2.5 regions per axis, mirrored along every axis. (The predictor's composition of this path
    is :func:`check_patch_free_predictor`; its out-of-memory fallbacks past the sums in RAM are tested on the CPU
    with a simulated GPU only.)"""
    if device.type != "cuda":
        return Row("patch-free tiles GPU vs CPU", "skipped: no CUDA", "")
    from autoseg.inference.patch_free_tiles import predict_patch_free_tiles
    from autoseg.networks.patchfree import PatchFreeUNet

    torch.manual_seed(0)
    net = PatchFreeUNet(2, 3, [16, 32, 64, 128], [[3, 3, 3]] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3, [1, 1, 1, 1], 1,
                        True, [2, 2, 2], 0.5, 0.5).eval()
    region = [32, 64, 64]
    x = torch.randn(2, 80, 160, 150)
    out = {}
    for name, dev, amp in (("cpu", torch.device("cpu"), False), ("gpu", device, False), ("amp", device, True)):
        out[name] = predict_patch_free_tiles(net.to(dev), x, region, 0.5, [0, 1, 2], 0.125, dev, amp=amp)
    agree = float((out["gpu"].argmax(0) == out["cpu"].argmax(0)).float().mean())
    amp_agree = float((out["amp"].argmax(0) == out["cpu"].argmax(0)).float().mean())
    diff = float((out["gpu"] - out["cpu"]).abs().max())
    return Row("patch-free tiles GPU vs CPU", "PASS" if agree >= AGREEMENT else "FAIL",
               f"80x160x150 volume, fp32: labels agree on {agree:.5%} of voxels, max logit difference {diff:.2e}; "
               f"with AMP: {amp_agree:.5%}")


class _SumsInRam(Predictor):
    """A predictor that keeps the sums in RAM whatever the GPU's free memory: the second rung of its ladder (the
    network on the GPU, each batch of tile outputs copied to the sums in RAM), taken on a GPU when they do not fit."""

    def _gpu_layout(self, x: torch.Tensor, patch: list[int], low_resolution: bool = False) -> tuple[torch.device, int]:
        return torch.device("cpu"), 1


def check_patch_free_predictor(run: Path, root: Path, device: torch.device) -> Row:
    """The predictor's own patch-free path (:meth:`Predictor._logits`: per mirrored copy, the U-Net slid at low
    resolution by its ladder, the heads by theirs) on ``device`` against :func:`predict_patch_free_tiles` on the
    CPU, fp32, mirrored as planned: the patch-free configuration planned for this device (``plan --configs
    patch_free``), seeded, its features capped at 32 so that the CPU reference stays quick, a region of twice its
    total stride per axis and a volume of 1.5 regions (two tiles per axis). On CUDA also with the sums kept in RAM
    (the ladder's second rung, otherwise reached only when a scan's sums do not fit the GPU)."""
    from autoseg.inference.patch_free_tiles import predict_patch_free_tiles

    planned = select_configuration(_replan(run, root / "patch_free_run", device, "patch_free"), "patch_free")
    spec = dataclasses.replace(planned.network, features=[min(f, 32) for f in planned.network.features])
    plans = dataclasses.replace(planned, network=spec, amp=False)
    region = [2 * t for t in spec.total_stride]  # one stride would leave the U-Net's bottom a single voxel
    torch.manual_seed(0)
    net = build_network(spec, len(plans.channel_names), len(plans.labels)).eval()
    volume = torch.randn(len(plans.channel_names), *[r * 3 // 2 for r in region])  # 2 tiles per axis
    cpu = torch.device("cpu")
    mirror, step = list(plans.inference.mirror_axes), plans.inference.tile_step
    ref = predict_patch_free_tiles(net, volume, region, step, mirror, plans.inference.gaussian_sigma_scale, cpu)
    ref_labels = ref.softmax(0).argmax(0).numpy()
    figures, ok = [], True
    kinds = [("as laid out", Predictor)] + ([("sums in RAM", _SumsInRam)] if device.type == "cuda" else [])
    for kind, cls in kinds:
        predictor = cls(plans, [(copy.deepcopy(net), region)], device, whole_volume=False)
        probs = predictor.predict_preprocessed(volume.numpy())
        agree = float((probs.argmax(0) == ref_labels).mean())
        diff = float(np.abs(probs - ref.softmax(0).numpy()).max())
        ok &= agree >= AGREEMENT
        figures.append(f"{kind}: labels agree on {agree:.5%}, max probability difference {diff:.1e}")
    shape = "x".join(map(str, volume.shape[1:]))
    return Row("patch-free predictor vs CPU tiles", "PASS" if ok else "FAIL",
               f"{shape} volume, region {'x'.join(map(str, region))}, {len(mirror)} mirror axes; " + "; ".join(figures))


def check_throughput(hippocampus: Path | None, fallback: Path, root: Path, device: torch.device,
                     steps: int) -> list[Row]:
    """Steps per second of each stage (random data, the plan's patch and batch; also deterministic) and
    seconds to predict a median-shaped case with mirroring."""
    run = fallback
    label = "generated plan"
    if hippocampus is not None:
        run = root / "hippocampus"
        cli("plan", str(hippocampus), "-o", str(run), "--device", device.type, "--no-progress")
        label = "Hippocampus plan"
    plans = load_plans(run / "plans.json")
    k, c = len(plans.labels), len(plans.channel_names)
    amp = plans.amp and device.type == "cuda"
    rows = []
    other = dataclasses.replace(plans.network, channels_last=not plans.network.channels_last)
    for deterministic, network in ((False, plans.network), (True, plans.network), (False, other)):
        configure_backends(device, deterministic)
        rates = []
        for st in plans.stages:
            net = build_network(network, c, k)
            loss = planned_loss(plans.training)
            run_st = next(r for r in stage_runs(plans, Overrides("both", None, None, None)) if r.name == st.name)
            sec = measure_step_seconds(net, loss, run_st, st.batch_size, c, k, device, amp, warmup=2, timed=steps)
            rates.append(f"{st.name} {1 / sec:.1f} steps/s ({'x'.join(map(str, st.patch_size))}, batch "
                         f"{st.batch_size})")
        mode = "deterministic" if deterministic else "cudnn.benchmark" if device.type == "cuda" else "default"
        if network is other:  # the plan's choice of memory layout against the other one (docs/training.md)
            mode += ", " + ("channels-last" if other.channels_last else "contiguous") + " (not the plan's layout)"
        rows.append(Row(f"training throughput, {mode}", "PASS", f"{label}: " + "; ".join(rates)))
    configure_backends(device, False)
    net = build_network(plans.network, c, k)
    volume = np.random.default_rng(0).normal(0, 1, (c, *plans.median_shape_after_resampling)).astype(np.float32)
    predictor = Predictor(plans, [(net, list(plans.stages[-1].patch_size))], device)
    predictor.predict_preprocessed(volume)  # warm-up
    t0 = time.perf_counter()
    for _ in range(3):
        predictor.predict_preprocessed(volume)
    per_case = (time.perf_counter() - t0) / 3
    precision = ", bfloat16 autocast" if predictor.bfloat16 else ""
    rows.append(Row("prediction throughput", "PASS",
                    f"{label}: {per_case:.2f} s per median case{precision} "
                    f"({'x'.join(map(str, plans.median_shape_after_resampling))}, mirroring, one fold)"))
    return rows


def check_feeding(hippocampus: Path | None, fallback: Path, root: Path, device: torch.device,
                  batches: int) -> Row:
    """Whether the default data workers keep the device busy: per stage, one worker's batches per second
    (sampling + augmentation, one thread, as in a worker) against the device's training steps per second at the
    plan's patch and batch, the workers that takes, and the workers ``autoseg train`` starts here. On a GPU with
    Hippocampus at hand, its plan (preprocessed here); otherwise the generated run's."""
    run = fallback
    if hippocampus is not None and device.type == "cuda":
        run = root / "hippocampus_feeding"
        cli("plan", str(hippocampus), "-o", str(run), "--device", device.type, "--no-progress")
        cli("preprocess", str(run), "--no-progress")
    plans = load_plans(run / "plans.json")
    k, c = len(plans.labels), len(plans.channel_names)
    amp = plans.amp and device.type == "cuda"
    chosen = data_workers(device, available_cores(), None)
    parts, enough = [], True
    for si, st in enumerate(plans.stages):
        run_st = next(r for r in stage_runs(plans, Overrides("both", None, None, None)) if r.name == st.name)
        steps = 1 / measure_step_seconds(build_network(plans.network, c, k), planned_loss(plans.training), run_st,
                                         st.batch_size, c, k, device, amp, warmup=2, timed=3)
        sampler = PatchSampler(run / "preprocessed", plans.folds[0].train, list(st.patch_size),
                               plans.training.oversample_foreground)
        ds = BatchDataset(sampler, st.batch_size, plans.training.augmentation, 0, si, True)
        per_worker = batches_per_second(ds.__getitem__, batches)
        aug = ""
        if plans.training.augmentation.on_device:  # the augmentation runs between the steps, on the device
            aug_s = device_augment_seconds(ds.__getitem__, list(st.patch_size), plans.training.augmentation,
                                           device, batches)
            steps = 1 / (1 / steps + aug_s)
            aug = f" (incl. {1000 * aug_s:.0f} ms augmenting on the device)"
        need = math.ceil(steps / per_worker)
        enough = enough and need <= max(chosen, 1)
        parts.append(f"{st.name} {steps:.1f} steps/s{aug}, one worker {per_worker:.1f} batches/s -> {need} worker(s)")
    label = "Hippocampus plan" if run != fallback else "generated plan"
    return Row("data workers feed the device", "PASS" if enough or device.type != "cuda" else "FAIL",
               f"{label}: " + "; ".join(parts) + f"; autoseg train starts {chosen} here")


def _safe(name: str, fn: Callable[[], Row | tuple[Row, ...] | list[Row]]) -> list[Row]:
    try:
        out = fn()
    except Exception as e:  # a check that crashes is a failed row, and the others still run
        return [Row(name, "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:200])]
    return [out] if isinstance(out, Row) else list(out)


def print_table(rows: list[Row]) -> None:
    w1 = max(len(r.check) for r in rows)
    w2 = max(len(r.status) for r in rows)
    print(f"{'check':<{w1}}  {'result':<{w2}}  figure")
    for r in rows:
        print(f"{r.check:<{w1}}  {r.status:<{w2}}  {r.figure}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="device to check (default: CUDA when visible, else the CPU)")
    ap.add_argument("--gpus", type=int, default=2, help="GPUs for the DDP row (default 2; 1 skips it)")
    ap.add_argument("--hippocampus", type=Path, default=REPO.parent / "shared" / "data" / "MSD_Task04_Hippocampus",
                    help="Hippocampus dataset for the throughput rows (skipped to a generated plan if absent)")
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR",
                    help="work in DIR and keep it (default: a temporary folder, removed at the end)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible to PyTorch", file=sys.stderr)
        return 1
    device = (torch.device("cuda", torch.cuda.current_device()) if args.device != "cpu" and torch.cuda.is_available()
              else torch.device("cpu"))
    root = Path(args.keep or tempfile.mkdtemp(prefix="autoseg-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gpu = device.type == "cuda"
    shape, cases, iterations = ((48, 96, 96), 8, 20) if gpu else ((20, 24, 22), 6, 4)
    rows = _safe("device and memory budget", lambda: check_device(device))
    try:
        run = prepare_run(root / "generated", device.type, shape, cases)
    except Exception as e:
        rows.append(Row("plan + preprocess a generated dataset", "FAIL", str(e)))
        print_table(rows)
        return 1
    rows += _safe("two-stage training", lambda: check_training(run, device, iterations))
    rows += _safe("peak GPU memory vs plan", lambda: check_memory(run, device))
    rows += _safe("SIGTERM, resume = uninterrupted", lambda: check_resume(run, root, device.type, iterations))
    rows += _safe("DDP 2 processes", lambda: check_ddp(run, root, device, args.gpus))
    rows += _safe("prediction GPU vs CPU", lambda: check_prediction(run, device))
    rows += _safe("MONAI configurations", lambda: check_monai(run, root, device))
    rows += _safe("patch-free tiles GPU vs CPU", lambda: check_patch_free_tiles(device))
    rows += _safe("patch-free predictor vs CPU tiles", lambda: check_patch_free_predictor(run, root, device))
    hippo = args.hippocampus if args.hippocampus.is_dir() else None
    rows += _safe("throughput", lambda: check_throughput(hippo, run, root, device, 10 if gpu else 2))
    rows += _safe("data workers feed the device", lambda: check_feeding(hippo, run, root, device, 20 if gpu else 4))
    print_table(rows)
    print(f"\n{sum(r.status == 'PASS' for r in rows)} passed, {sum(r.status == 'FAIL' for r in rows)} failed, "
          f"{sum(r.status.startswith('skipped') for r in rows)} skipped in {time.perf_counter() - t0:.0f} s "
          f"(torch {torch.__version__}, {device})")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
