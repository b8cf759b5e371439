"""The training loop of one fold: stages in order, epochs of optimiser steps, validation pseudo-Dice,
checkpoints, exact resume, and DistributedDataParallel when launched by torchrun.

Exactness: batch ``i`` of a stage depends only on ``(seed, stage, i, rank)`` and the learning rate only on
``i``, so a run resumed from any checkpoint takes the same steps on the same data as an uninterrupted one.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from autoseg.atomic import remove_temporaries
from autoseg.networks import build_network
from autoseg.plans import PLANS_FILE, Plans, load_plans
from autoseg.preprocessing.run import PREPROCESSED_DIR
from autoseg.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from autoseg.training.config import (
    CONFIG_FILE,
    Overrides,
    StageRun,
    TrainConfig,
    budget_epochs,
    fold_cases,
    load_config,
    new_config,
    save_config,
)
from autoseg.training.data import BatchDataset, PatchSampler, make_loader
from autoseg.training.losses import DeepSupervisionLoss, DiceCELoss, dice_counts
from autoseg.training.progress import append_log, epoch_line, plot_progress
from autoseg.training.schedules import learning_rate, make_optimizer, set_learning_rate

__all__ = ["Trainer", "TrainingInterrupted", "Runtime", "fold_dir_name", "data_workers"]

#: seconds kept aside in a time budget for starting workers, checkpoints and plots beyond the measured steps
BUDGET_SAFETY_SECONDS = 20.0
#: measured step times are multiplied by this to allow for data waits and timing noise
BUDGET_STEP_MARGIN = 1.06
#: with a time budget, each stage's epochs (and the later stages') are corrected from the real duration of
#: this epoch of it (the first one also pays for starting the data workers)
BUDGET_CHECK_EPOCH = 2


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the ``latest`` checkpoint was written. ``code`` is the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass
class Runtime:
    """Where and how this process trains: device, DDP rank and world size, data workers, progress bars."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    workers: int = 1
    progress: bool = True

    @property
    def main(self) -> bool:
        return self.rank == 0


def fold_dir_name(fold: str) -> str:
    return f"fold_{fold}"


