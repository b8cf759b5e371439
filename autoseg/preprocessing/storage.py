"""Preprocessed cases on disk: blosc2 arrays chunked for random patch reads, plus a properties JSON.

Per case: ``<case>_data.b2nd`` (float32, channels first), ``<case>_seg.b2nd`` (smallest integer type),
``<case>_locations.npy`` (sampled class voxels, rows ``(class, z, y, x)``) and ``<case>.json``
(:class:`CaseProperties`). Each file is written under a temporary name and renamed; the JSON
comes last, so its presence marks a complete case.
"""

from __future__ import annotations

from math import prod
from pathlib import Path

import numpy as np

from autoseg.atomic import atomic_path, copy_file
from autoseg.io import strip_suffix
from autoseg.preprocessing.transform import CaseProperties
from autoseg.typedjson import SchemaError, from_jsonable, read_json, write_json_atomic

__all__ = ["write_case", "write_b2nd", "read_case_arrays", "read_properties", "read_class_locations",
           "case_is_complete", "chunking", "CASE_FILES", "store_reference", "stored_references", "REFERENCE_TAG",
           "require_cases"]

#: the files of one case; the JSON is written last
CASE_FILES = ("_data.b2nd", "_seg.b2nd", "_locations.npy", ".json")
#: ``<case>_reference<ending>``: a byte copy of the case's original label file, which fold validation scores
#: against, so that a run folder copied elsewhere (a cluster) validates without the dataset
REFERENCE_TAG = "_reference"
#: a block (the unit blosc2 decompresses) is kept near an L2 cache; a chunk near a patch
BLOCK_BYTES = 128 * 2**10
CHUNK_BYTES = 4 * 2**20


def _shrink(box: list[int], itemsize: int, limit: int) -> list[int]:
    box = list(box)
    while prod(box) * itemsize > limit and max(box) > 1:
        a = int(np.argmax(box))
        box[a] = (box[a] + 1) // 2
    return box


def chunking(shape: tuple[int, ...], itemsize: int, patch: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunks and blocks for an array ``(C, z, y, x)``: one channel per chunk, a chunk about a patch (at most
    ``CHUNK_BYTES``), blocks of at most ``BLOCK_BYTES`` so that a random patch decompresses little extra."""
    spatial = [min(s, p) for s, p in zip(shape[1:], patch)]
    chunk = _shrink(spatial, itemsize, CHUNK_BYTES)
    block = _shrink(chunk, itemsize, BLOCK_BYTES)
    return (1, *chunk), (1, *block)


def write_b2nd(array: np.ndarray, path: Path, patch: list[int]) -> None:
    """Write ``array`` ``(C, z, y, x)`` to ``path`` as blosc2, chunked for ``patch`` reads, atomically."""
    import blosc2

    chunks, blocks = chunking(array.shape, array.dtype.itemsize, patch)
    with atomic_path(path) as tmp:
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks,
                       cparams={"codec": blosc2.Codec.ZSTD, "clevel": 5, "nthreads": 1})


def write_case(folder: Path, data: np.ndarray, seg: np.ndarray, locations: np.ndarray, props: CaseProperties,
               patch: list[int]) -> None:
    """Write one case atomically (arrays first, properties JSON last)."""
    write_b2nd(data, folder / f"{props.case_id}_data.b2nd", patch)
    write_b2nd(seg[None], folder / f"{props.case_id}_seg.b2nd", patch)
    with atomic_path(folder / f"{props.case_id}_locations.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, locations)
    write_json_atomic(props, folder / f"{props.case_id}.json")


def store_reference(label: Path, folder: Path, case_id: str) -> Path:
    """Copy the original label file ``label`` of ``case_id`` into ``folder`` (atomically); returns the copy."""
    stem = strip_suffix(label.name) or label.name
    path = folder / f"{case_id}{REFERENCE_TAG}{label.name[len(stem):]}"
    copy_file(label, path)
    return path


def stored_references(folder: Path) -> dict[str, Path]:
    """Case id -> the label copy :func:`store_reference` made, for every case that has one."""
    out = {}
    for p in folder.glob(f"*{REFERENCE_TAG}.*"):
        stem = strip_suffix(p.name)
        if stem is not None and stem.endswith(REFERENCE_TAG) and not p.name.startswith("."):
            out[stem[: -len(REFERENCE_TAG)]] = p
    return out


def read_class_locations(folder: Path, case_id: str) -> dict[int, np.ndarray]:
    """Sampled voxel coordinates per class: class value -> ``(n, 3)`` int array (z, y, x)."""
    rows = np.load(folder / f"{case_id}_locations.npy")
    return {int(v): rows[rows[:, 0] == v, 1:] for v in np.unique(rows[:, 0])}


def read_properties(folder: Path, case_id: str) -> CaseProperties:
    """Read ``<case>.json``.

    Raises:
        SchemaError: missing or malformed.
    """
    path = folder / f"{case_id}.json"
    if not path.is_file():
        raise SchemaError(f"{path}: missing; run autoseg preprocess")
    return from_jsonable(CaseProperties, read_json(path))


def read_case_arrays(folder: Path, case_id: str):
    """Open the stored arrays of a case without decompressing them: ``(data, seg)`` blosc2 arrays that
    decompress only the chunks a slice touches.

    Decompression is single-threaded: c-blosc2's thread pool does not survive ``fork``, and the trainer reads
    cases in the main process before it forks data-loading workers, whose first read then waits forever on the
    inherited pool (a reproducible hang with the default two threads). Workers give the parallelism instead.
    """
    import blosc2

    dparams = {"nthreads": 1}
    return (blosc2.open(str(folder / f"{case_id}_data.b2nd"), mmap_mode="r", dparams=dparams),
            blosc2.open(str(folder / f"{case_id}_seg.b2nd"), mmap_mode="r", dparams=dparams))


def require_cases(folder: Path, cases: list[str], command: str) -> None:
    """Make sure every case in ``cases`` is preprocessed in ``folder``.

    Raises:
        ValueError: names how many are missing, one of them, and the ``command`` that makes them.
    """
    missing = [c for c in cases if not (folder / f"{c}.json").is_file()]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} case(s) not preprocessed (e.g. {missing[0]}); run '{command}' "
                         "first")


def case_is_complete(folder: Path, case_id: str, source_key: str) -> bool:
    """True when the case's three files exist, its properties parse, and it was made from the same sources
    with the same settings."""
    if not all((folder / f"{case_id}{s}").is_file() for s in CASE_FILES):
        return False
    try:
        return read_properties(folder, case_id).source_key == source_key
    except (SchemaError, TypeError, ValueError):
        return False
