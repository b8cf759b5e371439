"""The training loop of one fold: stages in order, epochs of optimiser steps, the pseudo-Dice after each epoch,
checkpoints and exact resume, DistributedDataParallel when launched by torchrun. It composes parts that each do
one job: the runtime (device, ranks, collectives), the time budget, the stop request (signals), the optimiser step
(AMP, non-finite steps), the pseudo-Dice and the checkpoint format.

Exactness: batch ``i`` of a stage depends only on ``(seed, stage, i, rank)`` and the learning rate only on
``i``, so a run resumed from any checkpoint takes the same steps on the same data as an uninterrupted one.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from autoseg.atomic import copy_file, remove_temporaries
from autoseg.checkpoint import TrainState, load_checkpoint, restore_rng, save_checkpoint
from autoseg.networks import build_network
from autoseg.plans import PLANS_FILE, Plans, load_plans, select_configuration
from autoseg.preprocessing.run import PREPROCESSED_DIR
from autoseg.preprocessing.storage import require_cases
from autoseg.runconfig import (
    CONFIG_FILE,
    Overrides,
    TrainConfig,
    fold_cases,
    fold_dir_name,
    load_config,
    model_dir,
    save_config,
)
from autoseg.training.budget import BUDGET_CHECK_EPOCH, fit_budget, measure_step_seconds, refit_epochs
from autoseg.training.config import new_config
from autoseg.training.data import BatchDataset, BatchError, Guidance, PatchSampler, make_loader, with_resume_advice
from autoseg.training.device_augment import DeviceAugmenter, batch_tensors
from autoseg.training.interrupt import StopRequest, TrainingInterrupted
from autoseg.training.losses import planned_loss
from autoseg.training.progress import append_log, epoch_line, plot_progress
from autoseg.training.runtime import RankFailed, Runtime, configure_backends, rank_batch_sizes
from autoseg.training.schedules import learning_rate, make_optimizer
from autoseg.training.step import NonFiniteGuard, Stepper, guard_out_of_memory
from autoseg.training.stopping import early_stop_reason, expand_bars, record_early_stop, start_stage
from autoseg.training.validation import nanmean, pseudo_dice

__all__ = ["Trainer", "TrainingInterrupted", "STOP_GRACE_SECONDS"]

#: with several ranks, a rank that asked to stop gives up waiting for the others after this long
STOP_GRACE_SECONDS = 120.0
T = TypeVar("T")


class Trainer:
    """Trains one fold of a planned and preprocessed run.

    Args:
        run_dir: written by ``autoseg plan`` and ``autoseg preprocess``.
        fold: "0".."k-1" or "all".
        overrides: command-line changes to the plan's schedule (recorded in ``config.json``).
        runtime: device and ranks (:func:`autoseg.training.runtime.distributed_runtime`).
        restart: delete this fold's checkpoints and start over.
        say: where epoch lines go (the console by default).
        configuration: the plan's configuration to train (``3d``, ``2d``; None: the plan's default); its folds
            live in :func:`autoseg.runconfig.model_dir`.
        validation_probe: with a time budget, measures the seconds the final validation will take, given the
            plan, the fold's configuration and an untrained network on this device (the workflow that
            validates provides it; without it they are estimated from the tile count).
    """

    def __init__(self, run_dir: Path, fold: str, overrides: Overrides, runtime: Runtime, restart: bool = False,
                 say: Callable[[str], None] = print,
                 validation_probe: Callable[[Plans, TrainConfig, nn.Module], float] | None = None,
                 configuration: str | None = None):
        self.t_start = time.perf_counter()
        self.run_dir, self.fold, self.overrides, self.rt = Path(run_dir), fold, overrides, runtime
        self.restart, self.say, self.validation_probe = restart, say, validation_probe
        self.plans: Plans = select_configuration(load_plans(self.run_dir / PLANS_FILE), configuration)
        self.fold_dir = model_dir(self.run_dir, self.plans.configuration) / fold_dir_name(fold)
        self.latest = self.fold_dir / "checkpoint_latest.pt"
        self.class_names = [self.plans.labels[c] for c in sorted(self.plans.labels)[1:]]
        self.folder = self.run_dir / PREPROCESSED_DIR
        self.stop = StopRequest(STOP_GRACE_SECONDS if runtime.distributed else None)
        self.resumed = False  # a checkpoint was resumed: the config's budget no longer describes this process
        self.config: TrainConfig | None = None
        self._batch_error: str | None = None  # this rank's failed batch, until every rank has learnt of it
        self._loss_finite = True  # this rank's last loss, until every rank has learnt of it
        self.non_finite = NonFiniteGuard()
        self.network: nn.Module | None = None
        self.bars: list[float] = []  # early stopping: the Dice bar of each foreground class (empty: none)

    @property
    def amp(self) -> bool:
        return self.plans.amp and self.rt.device.type == "cuda"

    def _new_network(self) -> nn.Module:
        return build_network(self.plans.network, len(self.plans.channel_names), len(self.plans.labels))

    def _loss(self) -> nn.Module:
        return planned_loss(self.plans.training)

    # --- set-up (rank 0 decides, every rank learns the outcome) ---------------------------------------
    def _prepare(self) -> TrainConfig:
        """Rank 0: start over if asked, then load this fold's configuration or create it (for a time budget,
        measuring the step times and, with a ``validation_probe``, the final validation)."""
        train, val = fold_cases(self.plans, self.fold)
        require_cases(self.folder, train + val, f"autoseg preprocess {self.run_dir}")
        expand_bars(self.overrides.stop_at_dice, self.class_names)  # a wrong count is refused before any work
        if self.restart and self.fold_dir.exists():
            shutil.rmtree(self.fold_dir)
        path = self.fold_dir / CONFIG_FILE
        if path.is_file():
            cfg = load_config(path)
            if cfg.overrides != self.overrides:
                raise ValueError(f"{path}: this fold was started with {cfg.overrides.describe()}; now asked for "
                                 f"{self.overrides.describe()}. Run the same command to resume, or add --restart to "
                                 "start over")
            return cfg
        cfg = new_config(self.plans, self.fold, self.overrides, self.rt.device.type, self.rt.world_size)
        why = f" (the plan's default: {self.plans.default_reason})" \
            if self.plans.configuration == self.plans.default_configuration and self.plans.default_reason else ""
        self.say(f"configuration {self.plans.configuration}{why} -> {self.fold_dir}")
        minutes = self.overrides.time_budget_minutes
        if minutes is not None:
            cfg.measured_step_seconds = [
                self._guard(f"{r.name} step time measurement", r.patch_size,
                            rank_batch_sizes(r.batch_size, self.rt.world_size)[0], self._measure_step, r.name, cfg)
                for r in cfg.stages]
            if self.validation_probe is not None:
                last = cfg.stages[-1]
                net = self._new_network().to(self.rt.device).eval()
                cfg.measured_validation_seconds = round(self._guard(
                    "validation time measurement", last.patch_size, 1, self.validation_probe, self.plans, cfg, net), 1)
            self.say(fit_budget(self.plans, cfg, minutes, time.perf_counter() - self.t_start))
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        copy_file(self.run_dir / PLANS_FILE, self.fold_dir / PLANS_FILE)
        save_config(cfg, path)
        return cfg

    def _measure_step(self, stage: str, cfg: TrainConfig) -> float:
        run = next(r for r in cfg.stages if r.name == stage)
        b = rank_batch_sizes(run.batch_size, self.rt.world_size)[0]
        return measure_step_seconds(self._new_network(), self._loss(), run, b, len(self.plans.channel_names),
                                    len(self.plans.labels), self.rt.device, self.amp,
                                    DeviceAugmenter.planned(run.patch_size, self.plans.training.augmentation))

    # --- the loop -----------------------------------------------------------------------------------
    def fit(self) -> nn.Module:
        """Train every configured stage (resuming if a ``latest`` checkpoint exists) and write ``final``.
        Returns the trained network, on this process's device.

        Raises:
            TrainingInterrupted: after SIGINT/SIGTERM, once ``latest`` is written.
            ValueError: the run is not ready for training, this fold was started differently, training
                diverged or ran out of memory (:class:`~autoseg.training.runtime.RankFailed` on every rank
                when another rank failed).
        """
        configure_backends(self.rt.device, self.overrides.deterministic)  # before any kernel runs, the budget's too
        cfg = self.config = self.rt.from_main(self._prepare)
        self.bars = expand_bars(cfg.overrides.stop_at_dice, self.class_names)
        torch.manual_seed(self.plans.training.seed)
        net = self.network = self._new_network().to(self.rt.device)
        final = self.fold_dir / "checkpoint_final.pt"
        if final.is_file():
            net.load_state_dict(load_checkpoint(final, self.rt.device)["network"])
            self.say(f"{self.fold_dir}: already trained (checkpoint_final.pt); add --restart to train again")
            return net
        with self.stop.installed():
            self._train(cfg, net)
        if self.stop.requested:  # the signal came with the last step: training is complete, validation is not
            sig = signal.Signals(self.stop.signum or signal.SIGINT)
            raise TrainingInterrupted(f"{sig.name}: training finished (checkpoint_final.pt written) but was not "
                                      "validated; run the same command again to validate", 128 + int(sig))
        return net

    def _train(self, cfg: TrainConfig, net: nn.Module) -> None:
        if self.rt.main:
            remove_temporaries(self.fold_dir)  # a checkpoint half-written when the process was killed
        state, ckpt = TrainState(), None
        if self.latest.is_file():
            ckpt = load_checkpoint(self.latest, self.rt.device)
            self.resumed = True
            net.load_state_dict(ckpt["network"])
            state = ckpt["state"]
            restore_rng(ckpt)
            self.say(f"resuming    {self.fold_dir.name}: stage {cfg.stages[min(state.stage, len(cfg.stages) - 1)].name}"
                     f", step {state.step}")
        for si in range(state.stage, len(cfg.stages)):
            self._train_stage(cfg, si, net, state, ckpt)
            ckpt = None  # later stages start with a fresh optimiser
            state.stage, state.step = si + 1, 0
            if self.rt.main:
                save_checkpoint(self.latest, net, None, None, state)
        if self.rt.main:
            save_checkpoint(self.fold_dir / "checkpoint_final.pt", net, None, None, state)
            self.latest.unlink(missing_ok=True)
        self.rt.barrier()

    def _stepper(self, cfg: TrainConfig, si: int, net: nn.Module, ckpt: dict | None) -> Stepper:
        run, t = cfg.stages[si], self.plans.training
        sizes = rank_batch_sizes(run.batch_size, self.rt.world_size)
        model: nn.Module = net
        if self.rt.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            model = DistributedDataParallel(net, device_ids=ids)
            if self.rt.main:
                self.say(f"{run.name:<12} batch {'+'.join(map(str, sizes))} over {self.rt.world_size} processes = "
                         f"global {sum(sizes)} (planned {run.batch_size})")
        scale = sizes[self.rt.rank] * self.rt.world_size / sum(sizes)
        stepper = Stepper(model, net, self._loss().to(self.rt.device), make_optimizer(run.as_stage_plan(),
                          net.parameters()), self.rt.device, self.amp, t.grad_clip_norm, scale)
        if ckpt is not None and ckpt["optimizer"]:  # resuming inside this stage
            stepper.opt.load_state_dict(ckpt["optimizer"])
            if stepper.scaler is not None and ckpt["grad_scaler"]:
                stepper.scaler.load_state_dict(ckpt["grad_scaler"])
        return stepper

    def _train_stage(self, cfg: TrainConfig, si: int, net: nn.Module, state: TrainState, ckpt: dict | None) -> None:
        run, t = cfg.stages[si], self.plans.training
        b = rank_batch_sizes(run.batch_size, self.rt.world_size)[self.rt.rank]
        stepper = self._stepper(cfg, si, net, ckpt)
        sampler = PatchSampler(self.folder, cfg.train_cases, run.patch_size, t.oversample_foreground)
        guidance = Guidance.planned(self.plans.network)
        train_ds = BatchDataset(sampler, b, t.augmentation, t.seed, si, True, self.rt.rank, guidance=guidance)
        val_ds = BatchDataset(PatchSampler(self.folder, cfg.val_cases, run.patch_size, t.oversample_foreground),
                              b, t.augmentation, t.seed, si, False, self.rt.rank)
        augmenter = DeviceAugmenter.planned(run.patch_size, t.augmentation)
        loader = self._loader(train_ds, state.step, run.total_steps)
        iters, plan, bar = run.iterations_per_epoch, run.as_stage_plan(), None
        net.train()
        t_mark = time.perf_counter()
        check_budget = (self.overrides.time_budget_minutes is not None and not self.resumed
                        and run.name not in cfg.budget_checks and run.epochs > BUDGET_CHECK_EPOCH)
        if state.step == 0:
            start_stage(state)
        try:
            while state.step < run.total_steps:
                t0 = time.perf_counter()
                batch = self._next_batch(loader)
                state.epoch_data_wait += time.perf_counter() - t0
                if self._agree_to_stop(batch, f"{run.name} step {state.step}"):
                    if bar is not None:
                        bar.close()
                    self._interrupt(run.name, run.total_steps, net, stepper, state, t_mark)
                assert batch is not None
                if bar is None:
                    bar = tqdm(total=iters, initial=state.step % iters, leave=False, unit="step",
                               desc=f"{run.name} {state.step // iters + 1}/{run.epochs}",
                               disable=not (self.rt.progress and self.rt.main))
                x, y, guide = self._guard(f"{run.name} batch on the device", run.patch_size, b, batch_tensors, batch,
                                          self.rt.device, augmenter, guidance, t.oversample_foreground)
                lr, where = learning_rate(plan, state.step, run.total_steps), f"{run.name} step {state.step}"
                result = self._guard(f"{run.name} training step", run.patch_size, b, stepper.step, x, y, lr,
                                     where, guide)
                state.step += 1
                self._loss_finite = math.isfinite(result.loss)
                state.epoch_loss_sum += result.loss if self._loss_finite else 0.0
                state.epoch_loss_count += int(self._loss_finite)
                state.epoch_skipped += int(result.skipped)
                bar.update()
                if state.step % iters == 0:
                    bar.close()
                    bar = None
                    state.epoch_seconds += time.perf_counter() - t_mark
                    stepper.check_weights(where)
                    if (why := self._guard(f"{run.name} validation", run.patch_size, b, self._end_epoch, cfg, si,
                                           net, val_ds, stepper, state)) is not None:
                        self._stop_early(cfg, si, state, why)
                        break
                    if check_budget and state.step == BUDGET_CHECK_EPOCH * iters:
                        if self._refit_budget(cfg, si, time.perf_counter() - t_mark):
                            loader.close()  # the stage's length changed: batches from here to its new end
                            loader = self._loader(train_ds, state.step, run.total_steps)
                    t_mark = time.perf_counter()
            if bar is not None:
                bar.close()
        except (BatchError, RankFailed) as e:  # a batch could not be built, before its step: keep the steps done
            raise self._keep_steps(e, run.name, net, stepper, state) from None
        finally:
            loader.close()  # stops its workers now, not whenever a garbage collection finds it

    def _keep_steps(self, e: ValueError, stage: str, net: nn.Module, stepper: Stepper, state: TrainState) -> ValueError:
        """After a failed batch (a preprocessed case deleted or unreadable), write ``latest``; the error to raise."""
        if self.rt.main:
            save_checkpoint(self.latest, net, stepper.opt, stepper.scaler, state)
        self.rt.barrier()  # no rank exits before the checkpoint is complete (a launcher stops all on one exit)
        return with_resume_advice(e, stage, state.step, self.run_dir)

    def _loader(self, ds: BatchDataset, start: int, stop: int) -> Generator[dict, None, None]:
        return make_loader(ds, start, stop, self.rt.workers, self.rt.device.type == "cuda")  # type: ignore[no-any-return]

    def _next_batch(self, loader: Generator[dict, None, None]) -> dict | None:
        """The next batch; on several ranks a batch that failed is None (every rank learns it at
        :meth:`_agree_to_stop`), in a single process its error is raised here."""
        try:
            return next(loader)
        except BatchError as e:
            if not self.rt.distributed:
                raise
            self._batch_error = str(e)
            return None

    def _agree_to_stop(self, batch: dict | None, where: str) -> bool:
        """One collective per step: whether any rank was asked to stop, whether any rank failed to build its
        batch (then every rank raises the same error), and whether any rank's last loss was not finite (every
        rank counts it the same way)."""
        error = self._batch_error if batch is None else None
        stop, failed, non_finite = self.rt.reduce(
            [float(self.stop.requested), float(error is not None), float(not self._loss_finite)], "max")
        if failed:
            self.rt.raise_failure(error)
        self.non_finite.observe(non_finite > 0, where)
        if stop and not self.stop.requested:
            self.stop.request(signal.SIGTERM)  # another rank was signalled
        return stop > 0

    def _interrupt(self, stage: str, total: int, net: nn.Module, stepper: Stepper, state: TrainState,
                   t_mark: float) -> None:
        state.epoch_seconds += time.perf_counter() - t_mark
        if self.rt.main:
            save_checkpoint(self.latest, net, stepper.opt, stepper.scaler, state)
        self.stop.settle()  # written: a signal from here on (a launcher stopping the ranks) costs nothing
        self.rt.barrier()  # no rank exits before rank 0's checkpoint is complete (a launcher stops all on one exit)
        sig = signal.Signals(self.stop.signum or signal.SIGINT)
        raise TrainingInterrupted(f"{sig.name}: stopped at {stage} step {state.step} of {total}; checkpoint_latest.pt "
                                  "written; run the same command again to continue", 128 + int(sig))

    def _guard(self, what: str, patch: list[int], batch: int, work: Callable[..., T], *args: Any) -> T:
        est = next((s.estimated_memory_gib for s in self.plans.stages if list(s.patch_size) == list(patch)), None)
        return guard_out_of_memory(self.rt.device, what, patch, batch, est, work, *args)

    def _end_epoch(self, cfg: TrainConfig, si: int, net: nn.Module, val_ds: BatchDataset, stepper: Stepper,
                   state: TrainState) -> str | None:
        """Pseudo-Dice, log line, best and periodic checkpoints; returns why the stage stops early (None: it
        goes on)."""
        run, t = cfg.stages[si], self.plans.training
        epoch = state.step // run.iterations_per_epoch
        val_loss, per_class = pseudo_dice(net, val_ds, stepper.loss_fn, self.rt, self.amp, t.validation_iterations,
                                          len(self.plans.labels) - 1)
        mean = nanmean(per_class)
        state.ema = mean if state.ema < 0 else t.ema_momentum * state.ema + (1 - t.ema_momentum) * mean
        share = state.epoch_data_wait / max(state.epoch_seconds, 1e-9)
        state.log(stage=si, train_loss=state.epoch_loss_sum / max(state.epoch_loss_count, 1), val_loss=val_loss,
                  mean_dice=mean, ema=state.ema, lr=stepper.opt.param_groups[0]["lr"],
                  epoch_seconds=state.epoch_seconds, data_wait_share=share, skipped_steps=state.epoch_skipped)
        for c, d in enumerate(per_class, start=1):
            state.log(**{f"dice_{c}": d})
        state.epoch_loss_sum, state.epoch_loss_count, state.epoch_data_wait = 0.0, 0, 0.0
        state.epoch_seconds, state.epoch_skipped = 0.0, 0
        reason = early_stop_reason(state, per_class, t.ema_momentum, self.bars, self.class_names,
                                   self.overrides.patience)
        reason = reason if epoch < run.epochs else None  # the stage's last epoch ends it anyway
        if not self.rt.main:
            return reason
        line = epoch_line(run.name, epoch, run.epochs, state.history, per_class)
        self.say(line)
        append_log(self.fold_dir / "training_log.txt", line)
        if state.ema > state.best_ema:
            state.best_ema = state.ema
            save_checkpoint(self.fold_dir / "checkpoint_best.pt", net, None, None, state)
        if epoch % t.checkpoint_every_epochs == 0 or epoch == run.epochs:
            save_checkpoint(self.latest, net, stepper.opt, stepper.scaler, state)
            plot_progress(state.history, self.fold_dir / "progress.png")
        return reason

    def _stop_early(self, cfg: TrainConfig, si: int, state: TrainState, reason: str) -> None:
        """Record in ``config.json``, the console and the log that stage ``si`` ends here."""
        line = record_early_stop(cfg, si, state.step // cfg.stages[si].iterations_per_epoch, reason)
        if self.rt.main:
            self.say(line)
            append_log(self.fold_dir / "training_log.txt", line)
            save_config(cfg, self.fold_dir / CONFIG_FILE)
            plot_progress(state.history, self.fold_dir / "progress.png")

    def _refit_budget(self, cfg: TrainConfig, si: int, epoch_seconds: float) -> bool:
        """Correct the epochs of stage ``si`` and the later ones from the real duration of its check epoch;
        every rank takes the smallest of the ranks' answers. Recorded in ``config.json``; returns whether the
        stage's length changed (the learning-rate schedules follow the new lengths from the next step on)."""
        assert self.overrides.time_budget_minutes is not None
        epochs = refit_epochs(self.plans, cfg, self.overrides.time_budget_minutes, si, epoch_seconds,
                              BUDGET_CHECK_EPOCH, time.perf_counter() - self.t_start)
        agreed = [int(e) for e in self.rt.reduce([float(e) for e in epochs], "min")]
        rest = cfg.stages[si:]
        before = rest[0].epochs
        for r, e in zip(rest, agreed):
            r.epochs = e
        cfg.budget_checks[rest[0].name] = round(epoch_seconds, 3)
        if self.rt.main:
            save_config(cfg, self.fold_dir / CONFIG_FILE)
            self.say(f"time budget  an epoch of {rest[0].name} took {epoch_seconds:.1f} s -> epochs "
                     + ", ".join(f"{r.name} {r.epochs}" for r in cfg.stages))
        return rest[0].epochs != before
