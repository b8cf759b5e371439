"""Time ``autoseg plan`` on a real dataset: wall seconds and peak memory of the whole process tree.

Usage: python benchmarks/bench_plan.py [DATASET_DIR] [--repeat N]
Default dataset: ../shared/data/MSD_Task04_Hippocampus. Target: 200 Hippocampus cases in well under 20 s
on a 2-core machine. Prints a table; run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _measure import run_measured

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared" / "data" / "MSD_Task04_Hippocampus"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", nargs="?", type=Path, default=DEFAULT,
                    help="dataset folder in MSD or nnU-Net layout (default ../shared/data/MSD_Task04_Hippocampus)")
    ap.add_argument("--repeat", type=int, default=3, help="fresh (uncached) runs to time (default 3)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            run = Path(tmp) / f"run{i}"
            cmd = [sys.executable, "-m", "autoseg", "plan", str(args.dataset), "-o", str(run), "--no-progress"]
            rows.append(("plan (fresh)",) + run_measured(cmd))
        cached = [sys.executable, "-m", "autoseg", "plan", str(args.dataset), "-o", str(Path(tmp) / "run0"),
                  "--no-progress"]
        rows.append(("plan (fingerprint reused)",) + run_measured(cached))
    print(f"dataset: {args.dataset}  cores: {os.cpu_count()}")
    print(f"| {'run':<26} | {'wall s':>7} | {'peak tree RSS MiB':>17} | exit |")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 19}|------|")
    for name, wall, peak, code in rows:
        print(f"| {name:<26} | {wall:7.2f} | {peak / 2**20:17.0f} | {code:4d} |")
    fresh = sorted(r[1] for r in rows if r[0] == "plan (fresh)")
    print(f"median fresh plan: {fresh[len(fresh) // 2]:.2f} s (target: well under 20 s for 200 cases on 2 cores)")
    return 0 if all(r[3] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
