"""What makes a training step and a predicted case faster on this machine: each lever against the default, same run.

Usage:
    python benchmarks/bench_speed.py step    [RUN_DIR] [--rounds 5] [--steps 3]
    python benchmarks/bench_speed.py loop    RUN_DIR [--workers 0 1] [--iterations 30] [--rounds 2]
    python benchmarks/bench_speed.py predict RUN_DIR [--fold 0] [--cases 10] [--rounds 2]
    python benchmarks/bench_speed.py augment RUN_DIR [--batches 20] [--gpu-memory 24]

``step``: the planned network, loss and optimiser of each stage of RUN_DIR's plan (a run planned with
``autoseg plan``; by default Hippocampus is planned for the CPU into a temporary folder) through autoseg's own
``Stepper`` (forward, deep-supervised loss, backward, gradient clipping, optimiser step) on random patches, once
per lever. The levers are timed in interleaved rounds (every lever once per round) so that a drift of the host
hits all of them alike; the table gives the median step and the spread (min-max of the round medians).

``loop``: seconds per step of autoseg's real training loop (``Trainer.fit``: batches sampled and augmented from
RUN_DIR's preprocessed cases, by ``--workers`` worker processes or in the training process, each stage alone for
one epoch of ``--iterations`` steps, in a copy of the run), beside the bare step of ``step``: the difference
is what loading and augmenting batches costs the step, on cores the network also uses. Each is run augmenting
in the workers (batchgenerators) and in the training process (torch, ``augmentation.on_device``).

``predict``: seconds per case of the network part of prediction (sliding window over the preprocessed case, the
probabilities on its grid) for RUN_DIR's trained fold on its first ``--cases`` validation cases, per lever:
mirroring on or off, mirrored copies in pairs or one per call, tiles as trained or larger (up to the whole
case), and the network in float32 or under the CPU's bfloat16 autocast (``Predictor(bfloat16=...)``; the
default on a CPU that computes in bfloat16), each contiguous or channels-last;
each lever's labels are compared with the default's (agreement) and scored against the stored labels (Dice on
the preprocessed grid, mean over foreground classes and cases).

``augment``: samples per second of one data worker (the trainer's ``BatchDataset``, one thread as in a worker)
at each stage's patch and batch of RUN_DIR's plan and of the plan for a ``--gpu-memory`` GiB GPU (cost model;
same preprocessed data), augmenting in the worker (batchgenerators) or only reading the enlarged regions for
augmentation on the device (``augmentation.on_device``); for the latter, the seconds per batch that
:class:`~autoseg.training.device_augment.DeviceAugmenter` takes on this machine's CPU (on a GPU it is
``benchmarks/gpu_check.py``'s "data workers feed the device" row).
Run by hand; nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _measure import batches_per_second, device_augment_seconds

from autoseg.checkpoint import load_checkpoint
from autoseg.cli import main as autoseg_main
from autoseg.device import DeviceInfo
from autoseg.fingerprint import load_fingerprint
from autoseg.inference.predictor import Predictor
from autoseg.networks import build_network
from autoseg.planning.planner import make_plan
from autoseg.plans import Plans, load_plans, select_configuration
from autoseg.preprocessing.storage import read_case_arrays
from autoseg.runconfig import Overrides, fold_cases
from autoseg.training.data import BatchDataset, PatchSampler
from autoseg.training.losses import planned_loss
from autoseg.training.runtime import Runtime
from autoseg.training.schedules import make_optimizer
from autoseg.training.step import Stepper
from autoseg.training.trainer import Trainer

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "MSD_Task04_Hippocampus"
CPU = torch.device("cpu")


def _stepper_for(plan: Plans, si: int, *, channels_last: bool = False, bf16: bool = False, compiled: bool = False,
                 fused: bool = False, threads: int | None = None) -> Callable[[], None]:
    """A closure doing one step of stage ``si`` with the lever applied."""
    stage = plan.stages[si]
    torch.manual_seed(0)
    net = build_network(replace(plan.network, channels_last=channels_last), len(plan.channel_names),
                        len(plan.labels)).train()
    if compiled:
        torch._dynamo.reset()  # each stage compiles for its own static shapes
    model = torch.compile(net, dynamic=False) if compiled else net
    opt = make_optimizer(stage, net.parameters())
    if fused:
        opt.defaults["fused"] = True
        for g in opt.param_groups:
            g["fused"], g["foreach"] = True, False
    stepper = Stepper(model, net, planned_loss(plan.training), opt, torch.device("cpu"), False,
                      plan.training.grad_clip_norm)
    x = torch.randn(stage.batch_size, len(plan.channel_names), *stage.patch_size)
    y = torch.randint(0, len(plan.labels), (stage.batch_size, *stage.patch_size))

    def one() -> None:
        old = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                stepper.step(x, y, stage.learning_rate, "bench")
        finally:
            torch.set_num_threads(old)
    return one


BASE = "contiguous (fp32, all threads)"
LEVERS: dict[str, dict] = {
    BASE: {},
    "1 intra-op thread": {"threads": 1},
    "channels_last_3d": {"channels_last": True},
    "bfloat16 autocast": {"bf16": True},
    "channels_last_3d + bfloat16 autocast": {"channels_last": True, "bf16": True},
    "fused optimiser step": {"fused": True},
    "torch.compile": {"compiled": True},
}


def bench_step(plan: Plans, rounds: int, steps: int) -> None:
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for si, stage in enumerate(plan.stages):
        print(f"\n{stage.name}: patch {'x'.join(map(str, stage.patch_size))}, batch {stage.batch_size}, "
              f"{stage.optimizer}")
        fns, first = {}, {}
        for name, kw in LEVERS.items():
            fns[name] = _stepper_for(plan, si, **kw)
            t0 = time.perf_counter()
            fns[name]()  # warm-up (compiles under torch.compile)
            fns[name]()
            first[name] = time.perf_counter() - t0
        medians: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                medians[name].append(statistics.median(times))
        base = statistics.median(medians[BASE])
        print("| lever | s/step (median) | spread of rounds | vs default | first 2 steps |\n|---|---|---|---|---|")
        for name, ms in medians.items():
            m = statistics.median(ms)
            print(f"| {name} | {m:.3f} | {min(ms):.3f}-{max(ms):.3f} | {m / base:.2f}x | {first[name]:.1f} s |")


def _loop_seconds(run: Path, stage: str, workers: int, iterations: int, on_device: bool) -> float:
    """Seconds per step of one epoch of ``stage`` trained alone by the real trainer with ``workers``, augmenting
    in the workers (batchgenerators) or in the training process (``on_device``)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        copy.mkdir()
        shutil.copyfile(run / "fingerprint.json", copy / "fingerprint.json")
        plan = json.loads((run / "plans.json").read_text())
        plan["training"]["augmentation"]["on_device"] = on_device
        (copy / "plans.json").write_text(json.dumps(plan))
        (copy / "preprocessed").symlink_to((run / "preprocessed").resolve())
        rt = Runtime(CPU, workers=workers, progress=False)
        Trainer(copy, "0", Overrides(stage, 1, iterations, None), rt, say=lambda s: None).fit()
        state = load_checkpoint(copy / "fold_0" / "checkpoint_final.pt", CPU)["state"]
        return float(state.history["epoch_seconds"][-1]) / iterations


