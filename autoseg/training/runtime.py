"""Where a training process runs: its device, its rank among the DDP processes, and every collective it
takes part in. Every tensor handed to ``torch.distributed`` is made here, on the process's own device (NCCL
refuses CPU tensors), so no other module of autoseg calls ``torch.distributed`` directly."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar

import torch

from autoseg.parallel import available_cores

__all__ = ["Runtime", "RankFailed", "distributed_runtime", "data_workers", "rank_batch_sizes",
           "configure_backends", "COLLECTIVE_TIMEOUT"]

T = TypeVar("T")
#: a collective that waits longer than this for another rank fails instead of hanging
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
ReduceOp = Literal["sum", "min", "max"]


class RankFailed(ValueError):
    """Another rank failed; every rank raises this with the same line, naming the rank and its reason."""


@dataclass
class Runtime:
    """This process's device, DDP rank and world size, data workers and whether to draw progress bars.

    ``dist`` is the ``torch.distributed`` module (a test may put a recorder in its place).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    workers: int = 1
    progress: bool = True
    dist: Any = field(default=None, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _module(self) -> Any:
        if self.dist is None:
            import torch.distributed as dist

            self.dist = dist
        return self.dist

    def _op(self, op: ReduceOp) -> Any:
        r = self._module().ReduceOp
        return {"sum": r.SUM, "min": r.MIN, "max": r.MAX}[op]

    def reduce(self, values: list[float], op: ReduceOp, dtype: torch.dtype = torch.float64) -> list[float]:
        """``values`` combined element-wise over the ranks (unchanged in a single process)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=dtype, device=self.device)
        self._module().all_reduce(t, op=self._op(op))
        return [float(v) for v in t.tolist()]

    def reduce_tensor(self, t: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        """A copy of ``t`` on this process's device, combined over the ranks."""
        out = t.to(self.device, copy=True)
        if self.distributed:
            self._module().all_reduce(out, op=self._op(op))
        return out

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order, on every rank (``[value]`` in a single process)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        self._module().all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else None
            self._module().barrier(device_ids=ids) if ids else self._module().barrier()

    def from_main(self, make: Callable[[], T]) -> T:
        """``make()`` run on rank 0 only, its result (or its failure) given to every rank.

        Raises:
            RankFailed: on every rank when ``make`` raised on rank 0 (rank 0 re-raises its own error).
        """
        if not self.distributed:
            return make()
        result: Any = None
        error: BaseException | None = None
        if self.main:
            try:
                result = make()
            except Exception as e:  # handed to the other ranks, then raised here unchanged
                error = e
        box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
        self._module().broadcast_object_list(box, src=0, device=self._object_device())
        value, message = box[0]
        if error is not None:
            raise error
        if message is not None:
            raise RankFailed(f"rank 0 of {self.world_size} failed: {message}")
        return value  # type: ignore[no-any-return]

    def raise_failure(self, local_error: str | None) -> None:
        """Called by every rank once they agreed (with :meth:`reduce`) that some rank failed: every rank raises
        :class:`RankFailed` naming the first failing rank and its message.

        Raises:
            RankFailed: always.
        """
        if not self.distributed:
            raise RankFailed(str(local_error))
        messages: list[Any] = [None] * self.world_size
        self._module().all_gather_object(messages, local_error)
        rank, message = next(((r, m) for r, m in enumerate(messages) if m), (self.rank, local_error))
        raise RankFailed(f"rank {rank} of {self.world_size} failed: {message}")

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    def close(self) -> None:
        """Leave the process group (every rank, at the end of the command, also after an error)."""
        if self.distributed and self._module().is_initialized():
            self._module().destroy_process_group()


def rank_batch_sizes(global_batch: int, world_size: int) -> list[int]:
    """Samples per rank: the global batch split as evenly as possible, the first ranks taking the remainder
    (batch 7 on 2 GPUs: 4 + 3). A global batch smaller than the number of ranks cannot be split: every rank
    then takes one sample and the global batch grows to ``world_size`` (the trainer says so)."""
    if global_batch < world_size:
        return [1] * world_size
    base, extra = divmod(global_batch, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def data_workers(device: torch.device, cores: int, requested: int | None) -> int:
    """Background processes for batches: on a GPU all cores but one (max 12), on a CPU one per two cores
    (the network needs the cores; a batch takes ~10 % of a CPU step, measured on Hippocampus)."""
    if requested is not None:
        return max(0, requested)
    if device.type == "cuda":
        return max(1, min(cores - 1, 12))
    return max(1, cores // 2)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN autotuning (fastest kernels, but their choice may differ between runs, so a resumed run is not
    bit-identical) unless ``deterministic``: then deterministic cuDNN and cuBLAS kernels, no autotuning. Sets
    both ways, so a process that trains twice (benchmarks, tests) does not keep the first call's setting."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS when CUDA starts
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def distributed_runtime(device_choice: str, workers: int | None, progress: bool) -> Runtime:
    """The runtime of this process: under torchrun (``WORLD_SIZE`` > 1) joins the process group (NCCL on
    CUDA, gloo on the CPU) and takes the GPU ``LOCAL_RANK``; otherwise a single process on the best device.

    Raises:
        ValueError: ``cuda`` asked for but not visible, or fewer GPUs than local ranks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_choice != "cpu"
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to PyTorch (CPU-only build or no GPU)")
    if world <= 1:
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return Runtime(device, 0, 1, data_workers(device, available_cores(), workers), progress)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda and local >= torch.cuda.device_count():
        raise ValueError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": COLLECTIVE_TIMEOUT}
        if cuda:
            kwargs["device_id"] = device  # binds NCCL to this GPU at once (no guessing in barrier)
        dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cores = max(1, available_cores() // max(1, local_world))
    if not cuda:  # the processes of a machine share its cores
        torch.set_num_threads(cores)
    return Runtime(device, rank, world, data_workers(device, cores, workers), progress, dist)

