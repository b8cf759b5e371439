"""Which device autoseg will train on and how much memory a training step may use."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from autoseg.parallel import available_cores

__all__ = ["DeviceInfo", "detect_device", "check_device_args", "is_out_of_memory", "is_gpu_out_of_memory", "first_line",
           "cpu_has_native_bfloat16"]


@dataclass
class DeviceInfo:
    """The training device and its memory budget.

    Attributes:
        kind: ``"cuda"`` or ``"cpu"``: what the plan is made for.
        name: device name (GPU model or CPU model).
        cores: CPU cores available to this process.
        ram_gib: physical RAM (GiB).
        gpu_memory_gib: total memory of the GPU (GiB), None on CPU.
        budget_gib: memory a training step may plan to use (GiB), before autoseg's reserves.
        budget_source: ``"detected"`` or ``"--gpu-memory"``.
    """

    kind: str
    name: str
    cores: int
    ram_gib: float
    gpu_memory_gib: float | None
    budget_gib: float
    budget_source: str


def _ram_gib() -> float:
    try:
        return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 2)
    except (ValueError, OSError, AttributeError):
        return 8.0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def check_device_args(gpu_memory_gib: float | None, device: str) -> None:
    """The checks of :func:`detect_device`'s arguments that need no torch (``autoseg plan`` makes them before
    it reads the dataset).

    Raises:
        ValueError: a non-positive memory, or an unknown device name.
    """
    if gpu_memory_gib is not None and gpu_memory_gib <= 0:
        raise ValueError(f"--gpu-memory must be positive, got {gpu_memory_gib}")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")


def detect_device(gpu_memory_gib: float | None = None, device: str = "auto") -> DeviceInfo:
    """Describe the device a plan is made for.

    Args:
        gpu_memory_gib: plan for a CUDA GPU with this much memory (GiB), whatever this machine has.
        device: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``.

    Raises:
        ValueError: ``device="cuda"`` without a GPU and without ``gpu_memory_gib``, or a non-positive memory.
    """
    check_device_args(gpu_memory_gib, device)
    cores, ram = available_cores(), _ram_gib()
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cpu" and gpu_memory_gib is None:
        return DeviceInfo("cpu", _cpu_name(), cores, ram, None, round(ram, 2), "detected")
    if has_cuda and device in ("auto", "cuda"):
        idx = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(idx).total_memory / 2**30
        name = torch.cuda.get_device_name(idx)
        budget, source = (gpu_memory_gib, "--gpu-memory") if gpu_memory_gib else (total, "detected")
        return DeviceInfo("cuda", name, cores, ram, round(total, 2), round(budget, 2), source)
    if gpu_memory_gib is not None:
        return DeviceInfo("cuda", "planned GPU (none on this machine)", cores, ram, None,
                          round(gpu_memory_gib, 2), "--gpu-memory")
    if device == "cuda":
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; give --gpu-memory GB to plan "
                         "for a GPU elsewhere")
    return DeviceInfo("cpu", _cpu_name(), cores, ram, None, round(ram, 2), "detected")


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AMX tiles or AVX512-BF16), as PyTorch reports it."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(check()) for check in checks if check is not None)


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (PyTorch's CUDA errors add lines of debugging advice), or its type."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    """True for running out of memory: CUDA's ``OutOfMemoryError``, a CUDA/cuDNN/cuBLAS ``out of memory`` or
    allocation failure, PyTorch's CPU allocator failing (``can't allocate memory``) or Python's ``MemoryError``."""
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):  # torch.cuda's name exists since 1.13
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and any(
        m in msg for m in ("out of memory", "can't allocate memory", "STATUS_ALLOC_FAILED"))


def is_gpu_out_of_memory(exc: BaseException) -> bool:
    """Out of GPU memory, as opposed to RAM."""
    import torch

    msg = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (isinstance(exc, RuntimeError) and (
        ("CUDA" in msg and "out of memory" in msg) or "STATUS_ALLOC_FAILED" in msg))
