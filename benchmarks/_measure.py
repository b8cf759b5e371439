"""Measurements the benchmarks share: wall time and peak memory of a command and all the processes it starts
(Linux /proc), the rate at which one data worker makes batches, and what augmenting them on the device costs."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from autoseg.plans import AugmentationPlan

__all__ = ["tree_rss_bytes", "run_measured", "batches_per_second", "device_augment_seconds"]


def tree_rss_bytes(pid: int) -> int:
    """Sum of resident memory of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def run_measured(cmd: list[str], env: dict | None = None, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL) -> tuple[float, int, int]:
    """Run ``cmd`` (stdout to ``stdout``, stderr to ``stderr``); return wall seconds, peak tree RSS (bytes,
    sampled every 50 ms) and the exit code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.05)
    return time.perf_counter() - t0, peak, proc.returncode


def batches_per_second(batch: Callable[[int], object], batches: int) -> float:
    """Batches per second one data worker makes: ``batch(i)`` for ``i`` in ``1..batches`` on one intra-op
    thread, as in a worker process, after ``batch(0)`` as a warm-up (it opens the files). The thread count is
    restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch(0)
        t0 = time.perf_counter()
        for i in range(1, batches + 1):
            batch(i)
        return batches / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def device_augment_seconds(batch: Callable[[int], dict], patch: list[int], aug: AugmentationPlan,
                           device: torch.device, batches: int) -> float:
    """Seconds per batch of :class:`~autoseg.training.device_augment.DeviceAugmenter` on ``device`` (a torch
    device): ``batch(i)`` for ``i`` in ``0..batches`` are a :class:`~autoseg.training.data.BatchDataset`'s
    batches of enlarged regions (``aug``: its plan's augmentation, ``on_device`` set), moved to ``device`` first;
    ``batch(0)`` is the warm-up. CUDA work is synchronised before each clock read."""
    import torch

    from autoseg.training.device_augment import DeviceAugmenter

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    augmenter = DeviceAugmenter(patch, aug)
    moved = [(b["data"].to(device), b["seg"].to(device).long(), int(b["aug_seed"]))
             for b in map(batch, range(batches + 1))]
    augmenter(*moved[0])
    sync()
    t0 = time.perf_counter()
    for x, y, seed in moved[1:]:
        augmenter(x, y, seed)
    sync()
    return (time.perf_counter() - t0) / batches
