"""Stored cases: round trip, and reading them in forked data-loading workers after the parent has read."""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from autoseg.preprocessing.storage import chunking, read_case_arrays, write_b2nd

PATCH = [64, 128, 128]


def _store(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1, 64, 128, 128)).astype(np.float32)
    seg = rng.integers(0, 3, size=(1, 64, 128, 128)).astype(np.int8)
    write_b2nd(data, folder / "case_data.b2nd", PATCH)
    write_b2nd(seg, folder / "case_seg.b2nd", PATCH)
    return data, seg


def _digest(region: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(region).tobytes()).hexdigest()


def _read_in_child(folder: str, expected: str, queue) -> None:  # type: ignore[no-untyped-def]
    data, _ = read_case_arrays(Path(folder), "case")
    queue.put(_digest(data[0, :40, :100, :100]) == expected)


def test_round_trip_and_chunking(tmp_path: Path) -> None:
    data, seg = _store(tmp_path)
    chunks, blocks = chunking(data.shape, 4, PATCH)
    assert chunks == (1, 64, 128, 128) and np.prod(blocks) * 4 <= 128 * 2**10  # many blocks per chunk
    got_data, got_seg = read_case_arrays(tmp_path, "case")
    np.testing.assert_array_equal(got_data[:], data)
    np.testing.assert_array_equal(got_seg[:], seg)
    np.testing.assert_array_equal(got_data[0, 3:9, 10:50, 7:8], data[0, 3:9, 10:50, 7:8])


def test_forked_worker_reads_after_parent_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: with c-blosc2's default decompression threads (one per core), a read in the parent
    followed by a read in a forked child (how DataLoader workers start after the trainer reads validation
    patches) hung the child forever."""
    import blosc2

    monkeypatch.setattr(blosc2, "nthreads", 2)  # the default on a 2-core machine, whatever this one has
    data, _ = _store(tmp_path)
    parent_data, parent_seg = read_case_arrays(tmp_path, "case")
    assert parent_data.schunk.dparams.nthreads == parent_seg.schunk.dparams.nthreads == 1
    expected = _digest(parent_data[0, :40, :100, :100])
    assert expected == _digest(data[0, :40, :100, :100])
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_read_in_child, args=(str(tmp_path), expected, queue)) for _ in range(3)]
    for child in children:
        child.start()
    deadline = time.monotonic() + 30
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [c for c in children if c.is_alive()]
    for child in hung:
        child.kill()
    assert not hung, "a forked reader hung on blosc2 decompression"
    assert [queue.get(timeout=5) for _ in children] == [True] * 3
