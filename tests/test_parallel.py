"""Worker processes: results by case, failures and dead workers named by case id."""

from __future__ import annotations

import os

import pytest

from autoseg.parallel import CaseError, choose_workers, run_over_cases


def square_or_fail(x: int) -> int:
    if x == 3:
        raise ValueError("three is not allowed")
    return x * x


def die(x: int) -> int:
    os._exit(1)  # what the kernel's OOM killer looks like from the parent


@pytest.mark.parametrize("workers", [1, 2])
def test_results_by_case(workers):
    jobs = [(f"case{i}", (i,)) for i in (1, 2, 4)]
    assert run_over_cases(square_or_fail, jobs, workers, "t", progress=False) == {"case1": 1, "case2": 4, "case4": 16}


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_exception_names_the_case(workers):
    jobs = [(f"case{i}", (i,)) for i in range(1, 6)]
    with pytest.raises(CaseError, match=r"^case case3: ValueError: three is not allowed \(at test_parallel.py:\d+\)$"):
        run_over_cases(square_or_fail, jobs, workers, "t", progress=False)


def test_dead_worker_is_a_clear_error():
    with pytest.raises(CaseError, match="worker process died abruptly.*retry with fewer workers"):
        run_over_cases(die, [("a", (1,)), ("b", (2,))], 2, "t", progress=False)


def test_choose_workers():
    assert choose_workers(10, 1, requested=3) == 3
    assert choose_workers(1, 1) == 1
    assert choose_workers(100, 10**15) == 1  # a petabyte per worker: one at a time
    assert 1 <= choose_workers(100, 1) <= (os.cpu_count() or 1)
