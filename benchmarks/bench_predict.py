"""Prediction time per case and peak memory, autoseg next to nnU-Net v2 in the same run: the same scans with
and without mirroring, and one large generated CT-like volume.

Usage: python benchmarks/bench_predict.py RUN_DIR SCANS_DIR [--folds 0] [--large 512 512 300]
       [--large-spacing 1 1 1] [--nnunet-out OUT] [--nnunet-venv /work/.venv-nnunet]

Each configuration runs in a fresh process (model loading included), timed over the whole folder, with the
peak resident memory of the process tree (sampled every 50 ms). ``--large X Y Z`` adds one generated volume
of that many voxels (x, y, z) at ``--large-spacing`` mm, predicted without mirroring. ``--nnunet-out`` is the
OUT folder of ``../shared/bench/nnunet/run.sh DATASET MINUTES OUT`` (its trained fold 0, or the untrained one
``benchmarks/nnunet_untrained_fold.py`` writes, for timing only), of ``--nnunet-config``: nnU-Net's
``predict`` then runs on the same scans, settings and volume, one after the other with autoseg's. Run by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from _measure import run_measured

SHIM = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "nnunet" / "nnunet_shim.py"


def count_scans(folder: Path) -> int:
    return len([p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii"))])


def autoseg_row(run: Path, scans: Path, out: Path, folds: list[str], tta: bool) -> dict:
    cmd = [sys.executable, "-m", "autoseg", "predict", "-i", str(scans), "-o", str(out), "--run", str(run),
           "--no-progress", "--folds", *folds, "--tta" if tta else "--no-tta"]
    return measured("autoseg", cmd, count_scans(scans), tta)


def nnunet_row(nnunet_out: Path, venv: Path, scans: Path, out: Path, tta: bool, config: str = "3d_fullres") -> dict:
    """``nnUNetv2_predict`` (through the bench shim) with fold 0 of run.sh's training, on ``_0000`` links."""
    linked = out.parent / f"{out.name}_in"
    linked.mkdir(parents=True, exist_ok=True)
    for f in scans.iterdir():
        if f.name.endswith(".nii.gz") and not (linked / f.name).exists():
            name = f.name[:-len(".nii.gz")]
            name = name if name.endswith("_0000") else f"{name}_0000"
            (linked / f"{name}.nii.gz").symlink_to(f.resolve())
    env = dict(os.environ, nnUNet_raw=str(nnunet_out / "raw"), nnUNet_preprocessed=str(nnunet_out / "pre"),
               nnUNet_results=str(nnunet_out / "res"), nnUNet_n_proc_DA="2")
    cmd = [str(venv / "bin" / "python"), str(SHIM), "predict", "-i", str(linked), "-o", str(out), "-d", "99",
           "-c", config, "-f", "0", "-tr", "nnUNetTrainer_Budget", "-device", "cpu",
           "-chk", "checkpoint_final.pth"] + ([] if tta else ["--disable_tta"])
    return measured("nnU-Net v2", cmd, count_scans(scans), tta, env)


def measured(tool: str, cmd: list[str], n: int, tta: bool, env: dict | None = None) -> dict:
    wall, peak, code = run_measured(cmd, env=env)
    if code:
        raise SystemExit(f"{tool} predict failed ({code}): {' '.join(cmd)}")
    return {"tool": tool, "what": f"{n} cases, {'TTA' if tta else 'no TTA'}", "s_per_case": wall / n,
            "peak_mib": peak / 2**20}


def large_volume(folder: Path, size_xyz: list[int], spacing_xyz: list[float]) -> Path:
    """A CT-like volume: a body ellipse of soft tissue with noise, on air."""
    import SimpleITK as sitk

    x, y, z = size_xyz
    rng = np.random.default_rng(0)
    _, yy, xx = np.ogrid[:z, :y, :x]
    body = ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1
    vol = np.where(body, 40.0, -1000.0).astype(np.float32) + rng.normal(0, 20, (z, y, x)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing([float(s) for s in spacing_xyz])
    path = folder / "large_0000.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a trained autoseg run (autoseg train wrote its folds)")
    ap.add_argument("scans", type=Path, help="folder of NIfTI scans to predict, named as autoseg predict expects")
    ap.add_argument("--folds", nargs="+", default=["0"], help="autoseg folds to predict with (default 0)")
    ap.add_argument("--large", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="also predict one generated CT-like volume of this many voxels, without mirroring")
    ap.add_argument("--large-spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("SX", "SY", "SZ"),
                    help="voxel spacing in mm of the --large volume (default 1 1 1)")
    ap.add_argument("--nnunet-out", type=Path, default=None, help="run.sh's OUT folder (trained fold 0)")
    ap.add_argument("--nnunet-venv", type=Path, default=Path("/work/.venv-nnunet"),
                    help="venv with nnunetv2 installed (see ../shared/bench/README.md)")
    ap.add_argument("--nnunet-config", default="3d_fullres", help="nnU-Net configuration of the fold")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        large = large_volume(tmp / "large", args.large, args.large_spacing).parent if args.large else None
        for tta in (True, False):
            rows.append(autoseg_row(args.run_dir, args.scans, tmp / f"a_{tta}", args.folds, tta))
            if args.nnunet_out:
                rows.append(nnunet_row(args.nnunet_out, args.nnunet_venv, args.scans, tmp / f"n_{tta}", tta,
                                       args.nnunet_config))
        if large is not None:
            what = f"one {'x'.join(map(str, args.large))} volume at {'x'.join(map(str, args.large_spacing))} mm, no TTA"
            rows.append(autoseg_row(args.run_dir, large, tmp / "a_large", args.folds, False) | {"what": what})
            if args.nnunet_out:
                rows.append(nnunet_row(args.nnunet_out, args.nnunet_venv, large, tmp / "n_large", False,
                                       args.nnunet_config)
                            | {"what": what})
    print("| tool | prediction | s per case | peak MiB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['what']} | {r['s_per_case']:.2f} | {r['peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
