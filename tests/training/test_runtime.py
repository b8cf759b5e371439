"""The runtime: collectives on the rank's own device, the split of the global batch, and ranks that fail
together (two gloo processes on this machine)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from autoseg.training.runtime import RankFailed, Runtime, configure_backends, distributed_runtime, rank_batch_sizes


class Recorded(Exception):
    pass


class RecordingDist:
    """Stands in for ``torch.distributed``: notes the device of every tensor handed to a collective, then
    stops the call (a tensor on the meta device has no values to reduce)."""

    ReduceOp = SimpleNamespace(SUM="sum", MIN="min", MAX="max")

    def __init__(self) -> None:
        self.devices: list[torch.device] = []
        self.object_devices: list[torch.device | None] = []

    def all_reduce(self, t: torch.Tensor, op: str) -> None:
        self.devices.append(t.device)
        raise Recorded

    def broadcast_object_list(self, objects: list, src: int, device: torch.device | None = None) -> None:
        self.object_devices.append(device)
        raise Recorded

    def barrier(self, device_ids: list[int] | None = None) -> None:
        raise Recorded


def test_every_collective_gets_tensors_on_the_ranks_device():
    """NCCL refuses CPU tensors: every tensor a collective gets must live on ``rt.device``. The meta device
    stands in for a GPU here (a CPU tensor would show as ``cpu``)."""
    fake = RecordingDist()
    rt = Runtime(torch.device("meta"), rank=1, world_size=2, dist=fake)
    for call in (lambda: rt.reduce([1.0, 0.0], "max"), lambda: rt.reduce([3.0], "min"),
                 lambda: rt.reduce_tensor(torch.zeros(3, 2, dtype=torch.int64)),
                 lambda: rt.reduce_tensor(torch.zeros(1, dtype=torch.float64), "sum")):
        with pytest.raises(Recorded):
            call()
    assert fake.devices == [torch.device("meta")] * 4


def test_a_single_process_makes_no_collective():
    rt = Runtime(torch.device("cpu"), dist=RecordingDist())
    assert rt.reduce([2.0, 5.0], "max") == [2.0, 5.0]
    assert torch.equal(rt.reduce_tensor(torch.tensor([1, 2])), torch.tensor([1, 2]))
    rt.barrier()
    assert rt.from_main(lambda: 7) == 7
    with pytest.raises(RankFailed, match="case x"):
        rt.raise_failure("case x: broken")


@pytest.mark.parametrize("batch, world, sizes", [(2, 1, [2]), (2, 2, [1, 1]), (7, 2, [4, 3]), (8, 4, [2, 2, 2, 2]),
                                                 (5, 3, [2, 2, 1]), (2, 4, [1, 1, 1, 1])])
def test_the_global_batch_is_split_with_the_remainder_on_the_first_ranks(batch, world, sizes):
    assert rank_batch_sizes(batch, world) == sizes
    assert sum(sizes) == max(batch, world)  # kept, or one sample per rank when it cannot be split


def _failing_worker(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    rt = distributed_runtime("cpu", 0, False)
    lines = []
    try:
        def config_fails_on_rank_0() -> int:
            raise ValueError("config.json: broken")

        try:
            rt.from_main(config_fails_on_rank_0)
        except (RankFailed, ValueError) as e:
            lines.append(f"{type(e).__name__}: {e}")
        assert rt.from_main(lambda: {"epochs": 3}) == {"epochs": 3}  # and both ranks carry on in step
        error = "case 7: BatchError: bad" if rank == 1 else None
        stop, failed = rt.reduce([0.0, float(error is not None)], "max")
        try:
            rt.raise_failure(error)
        except RankFailed as e:
            lines.append(f"{type(e).__name__}: {e} ({failed})")
        lines.append(f"min {rt.reduce([float(rank + 4)], 'min')} sum {rt.reduce_tensor(torch.tensor([rank + 1]))}")
    finally:
        rt.close()
    Path(out, f"rank{rank}.txt").write_text("\n".join(lines))


def test_backends_are_set_both_ways(deterministic_setting_restored):
    """A process that trains with --deterministic and then without (a benchmark, the tests) does not keep
    deterministic algorithms on, nor the reverse."""
    configure_backends(torch.device("cpu"), True)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    configure_backends(torch.device("cpu"), False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_ranks_fail_together_with_one_line_naming_the_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.spawn(_failing_worker, args=(str(tmp_path), port), nprocs=2, join=False)
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks hung")
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    assert r0[0] == "ValueError: config.json: broken"  # rank 0 raises its own error
    assert r1[0] == "RankFailed: rank 0 of 2 failed: ValueError: config.json: broken"
    assert r0[1] == r1[1] == "RankFailed: rank 1 of 2 failed: case 7: BatchError: bad (1.0)"
    assert r0[2] == r1[2] == "min [4.0] sum tensor([3])"