def data_workers(device: torch.device, cores: int, requested: int | None) -> int:
    """Background processes for batches: on a GPU all cores but one (max 12), on a CPU one per two cores
    (the network needs the cores; a batch takes ~10 % of a CPU step, measured on Hippocampus)."""
    if requested is not None:
        return max(0, requested)
    if device.type == "cuda":
        return max(1, min(cores - 1, 12))
    return max(1, cores // 2)


class Trainer:
    """Trains one fold of a planned and preprocessed run.

    Args:
        run_dir: written by ``autoseg plan`` and ``autoseg preprocess``.
        fold: "0".."k-1" or "all".
        overrides: command-line changes to the plan's schedule (recorded in ``config.json``).
        restart: delete this fold's checkpoints and start over.
        say: where epoch lines go (the console by default).
    """

    def __init__(self, run_dir: Path, fold: str, overrides: Overrides, runtime: Runtime, restart: bool = False,
                 say: Callable[[str], None] = print):
        self.t_start = time.perf_counter()
        self.run_dir, self.fold, self.overrides, self.rt = Path(run_dir), fold, overrides, runtime
        self.restart, self.say = restart, say
        self.fold_dir = self.run_dir / fold_dir_name(fold)
        self.plans: Plans = load_plans(self.run_dir / PLANS_FILE)
        self.folder = self.run_dir / PREPROCESSED_DIR
        self._stop_signal: int | None = None
        self._fresh = True  # False once a checkpoint was resumed: its budget no longer describes this process
        self.network: nn.Module | None = None

    # --- set-up -------------------------------------------------------------------------------------
    def _check_preprocessed(self, cases: list[str]) -> None:
        missing = [c for c in cases if not (self.folder / f"{c}.json").is_file()]
        if missing:
            raise ValueError(f"{self.folder}: {len(missing)} case(s) not preprocessed (e.g. {missing[0]}); run "
                             f"'autoseg preprocess {self.run_dir}' first")

    def _new_network(self) -> nn.Module:
        p = self.plans
        return build_network(p.network, len(p.channel_names), len(p.labels))

    def _config(self) -> TrainConfig:
        """Load this fold's configuration, or create it (measuring step times for a time budget)."""
        path = self.fold_dir / CONFIG_FILE
        if path.is_file():
            cfg = load_config(path)
            if cfg.overrides != self.overrides:
                raise ValueError(f"{path}: this fold was started with {_fmt(cfg.overrides)}; now asked for "
                                 f"{_fmt(self.overrides)}. Run the same command to resume, or add --restart to "
                                 "start over")
            return cfg
        cfg = new_config(self.plans, self.fold, self.overrides, self.rt.device.type, self.rt.world_size)
        if self.overrides.time_budget_minutes is not None:
            self._fit_budget(cfg)
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.run_dir / PLANS_FILE, self.fold_dir / PLANS_FILE)
        save_config(cfg, path)
        return cfg

    def _fit_budget(self, cfg: TrainConfig) -> None:
        """Set each stage's epochs so that training, per-epoch validation and the final validation fit the
        time budget, from a short measurement of this machine's step time."""
        assert self.overrides.time_budget_minutes is not None
        cfg.measured_step_seconds = [self._measure_step(r) for r in cfg.stages]
        epoch_s, final_validation = self._budget_estimates(cfg)
        spent = time.perf_counter() - self.t_start
        left = self.overrides.time_budget_minutes * 60 - spent - final_validation - BUDGET_SAFETY_SECONDS
        try:
            epochs = budget_epochs(cfg.stages, epoch_s, left)
        except ValueError as too_short:
            raise ValueError(f"--time-budget {self.overrides.time_budget_minutes:g}: {spent:.0f} s went to measuring "
                             f"steps, ~{final_validation:.0f} s are kept for the final validation and "
                             f"{BUDGET_SAFETY_SECONDS:g} s spare; {too_short}") from None
        for r, n in zip(cfg.stages, epochs):
            r.epochs = n
        self.say(f"time budget  {self.overrides.time_budget_minutes:g} min: measured "
                 + ", ".join(f"{r.name} {t:.3f} s/step" for r, t in zip(cfg.stages, cfg.measured_step_seconds))
                 + f"; final validation ~{final_validation:.0f} s -> epochs "
                 + ", ".join(f"{r.name} {r.epochs}" for r in cfg.stages))

    def _budget_estimates(self, cfg: TrainConfig) -> tuple[list[float], float]:
        """Estimated seconds of one epoch of each stage (steps and pseudo-Dice) and of the final validation,
        from the measured step times."""
        v = self.plans.training.validation_iterations
        epoch_s = [r.iterations_per_epoch * t * BUDGET_STEP_MARGIN + v * t / 3 for r, t in
                   zip(cfg.stages, cfg.measured_step_seconds)]
        return epoch_s, len(cfg.val_cases) * self._case_prediction_seconds(cfg)

    def _refit_budget(self, cfg: TrainConfig, si: int, epoch_seconds: float, epochs_done: int) -> bool:
        """Correct the epochs of stage ``si`` and the later ones from the real duration of one epoch of it
        (data loading, pseudo-Dice and checkpoints included), which a short measurement of bare steps under-
        or overestimates, more so on a loaded machine. Recorded in ``config.json``; returns whether the
        stage's length changed. The learning-rate schedules follow the new lengths from the next step on."""
        assert self.overrides.time_budget_minutes is not None
        estimate, final_validation = self._budget_estimates(cfg)
        ratio = epoch_seconds / estimate[si]
        spent = time.perf_counter() - self.t_start
        left = (self.overrides.time_budget_minutes * 60 - spent - final_validation * ratio - BUDGET_SAFETY_SECONDS
                + epochs_done * epoch_seconds)
        rest = cfg.stages[si:]
        try:
            epochs = budget_epochs(rest, [e * ratio for e in estimate[si:]], left)
        except ValueError:
            epochs = [1] * len(rest)
        epochs[0] = max(epochs[0], epochs_done)
        if self.rt.world_size > 1:  # every rank must run the same schedule
            import torch.distributed as dist

            agreed = torch.tensor(epochs)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            epochs = [int(e) for e in agreed]
        before = rest[0].epochs
        for r, e in zip(rest, epochs):
            r.epochs = e
        cfg.budget_checks[rest[0].name] = round(epoch_seconds, 3)
        if self.rt.main:
            save_config(cfg, self.fold_dir / CONFIG_FILE)
            self.say(f"time budget  an epoch of {rest[0].name} took {epoch_seconds:.1f} s (estimated "
                     f"{estimate[si]:.1f} s) -> epochs " + ", ".join(f"{r.name} {r.epochs}" for r in cfg.stages))
        return rest[0].epochs != before

    def _measure_step(self, run: StageRun, warmup: int = 2, timed: int = 3) -> float:
        """Seconds of one optimiser step of ``run`` on this device (a throw-away network, random data)."""
        net = self._new_network().to(self.rt.device).train()
        loss_fn = self._loss().to(self.rt.device)
        opt = make_optimizer(run.as_stage_plan(), net.parameters())
        b = max(1, run.batch_size // self.rt.world_size)
        x = torch.randn(b, len(self.plans.channel_names), *run.patch_size, device=self.rt.device)
        y = torch.randint(0, len(self.plans.labels), (b, *run.patch_size), device=self.rt.device)
        times = []
        for i in range(warmup + timed):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(self.rt.device.type, enabled=self._amp):
                loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            _sync(self.rt.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def _case_prediction_seconds(self, cfg: TrainConfig) -> float:
        """Rough seconds to predict one median case with mirroring: forward ~1/3 of a batch-1 step per tile."""
        from autoseg.inference.sliding_window import mirror_combinations, tile_starts

        last = cfg.stages[-1]
        shape = [max(m, p) for m, p in zip(self.plans.median_shape_after_resampling, last.patch_size)]
        tiles = math.prod(len(s) for s in tile_starts(shape, last.patch_size, self.plans.inference.tile_step))
        step = cfg.measured_step_seconds[-1] / max(1, last.batch_size)
        return tiles * len(mirror_combinations(self.plans.inference.mirror_axes)) * step / 3 + 0.5

    @property
    def _amp(self) -> bool:
        return self.plans.amp and self.rt.device.type == "cuda"

    def _loss(self) -> nn.Module:
        t = self.plans.training
        return DeepSupervisionLoss(DiceCELoss(t.dice_class_weights, t.batch_dice), t.deep_supervision_weights)

    # --- signals ------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _: Any) -> None:
        """First signal: stop after the current step and write ``latest``. A second one ends the process at
        once (for a trainer stuck waiting on a data worker), keeping the last ``latest`` written. It exits
        rather than raising: an exception raised in a signal handler can land in a garbage-collector callback,
        where Python prints it and carries on."""
        if self._stop_signal is not None:
            os.write(2, f"interrupted: {signal.Signals(signum).name} again: stopped at once without writing a new "
                        "checkpoint; run the same command again to continue from the last checkpoint_latest.pt "
                        "(from the start if there is none)\n".encode())
            for worker in multiprocessing.active_children():  # they ignore SIGTERM, and one may be stuck in C
                worker.kill()
            os._exit(128 + int(signum))
        self._stop_signal = signum

    def _should_stop(self) -> bool:
        flag = torch.tensor([1 if self._stop_signal is not None else 0])
        if self.rt.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and self._stop_signal is None:
                self._stop_signal = signal.SIGTERM
        return bool(flag.item())

    # --- the loop -----------------------------------------------------------------------------------
    def fit(self) -> dict | None:
        """Train every configured stage (resuming if a ``latest`` checkpoint exists), write ``final``, and
        validate the fold. Returns the validation metrics (None on ranks other than 0).

        Raises:
            TrainingInterrupted: after SIGINT/SIGTERM, once ``latest`` is written.
            ValueError: the run is not ready for training, or this fold was started differently.
        """
        train, val = fold_cases(self.plans, self.fold)
        self._check_preprocessed(train + val)
        if self.restart and self.rt.main and self.fold_dir.exists():
            shutil.rmtree(self.fold_dir)
        self._barrier()
        if self.rt.main:
            cfg = self._config()
        self._barrier()
        cfg = load_config(self.fold_dir / CONFIG_FILE)
        torch.manual_seed(self.plans.training.seed)
        net = self._new_network().to(self.rt.device)
        self.network = net
        final = self.fold_dir / "checkpoint_final.pt"
        if final.is_file():
            net.load_state_dict(load_checkpoint(final, self.rt.device)["network"])
            self.say(f"{self.fold_dir}: already trained (checkpoint_final.pt); add --restart to train again")
        else:
            self._train(cfg, net)
        return self._validate(cfg, net)

    def _train(self, cfg: TrainConfig, net: nn.Module) -> None:
        latest = self.fold_dir / "checkpoint_latest.pt"
        if self.rt.main:
            remove_temporaries(self.fold_dir)  # a checkpoint half-written when the process was killed
        state, ckpt = TrainState(), None
        if latest.is_file():
            ckpt = load_checkpoint(latest, self.rt.device)
            self._fresh = False
            net.load_state_dict(ckpt["network"])
            state = ckpt["state"]
            torch.set_rng_state(ckpt["torch_rng"])
            self.say(f"resuming    {self.fold_dir.name}: stage {cfg.stages[min(state.stage, len(cfg.stages) - 1)].name}"
                     f", step {state.step}")
        if self.rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for si in range(state.stage, len(cfg.stages)):
                run = cfg.stages[si]
                opt = make_optimizer(run.as_stage_plan(), net.parameters())
                scaler = torch.amp.GradScaler("cuda") if self._amp else None
                if ckpt is not None and ckpt["optimizer"]:  # resuming inside this stage
                    opt.load_state_dict(ckpt["optimizer"])
                    if scaler is not None and ckpt["grad_scaler"]:
                        scaler.load_state_dict(ckpt["grad_scaler"])
                ckpt = None  # later stages start with a fresh optimiser
                self._train_stage(cfg, si, net, opt, scaler, state)
                state.stage, state.step = si + 1, 0
                if self.rt.main:
                    save_checkpoint(latest, net, None, None, state)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        if self.rt.main:
            save_checkpoint(self.fold_dir / "checkpoint_final.pt", net, None, None, state)
            latest.unlink(missing_ok=True)
        self._barrier()

    def _train_stage(self, cfg: TrainConfig, si: int, net: nn.Module, opt: torch.optim.Optimizer,
                     scaler: Any, state: TrainState) -> None:
        run, t = cfg.stages[si], self.plans.training
        b = max(1, run.batch_size // self.rt.world_size)
        plan = run.as_stage_plan()
        model: nn.Module = net
        if self.rt.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            model = DistributedDataParallel(net, device_ids=ids)
        loss_fn = self._loss().to(self.rt.device)
        train_ds = BatchDataset(PatchSampler(self.folder, cfg.train_cases, run.patch_size, t.oversample_foreground),
                                b, t.augmentation, t.seed, si, True, self.rt.rank)
        val_ds = BatchDataset(PatchSampler(self.folder, cfg.val_cases, run.patch_size, t.oversample_foreground),
                              b, t.augmentation, t.seed, si, False, self.rt.rank)
        loader = make_loader(train_ds, state.step, run.total_steps, self.rt.workers, self.rt.device.type == "cuda")
        iters = run.iterations_per_epoch
        bar = None
        net.train()
        t_mark = time.perf_counter()
        check_budget = (self.overrides.time_budget_minutes is not None and self._fresh
                        and run.name not in cfg.budget_checks and run.epochs > BUDGET_CHECK_EPOCH)
        while state.step < run.total_steps:
            if bar is None:
                bar = tqdm(total=iters, initial=state.step % iters, leave=False, unit="step",
                           desc=f"{run.name} {state.step // iters + 1}/{run.epochs}",
                           disable=not (self.rt.progress and self.rt.main))
            t0 = time.perf_counter()
            batch = next(loader)
            state.epoch_data_wait += time.perf_counter() - t0
            x = batch["data"].to(self.rt.device, non_blocking=True)
            y = batch["seg"].to(self.rt.device, non_blocking=True).long()
            set_learning_rate(opt, learning_rate(plan, state.step, run.total_steps))
            opt.zero_grad(set_to_none=True)
            with torch.autocast(self.rt.device.type, enabled=self._amp):
                loss = loss_fn(model(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip_norm)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip_norm)
                opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ValueError(f"{run.name} step {state.step}: the loss is {value}; training diverged. Lower "
                                 f"the stage's learning_rate in {self.run_dir / PLANS_FILE} and train with --restart")
            state.step += 1
            state.epoch_loss_sum += value
            state.epoch_loss_count += 1
            bar.update()
            stop = self._should_stop()
            if state.step % iters == 0:
                bar.close()
                bar = None
                state.epoch_seconds += time.perf_counter() - t_mark
                self._end_epoch(cfg, si, net, val_ds, loss_fn, opt, scaler, state)
                if check_budget and state.step == BUDGET_CHECK_EPOCH * iters:
                    if self._refit_budget(cfg, si, time.perf_counter() - t_mark, BUDGET_CHECK_EPOCH):
                        del loader  # the stage's length changed: batches from here to its new end
                        loader = make_loader(train_ds, state.step, run.total_steps, self.rt.workers,
                                             self.rt.device.type == "cuda")
                t_mark = time.perf_counter()
            if stop:
                state.epoch_seconds += time.perf_counter() - t_mark
                if self.rt.main:
                    save_checkpoint(self.fold_dir / "checkpoint_latest.pt", net, opt, scaler, state)
                if bar is not None:
                    bar.close()
                del loader
                sig = self._stop_signal or signal.SIGINT
                raise TrainingInterrupted(f"{signal.Signals(sig).name}: stopped at {run.name} step {state.step} of "
                                          f"{run.total_steps}; checkpoint_latest.pt written; run the same command "
                                          "again to continue", 128 + int(sig))

    def _end_epoch(self, cfg: TrainConfig, si: int, net: nn.Module, val_ds: BatchDataset, loss_fn: nn.Module,
                   opt: torch.optim.Optimizer, scaler: Any, state: TrainState) -> None:
        run, t = cfg.stages[si], self.plans.training
        epoch = state.step // run.iterations_per_epoch
        val_loss, per_class = self._pseudo_dice(net, val_ds, loss_fn)
        mean = _nanmean(per_class)
        state.ema = mean if state.ema < 0 else t.ema_momentum * state.ema + (1 - t.ema_momentum) * mean
        share = state.epoch_data_wait / max(state.epoch_seconds, 1e-9)
        state.log(stage=si, train_loss=state.epoch_loss_sum / max(state.epoch_loss_count, 1), val_loss=val_loss,
                  mean_dice=mean, ema=state.ema, lr=opt.param_groups[0]["lr"], epoch_seconds=state.epoch_seconds,
                  data_wait_share=share)
        for c, d in enumerate(per_class, start=1):
            state.log(**{f"dice_{c}": d})
        state.epoch_loss_sum, state.epoch_loss_count, state.epoch_data_wait, state.epoch_seconds = 0.0, 0, 0.0, 0.0
        if not self.rt.main:
            return
        line = epoch_line(run.name, epoch, run.epochs, state.history, per_class)
        self.say(line)
        append_log(self.fold_dir / "training_log.txt", line)
        if state.ema > state.best_ema:
            state.best_ema = state.ema
            save_checkpoint(self.fold_dir / "checkpoint_best.pt", net, None, None, state)
        if epoch % t.checkpoint_every_epochs == 0 or epoch == run.epochs:
            save_checkpoint(self.fold_dir / "checkpoint_latest.pt", net, opt, scaler, state)
            plot_progress(state.history, self.fold_dir / "progress.png")

    @torch.no_grad()
    def _pseudo_dice(self, net: nn.Module, val_ds: BatchDataset, loss_fn: nn.Module) -> tuple[float, list[float]]:
        """Validation loss and per-class Dice over the same fixed validation patches every epoch."""
        net.eval()
        counts = torch.zeros(3, len(self.plans.labels) - 1, dtype=torch.int64)
        total = torch.zeros(1, dtype=torch.float64)
        n = self.plans.training.validation_iterations
        for i in range(n):
            batch = val_ds[i]
            if "error" in batch:
                raise ValueError(f"validation batch: {batch['error']}")
            x = batch["data"].to(self.rt.device)
            y = batch["seg"].to(self.rt.device).long()
            with torch.autocast(self.rt.device.type, enabled=self._amp):
                out = net(x)
            total += float(loss_fn(out, y))
            counts += dice_counts(out.float(), y).cpu()
        if self.rt.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(counts)
            dist.all_reduce(total)
            total /= self.rt.world_size
        net.train()
        tp, fp, fn = counts.double()
        denom = 2 * tp + fp + fn
        dice = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.full_like(denom, math.nan))
        return float(total) / n, [float(d) for d in dice]

    def _validate(self, cfg: TrainConfig, net: nn.Module) -> dict | None:
        if not self.rt.main:
            return None
        from autoseg.inference.validate import validate_fold

        t0 = time.perf_counter()
        metrics = validate_fold(self.run_dir, self.fold_dir, self.plans, cfg.val_cases, net,
                                cfg.stages[-1].patch_size, self.rt.device, self.rt.progress)
        per_class = "  ".join(f"{k} {v:.4f}" for k, v in metrics["mean_per_class"].items())
        line = (f"validation  {len(cfg.val_cases)} cases, Dice {per_class}; mean {metrics['mean_foreground_dice']:.4f}"
                f" ({time.perf_counter() - t0:.0f} s) -> {self.fold_dir / 'validation' / 'metrics.json'}")
        self.say(line)
        append_log(self.fold_dir / "training_log.txt", line)
        return metrics

    def _barrier(self) -> None:
        if self.rt.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def _nanmean(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else 0.0


def _fmt(o: Overrides) -> str:
    parts = [f"--stage {o.stage}"]
    if o.epochs is not None:
        parts.append(f"--epochs {o.epochs}")
    if o.iterations_per_epoch is not None:
        parts.append(f"--iterations-per-epoch {o.iterations_per_epoch}")
    if o.time_budget_minutes is not None:
        parts.append(f"--time-budget {o.time_budget_minutes:g}")
    return " ".join(parts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def distributed_runtime(device_choice: str, workers: int | None, progress: bool) -> Runtime:
    """The runtime of this process: under torchrun (``WORLD_SIZE`` > 1) joins the process group (NCCL on
    CUDA, gloo on the CPU) and takes the GPU ``LOCAL_RANK``; otherwise a single process on the best device."""
    from autoseg.parallel import available_cores

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_choice != "cpu"
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to PyTorch (CPU-only build or no GPU)")
    if world > 1:
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        cores = max(1, available_cores() // world)
        return Runtime(device, rank, world, data_workers(device, cores, workers), progress)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    return Runtime(device, 0, 1, data_workers(device, available_cores(), workers), progress)
