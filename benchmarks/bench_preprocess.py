"""autoseg plan + preprocess against nnU-Net v2's plan_and_preprocess, on the same data in the same run.

Usage: python benchmarks/bench_preprocess.py [DATASET_DIR] [--nnunet-venv PATH] [--workers N]
Default dataset ../shared/data/MSD_Task04_Hippocampus (200 cases); nnU-Net from ../shared/bench/nnunet/run.sh
with budget 0 (plan and preprocess only; its wall time is the preprocess_s it prints). Peak memory is the
sampled sum of RSS over each tool's whole process tree. Target: autoseg at most half of nnU-Net's wall time,
with no more peak memory. Prints a table; run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _measure import run_measured

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def autoseg_row(dataset: Path, tmp: Path, workers: int | None) -> dict:
    run = tmp / "autoseg_run"
    j = ["-j", str(workers)] if workers else []
    plan = run_measured([sys.executable, "-m", "autoseg", "plan", str(dataset), "-o", str(run), "--no-progress",
                         *j])
    pre = run_measured([sys.executable, "-m", "autoseg", "preprocess", str(run), "--no-progress", *j])
    n = len(list((run / "preprocessed").glob("*.json")))
    return {"tool": "autoseg", "wall_s": plan[0] + pre[0], "plan_s": plan[0], "preprocess_s": pre[0],
            "peak_mib": max(plan[1], pre[1]) / 2**20, "cases": n, "ok": plan[2] == 0 and pre[2] == 0}


def nnunet_row(dataset: Path, tmp: Path, venv: Path) -> dict | None:
    script = SHARED / "bench" / "nnunet" / "run.sh"
    if not (venv / "bin" / "nnUNetv2_plan_and_preprocess").exists() or not script.exists():
        return None
    out = tmp / "nnunet"
    log = tmp / "nnunet_stdout.txt"
    env = dict(os.environ, NNUNET_VENV=str(venv))
    with open(log, "w") as f:
        wall, peak, code = run_measured(["bash", str(script), str(dataset), "0", str(out)], env=env, stdout=f)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    n = len(list(out.glob("pre/Dataset*/nnUNetPlans_3d_fullres/*.pkl")))
    return {"tool": "nnU-Net v2", "wall_s": result.get("preprocess_s", float("nan")), "plan_s": float("nan"),
            "preprocess_s": float("nan"), "peak_mib": peak / 2**20, "cases": n, "ok": code == 0,
            "script_wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", nargs="?", type=Path, default=SHARED / "data" / "MSD_Task04_Hippocampus",
                    help="dataset folder in MSD or nnU-Net layout (default ../shared/data/MSD_Task04_Hippocampus)")
    ap.add_argument("--nnunet-venv", type=Path, default=REPO.parent / ".venv-nnunet",
                    help="venv with nnunetv2 installed (see ../shared/bench/README.md)")
    ap.add_argument("--workers", type=int, default=None, help="autoseg -j (default: automatic)")
    args = ap.parse_args()
    dataset = args.dataset.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [autoseg_row(dataset, Path(tmp), args.workers)]
        nn = nnunet_row(dataset, Path(tmp), args.nnunet_venv.resolve())
    print(f"dataset: {dataset}  cores: {os.cpu_count()}")
    print("| tool       | plan+preprocess s | of which plan s | preprocess s | cases/s | peak tree RSS MiB | cases |")
    print("|------------|-------------------|-----------------|--------------|---------|-------------------|-------|")
    for r in rows + ([nn] if nn else []):
        print(f"| {r['tool']:<10} | {r['wall_s']:17.2f} | {r['plan_s']:15.2f} | {r['preprocess_s']:12.2f} | "
              f"{r['cases'] / r['wall_s']:7.1f} | {r['peak_mib']:17.0f} | {r['cases']:5d} |")
    if nn is None:
        print("nnU-Net v2: not run (no venv at --nnunet-venv; see ../shared/bench/README.md)")
        return 0
    a = rows[0]
    print(f"autoseg / nnU-Net wall time: {a['wall_s'] / nn['wall_s']:.2f} (target <= 0.5); "
          f"peak memory: {a['peak_mib'] / nn['peak_mib']:.2f} (target <= 1.0)")
    print("(nnU-Net's wall time is the preprocess_s its run.sh prints: plan + preprocess, without its MSD "
          "conversion; its peak memory is sampled over the whole run.sh including the conversion)")
    return 0 if a["ok"] and nn["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
