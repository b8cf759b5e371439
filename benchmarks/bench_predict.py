"""Prediction time per case and peak memory: autoseg predict with and without mirroring, and one large
generated CT-like volume; next to nnU-Net v2's predict from ``../shared/bench/nnunet/run.sh ... SCANS_DIR``.

Usage: python benchmarks/bench_predict.py RUN_DIR SCANS_DIR [--folds 0] [--large 512 512 300]
       [--nnunet-s-per-case S]

Each configuration runs ``autoseg predict`` in a fresh process (model loading included), timed over the
whole folder, with the peak RSS of the process tree. ``--large X Y Z`` also predicts one generated volume of
that many voxels (x, y, z; 1 mm) without mirroring and reports its time and peak memory. Run by hand.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from _measure import run_measured


def predict_row(run: Path, scans: Path, out: Path, folds: list[str], tta: bool) -> dict:
    n = len([p for p in scans.iterdir() if p.name.endswith((".nii.gz", ".nii"))])
    cmd = [sys.executable, "-m", "autoseg", "predict", "-i", str(scans), "-o", str(out), "--run", str(run),
           "--no-progress", "--folds", *folds] + ([] if tta else ["--no-tta"])
    wall, peak, code = run_measured(cmd)
    if code:
        raise SystemExit(f"autoseg predict failed ({code}): {' '.join(cmd)}")
    return {"what": f"{n} cases, {'TTA' if tta else 'no TTA'}", "s_per_case": wall / n, "peak_mib": peak / 2**20}


def large_volume(folder: Path, size_xyz: list[int]) -> Path:
    """A CT-like volume: a body ellipse of soft tissue with noise on air, 1 mm voxels."""
    import SimpleITK as sitk

    x, y, z = size_xyz
    rng = np.random.default_rng(0)
    zz, yy, xx = np.ogrid[:z, :y, :x]
    body = ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1
    vol = np.where(body, 40.0, -1000.0).astype(np.float32) + rng.normal(0, 20, (z, y, x)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "large_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(path))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("scans", type=Path)
    ap.add_argument("--folds", nargs="+", default=["0"])
    ap.add_argument("--large", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"))
    ap.add_argument("--nnunet-s-per-case", type=float, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tta in (True, False):
            rows.append(predict_row(args.run_dir, args.scans, Path(tmp) / f"out_{tta}", args.folds, tta))
        if args.large:
            large_volume(Path(tmp) / "large", args.large)
            r = predict_row(args.run_dir, Path(tmp) / "large", Path(tmp) / "out_large", args.folds, False)
            r["what"] = f"one {'x'.join(map(str, args.large))} volume, no TTA"
            rows.append(r)
    print("| autoseg predict | s per case | peak MiB |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['s_per_case']:.2f} | {r['peak_mib']:.0f} |")
    if args.nnunet_s_per_case is not None:
        print(f"| nnU-Net v2 (run.sh, TTA) | {args.nnunet_s_per_case:.2f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