def bench_loop(run: Path, workers: list[int], iterations: int, rounds: int) -> None:
    plan = load_plans(run / "plans.json")
    print(f"{torch.get_num_threads()} intra-op threads; one epoch of {iterations} steps per stage, {rounds} round(s), "
          f"layout as planned ({'channels-last' if plan.network.channels_last else 'contiguous'})")
    print("| stage | augmentation | data workers | s/step (best round) | rounds |\n|---|---|---|---|---|")
    variants = [(w, dev) for dev in (False, True) for w in workers]
    for stage, st in zip(("zoom-in", "zoom-out"), plan.stages):
        got: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for w, dev in variants:
                got[w, dev].append(_loop_seconds(run, stage, w, iterations, dev))
        for w, dev in variants:
            where = "training process (torch)" if dev else "workers (batchgenerators)"
            planned = " (planned)" if dev == plan.training.augmentation.on_device else ""
            print(f"| {st.name} {'x'.join(map(str, st.patch_size))} | {where}{planned} | "
                  f"{w or 'none (in the training process)'} | {min(got[w, dev]):.3f} | "
                  f"{', '.join(f'{s:.3f}' for s in got[w, dev])} |")


def _fold_network(run: Path, fold: str) -> tuple[Plans, torch.nn.Module, list[int]]:
    """The fold's plan (its configuration's), trained network (eval mode) and last stage's patch."""
    fold_dir = next(p for p in (run / f"fold_{fold}", *run.glob(f"*/fold_{fold}"))
                    if (p / "checkpoint_final.pt").is_file())
    top = load_plans(run / "plans.json")
    plan = select_configuration(top, top.configuration if fold_dir.parent == run else fold_dir.parent.name)
    net = build_network(plan.network, len(plan.channel_names), len(plan.labels))
    net.load_state_dict(load_checkpoint(fold_dir / "checkpoint_final.pt", torch.device("cpu"))["network"])
    return plan, net.eval(), list(plan.stages[-1].patch_size)


