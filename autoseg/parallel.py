"""Run one function over many cases in worker processes, with a progress bar and errors that name the case.

A worker that raises does not become "a background worker is no longer alive": its exception text comes
back with the case id and is raised in the main process as :class:`CaseError`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = ["CaseError", "run_over_cases", "available_cores", "available_ram_bytes", "choose_workers"]


class CaseError(Exception):
    """Processing one case failed; ``case_id`` names it and ``detail`` carries the worker's error."""

    def __init__(self, case_id: str, detail: str):
        super().__init__(f"case {case_id}: {detail}")
        self.case_id = case_id
        self.detail = detail


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks and cgroup CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def available_ram_bytes() -> int:
    """RAM that can be allocated now without swapping (MemAvailable on Linux), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def choose_workers(n_items: int, bytes_per_worker: int, requested: int | None = None) -> int:
    """Number of worker processes: ``requested`` if given, else bounded by cores, items and free RAM.

    Args:
        n_items: number of cases to process.
        bytes_per_worker: peak memory one worker needs for the largest case (bytes).
        requested: an explicit ``-j`` from the user; wins when given.
    """
    if requested is not None:
        return max(1, requested)
    by_ram = int(available_ram_bytes() * 0.7 // max(bytes_per_worker, 1))
    return max(1, min(available_cores(), n_items, by_ram))


def _call(fn: Callable[..., Any], case_id: str, args: tuple) -> tuple[str, bool, Any]:
    try:
        return case_id, True, fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure is reported with its case id
        tb = traceback.extract_tb(e.__traceback__)
        where = f" (at {tb[-1].filename.rsplit(os.sep, 1)[-1]}:{tb[-1].lineno})" if tb else ""
        return case_id, False, f"{type(e).__name__}: {e}{where}"


def run_over_cases(fn: Callable[..., Any], jobs: Sequence[tuple[str, tuple]], workers: int,
                   desc: str, progress: bool = True) -> dict[str, Any]:
    """Call ``fn(*args)`` for each ``(case_id, args)`` in ``jobs``, in ``workers`` processes.

    Returns:
        case id -> result, for every job.

    Raises:
        CaseError: the first case (in job order) whose call raised, after all jobs have finished.
    """
    from tqdm import tqdm

    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=None if progress else True, leave=False)
    try:
        if workers <= 1 or len(jobs) <= 1:
            outcomes = (_call(fn, cid, args) for cid, args in jobs)
            for cid, ok, value in outcomes:
                (results if ok else failures)[cid] = value
                bar.update()
        else:
            ctx = mp.get_context("spawn")  # safe with threads (torch, BLAS) and identical on every OS
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
            futures = {pool.submit(_call, fn, cid, args): cid for cid, args in jobs}
            try:
                for fut in as_completed(futures):
                    cid, ok, value = fut.result()
                    (results if ok else failures)[cid] = value
                    bar.update()
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                lost = [c for f, c in futures.items() if c not in results and c not in failures]
                raise CaseError(lost[0], f"a worker process died abruptly (killed, for example for lack of memory) "
                                f"while {len(lost)} case(s) were unfinished ({', '.join(lost[:5])}"
                                f"{', ...' if len(lost) > 5 else ''}); retry with fewer workers (-j 1)") from None
            except BaseException:  # Ctrl-C: do not start the cases still queued
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
    finally:
        bar.close()
    for cid, _ in jobs:
        if cid in failures:
            raise CaseError(cid, failures[cid])
    return results
