"""Scaling out on processes: training steps per second and data waiting with 1 and 2 processes (DDP over gloo),
prediction scans per minute with 1 and 2 processes (``--gpus N --device cpu``), on a real dataset.

On a 2-core CPU the ratios say little about GPUs; they catch a broken pipeline (a second process that makes
things slower than it should, data loading that starves the step, ranks that predict the same scans twice).

Usage: python benchmarks/bench_scale.py [DATASET] [--out DIR] [--iterations 20] [--scans 24]
(DATASET defaults to ../shared/data/MSD_Task04_Hippocampus)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
AUTOSEG = [sys.executable, "-m", "autoseg"]


def sh(args: list[str]) -> float:
    """Run ``autoseg ARGS``; its wall seconds (raises on failure, with its error output)."""
    t0 = time.perf_counter()
    out = subprocess.run(AUTOSEG + args, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"autoseg {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def train_row(run: Path, processes: int, iterations: int) -> dict:
    """Two zoom-in epochs of fold 0; the second epoch's seconds per step (the first carries start-up) and its
    share of time waiting for data, from the checkpoint's history."""
    sh(["train", "0", "--run", str(run), "--stage", "zoom-in", "--epochs", "2", "--iterations-per-epoch",
        str(iterations), "--gpus", str(processes), "--device", "cpu", "--restart", "--no-progress"])
    history = torch.load(run / "fold_0" / "checkpoint_final.pt", weights_only=True)["state"]["history"]
    seconds = history["epoch_seconds"][-1]
    return {"steps_per_s": iterations / seconds, "data_wait": history["data_wait_share"][-1]}


def predict_row(run: Path, scans: Path, out: Path, processes: int) -> float:
    """Scans per minute of ``autoseg predict`` with mirroring, fold 0, from a cold start."""
    shutil.rmtree(out, ignore_errors=True)
    seconds = sh(["predict", "-i", str(scans), "-o", str(out), "--run", str(run), "--folds", "0", "--gpus",
                  str(processes), "--device", "cpu", "--no-progress"])
    return 60 * len(list(scans.iterdir())) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path, nargs="?", default=HERE.parents[1] / "shared" / "data" /
                    "MSD_Task04_Hippocampus",
                    help="dataset folder in MSD or nnU-Net layout (default ../shared/data/MSD_Task04_Hippocampus)")
    ap.add_argument("--out", type=Path, default=Path("bench_scale_out"),
                    help="work folder, kept and reused by a rerun (default ./bench_scale_out)")
    ap.add_argument("--iterations", type=int, default=20, help="steps per epoch (default 20)")
    ap.add_argument("--scans", type=int, default=24, help="scans to predict (default 24)")
    args = ap.parse_args()
    run = args.out / "run"
    if not (run / "preprocessed").is_dir():
        sh(["plan", str(args.dataset), "-o", str(run), "--device", "cpu", "--no-progress"])
        sh(["preprocess", str(run), "--no-progress"])
    train = {n: train_row(run, n, args.iterations) for n in (1, 2)}
    scans = args.out / "scans"
    if not scans.is_dir():
        scans.mkdir()
        for f in sorted((args.dataset / "imagesTr").glob("*.nii.gz"))[: args.scans]:
            (scans / f.name).symlink_to(f.resolve())
    predict = {n: predict_row(run, scans, args.out / f"pred_{n}", n) for n in (1, 2)}
    same = all((args.out / "pred_1" / p.name).read_bytes() == p.read_bytes()
               for p in (args.out / "pred_2").glob("*.nii.gz"))
    print(f"\n{'processes':>9} {'train steps/s':>14} {'data wait':>10} {'predict scans/min':>18}")
    for n in (1, 2):
        print(f"{n:>9} {train[n]['steps_per_s']:>14.2f} {train[n]['data_wait']:>10.1%} {predict[n]:>18.1f}")
    print(f"ratio 2/1: training {train[2]['steps_per_s'] / train[1]['steps_per_s']:.2f}, prediction "
          f"{predict[2] / predict[1]:.2f}; 2-process predictions identical to 1-process: {same}")


if __name__ == "__main__":
    main()