def _whole_tile(shape: list[int], patch: list[int], stride: list[int], most: float) -> list[int]:
    """A tile of at most ``most`` times the patch per axis, covering the case where it can, a multiple of the stride."""
    return [max(p, min(-(-s // t) * t, int(most * p) // t * t)) for s, p, t in zip(shape, patch, stride)]


def _one_input_per_call(p: Predictor) -> Predictor:
    p.max_items_per_call = 1
    return p


def _dice(labels: np.ndarray, ref: np.ndarray, classes: range) -> float:
    scores = []
    for c in classes:
        a, b = labels == c, ref == c
        denom = a.sum() + b.sum()
        if denom:
            scores.append(2 * np.logical_and(a, b).sum() / denom)
    return float(np.mean(scores)) if scores else float("nan")


def bench_predict(run: Path, fold: str, n_cases: int, rounds: int) -> None:
    plan, trained, patch = _fold_network(run, fold)
    net = Predictor(plan, [(trained, patch)], CPU).networks[0][0]  # in the inference layout, converted once
    net32 = Predictor(plan, [(trained, patch)], CPU, bfloat16=False).networks[0][0]  # float32's layout (contiguous)
    cases = fold_cases(plan, fold)[1][:n_cases]
    arrays = {}
    for c in cases:
        data, seg = read_case_arrays(run / "preprocessed", c)
        arrays[c] = (np.asarray(data[:], dtype=np.float32), np.asarray(seg[:])[0])
    stride = plan.network.total_stride
    levers: dict[str, Callable[[list[int]], Predictor]] = {
        "as planned (mirroring, trained tile, defaults)": lambda s: Predictor(plan, [(net, patch)], CPU),
        "no mirroring": lambda s: Predictor(plan, [(net, patch)], CPU, tta=False),
        "no mirroring, one tile per network call":
            lambda s: _one_input_per_call(Predictor(plan, [(net, patch)], CPU, tta=False)),
        "mirrored copies one per network call": lambda s: _one_input_per_call(Predictor(plan, [(net, patch)], CPU)),
        "tiles up to 2x the trained patch per axis":
            lambda s: Predictor(plan, [(net, _whole_tile(s, patch, stride, 2))], CPU),
        "tiles up to 4x (whole case where it covers)":
            lambda s: Predictor(plan, [(net, _whole_tile(s, patch, stride, 4))], CPU),
        "float32, contiguous (--fp32)": lambda s: Predictor(plan, [(net32, patch)], CPU, bfloat16=False),
        "float32, channels-last": lambda s: Predictor(plan, [(trained, patch)], CPU, channels_last=True,
                                                      bfloat16=False),
        "bfloat16 autocast, contiguous": lambda s: Predictor(plan, [(net32, patch)], CPU, channels_last=False,
                                                             bfloat16=True),
        "bfloat16 autocast, channels-last": lambda s: Predictor(plan, [(trained, patch)], CPU, bfloat16=True),
    }
    seconds: dict[str, list[float]] = {n: [] for n in levers}
    labels: dict[str, dict[str, np.ndarray]] = {n: {} for n in levers}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, make in levers.items():
                t0 = time.perf_counter()
                for c, (data, _seg) in arrays.items():
                    labels[name][c] = make(list(data.shape[1:])).predict_preprocessed(data).argmax(0)
                seconds[name].append((time.perf_counter() - t0) / len(arrays))
    base = next(iter(levers))
    k = range(1, len(plan.labels))
    shapes = sorted({"x".join(map(str, d.shape[1:])) for d, _ in arrays.values()})
    more = ", ..." if len(shapes) > 3 else ""
    print(f"{len(cases)} validation cases of fold {fold} ({', '.join(shapes[:3])}{more}), trained patch "
          f"{'x'.join(map(str, patch))}, {rounds} round(s)")
    print("| lever | s/case (best round) | vs planned | labels agreeing with planned | Dice (preprocessed grid) |")
    print("|---|---|---|---|---|")
    for name in levers:
        agree = np.mean([np.mean(labels[name][c] == labels[base][c]) for c in cases])
        dice = np.mean([_dice(labels[name][c], arrays[c][1], k) for c in cases])
        print(f"| {name} | {min(seconds[name]):.3f} | {min(seconds[name]) / min(seconds[base]):.2f}x | "
              f"{100 * agree:.3f} % | {dice:.4f} |")


def _stage_rates(plan: Plans, folder: Path, cases: list[str], batches: int,
                 on_device: bool) -> list[tuple[str, float, float | None]]:
    """Per stage: its label, one worker's samples per second (one thread, as in a worker), and with
    ``on_device`` the seconds per batch of :class:`DeviceAugmenter` on this machine's CPU (all its threads)."""
    aug = replace(plan.training.augmentation, on_device=on_device)
    out: list[tuple[str, float, float | None]] = []
    for si, st in enumerate(plan.stages):
        sampler = PatchSampler(folder, cases, list(st.patch_size), plan.training.oversample_foreground)
        ds = BatchDataset(sampler, st.batch_size, aug, 0, si, True)
        rate = batches_per_second(ds.__getitem__, batches) * st.batch_size
        device_s = device_augment_seconds(ds.__getitem__, list(st.patch_size), aug, torch.device("cpu"),
                                          min(batches, 5)) if on_device else None
        out.append((f"{st.name} {'x'.join(map(str, st.patch_size))} batch {st.batch_size}", rate, device_s))
    return out


def bench_augment(run: Path, batches: int, gpu_gib: float) -> None:
    cpu_plan = load_plans(run / "plans.json")
    gpu = DeviceInfo("cuda", f"{gpu_gib:g} GiB GPU (cost model)", 8, 64.0, gpu_gib, gpu_gib, "--gpu-memory")
    gpu_plan = make_plan(load_fingerprint(run / "fingerprint.json"), gpu)
    cases = fold_cases(cpu_plan, "0")[0]
    shape = "x".join(map(str, cpu_plan.median_shape_after_resampling))
    print(f"{cpu_plan.dataset_name} ({len(cpu_plan.channel_names)} channel(s), median {shape}), one worker process "
          f"(one thread); augmentation on the device timed on this CPU ({torch.get_num_threads()} threads)")
    print("| plan | stage | augmentation | samples/s per worker | steps/s one worker feeds | augmentation s/batch "
          "in the training process (this CPU) |\n|---|---|---|---|---|---|")
    for label, plan in (("CPU", cpu_plan), (f"GPU {gpu_gib:g} GiB", gpu_plan)):
        for on_device in (False, True):
            where = "on the device (torch)" if on_device else "in the workers (batchgenerators)"
            planned = " (planned)" if on_device == plan.training.augmentation.on_device else ""
            for (what, rate, dev), st in zip(_stage_rates(plan, run / "preprocessed", cases, batches, on_device),
                                             plan.stages):
                dev_s = f"{dev:.3f}" if dev is not None else "-"
                print(f"| {label} | {what} | {where}{planned} | {rate:.1f} | {rate / st.batch_size:.2f} | {dev_s} |")


def _planned_run(run: Path | None, tmp: str) -> Path:
    if run is not None:
        return run
    if autoseg_main(["plan", str(HIPPOCAMPUS), "-o", tmp, "--device", "cpu", "--no-progress"]) != 0:
        raise SystemExit(1)
    return Path(tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["step", "loop", "predict", "augment"],
                    help="which table: the bare training step, the real training loop, prediction, or one data "
                         "worker's augmentation throughput (see above)")
    ap.add_argument("run", nargs="?", type=Path, help="a planned run directory (default: plan Hippocampus)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved timing rounds of every lever, for step, loop and predict (default 5)")
    ap.add_argument("--steps", type=int, default=3, help="step: timed steps per lever and round (default 3)")
    ap.add_argument("--batches", type=int, default=20, help="augment: batches timed per row (default 20)")
    ap.add_argument("--fold", default="0", help="predict: the trained fold whose network is used (default 0)")
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 1],
                    help="loop: data worker counts to compare, 0 = batches made in the training process "
                         "(default 0 1)")
    ap.add_argument("--iterations", type=int, default=30, help="loop: steps in the one epoch per stage (default 30)")
    ap.add_argument("--cases", type=int, default=10, help="predict: first N validation cases of the fold (default 10)")
    ap.add_argument("--gpu-memory", type=float, default=24.0,
                    help="augment: GiB of the GPU whose plan (cost model) is measured beside the CPU plan "
                         "(default 24)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = _planned_run(args.run, tmp)
        plan = load_plans(run / "plans.json")
        if args.what == "step":
            bench_step(plan, args.rounds, args.steps)
        elif args.what == "loop":
            bench_loop(run, args.workers, args.iterations, args.rounds)
        elif args.what == "predict":
            bench_predict(run, args.fold, args.cases, args.rounds)
        else:
            bench_augment(run, args.batches, args.gpu_memory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
