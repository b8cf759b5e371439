"""Storage formats for preprocessed cases: size on disk, write time, and random patch reads.

Compares autoseg's chunked blosc2 (autoseg.preprocessing.storage) with an uncompressed .npy read through a
memory map and with a compressed .npz (which must be decompressed whole). A CT-sized float32 volume of
smooth noise inside an ellipsoidal body and a constant background; patches of a zoom-out size at random
places.
Usage: python benchmarks/bench_storage.py [--shape 200 512 512] [--patch 64 192 192] [--reads 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.preprocessing.storage import write_b2nd


def volume(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    v = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 3)
    v += 0.05 * rng.normal(size=shape).astype(np.float32)  # texture, as in real scans
    v /= v.std()
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    body = sum(((g - s / 2) / (0.45 * s)) ** 2 for g, s in zip(grid, shape)) <= 1
    v[~body] = v.min()  # constant outside the body, as air or background is after normalisation
    return v[None].astype(np.float32)


def timed(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[200, 512, 512],
                    help="array shape of the generated volume (default 200 512 512)")
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 192, 192],
                    help="array shape of each patch read (default 64 192 192)")
    ap.add_argument("--reads", type=int, default=50, help="patches read at random places per format (default 50)")
    args = ap.parse_args()
    data = volume(tuple(args.shape))
    rng = np.random.default_rng(1)
    corners = [[int(rng.integers(0, s - p + 1)) for s, p in zip(args.shape, args.patch)] for _ in range(args.reads)]
    boxes = iter([])

    def next_box():
        nonlocal boxes
        try:
            return next(boxes)
        except StopIteration:
            boxes = iter(corners)
            return next(boxes)

    def patch(arr):
        z, y, x = next_box()
        pz, py, px = args.patch
        return np.array(arr[:, z:z + pz, y:y + py, x:x + px])  # a real copy: memmap slices are lazy

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        import blosc2

        p = Path(tmp) / "case_data.b2nd"
        t0 = time.perf_counter()
        write_b2nd(data, p, args.patch)
        w = time.perf_counter() - t0
        arr = blosc2.open(str(p), mmap_mode="r")
        rows.append(("blosc2, chunked (autoseg)", p.stat().st_size, w, timed(lambda: patch(arr), args.reads)))

        p = Path(tmp) / "case.npy"
        t0 = time.perf_counter()
        np.save(p, data)
        w = time.perf_counter() - t0
        mm = np.load(p, mmap_mode="r")
        rows.append(("npy, memory-mapped", p.stat().st_size, w, timed(lambda: patch(mm), args.reads)))

        p = Path(tmp) / "case.npz"
        t0 = time.perf_counter()
        np.savez_compressed(p, data=data)
        w = time.perf_counter() - t0
        rows.append(("npz, compressed", p.stat().st_size, w,
                     timed(lambda: patch(np.load(p)["data"]), max(3, args.reads // 10))))
    print(f"volume {args.shape} float32 ({data.nbytes / 2**20:.0f} MiB), patch {args.patch}, "
          f"{args.reads} random reads (page cache warm)")
    print("| format                     | size MiB | write s | median read ms/patch |")
    print("|----------------------------|----------|---------|----------------------|")
    for name, size, w, r in rows:
        print(f"| {name:<26} | {size / 2**20:8.1f} | {w:7.2f} | {1000 * r:20.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
