"""Fold-0 validation Dice after a fixed CPU training budget, per schedule; the figure issue 4 targets.

Usage: python benchmarks/bench_train_budget.py RUN_DIR [--minutes 30] [--schedules both zoom-out]
       [--results results.json]

RUN_DIR is a planned and preprocessed run (``autoseg plan`` + ``autoseg preprocess``). Each schedule trains
fold 0 in its own copy of the run (plan and fingerprint copied, ``preprocessed/`` linked) with
``autoseg train 0 --time-budget MINUTES``: ``both`` is zoom-in then zoom-out, ``zoom-out`` a single stage at
the zoom-out patch. Rows accumulate in the results JSON, so schedules can run one after another (each needs
the whole machine) and the table shows all of them. nnU-Net v2's figure for the same budget comes from
``../shared/bench/nnunet/run.sh DATASET MINUTES OUT`` (add it with --nnunet-dice). Run by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from _measure import run_measured


def run_schedule(run: Path, schedule: str, minutes: float) -> dict:
    copy = run.parent / f"{run.name}_bench_{schedule}"
    copy.mkdir(exist_ok=True)
    for name in ("plans.json", "fingerprint.json"):
        shutil.copyfile(run / name, copy / name)
    if not (copy / "preprocessed").exists():
        (copy / "preprocessed").symlink_to((run / "preprocessed").resolve())
    log = copy / "bench_train.log"
    with open(log, "w") as f:
        wall, peak, code = run_measured([sys.executable, "-m", "autoseg", "train", "0", "--run", str(copy), "--stage",
                                         schedule, "--time-budget", str(minutes), "--restart", "--no-progress"],
                                        stdout=f, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{schedule}: autoseg train exited {code}; see {log}")
    fold = copy / "fold_0"
    metrics = json.loads((fold / "validation" / "metrics.json").read_text())
    config = json.loads((fold / "config.json").read_text())
    ckpt = __import__("torch").load(fold / "checkpoint_final.pt", weights_only=True)
    h = ckpt["state"]["history"]
    steps = sum(s["epochs"] * s["iterations_per_epoch"] for s in config["stages"])
    train_s = sum(h["epoch_seconds"])
    return {"schedule": schedule, "minutes": minutes, "wall_s": round(wall, 1), "peak_mib": round(peak / 2**20),
            "steps": steps, "epochs": [s["epochs"] for s in config["stages"]],
            "step_s_measured": config["measured_step_seconds"],
            "data_wait_share": round(sum(w * s for w, s in zip(h["data_wait_share"], h["epoch_seconds"])) / train_s, 4),
            "dice": metrics["mean_per_class"], "mean_dice": round(metrics["mean_foreground_dice"], 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--schedules", nargs="+", default=["both", "zoom-out"], choices=["both", "zoom-out", "zoom-in"])
    ap.add_argument("--results", type=Path, default=Path("bench_train_budget.json"))
    ap.add_argument("--nnunet-dice", type=float, default=None, help="nnU-Net v2's fold-0 Dice for the same budget")
    args = ap.parse_args()
    rows = json.loads(args.results.read_text()) if args.results.is_file() else []
    for schedule in args.schedules:
        rows = [r for r in rows if r["schedule"] != schedule] + [run_schedule(args.run_dir, schedule, args.minutes)]
        args.results.write_text(json.dumps(rows, indent=1))
    print(f"{'schedule':<10} {'budget':>6} {'wall s':>7} {'steps':>6} {'epochs':>9} {'data wait':>9} "
          f"{'peak MiB':>8}  Dice per class               mean")
    for r in rows:
        per_class = " ".join(f"{k} {v:.4f}" for k, v in r["dice"].items())
        print(f"{r['schedule']:<10} {r['minutes']:>6g} {r['wall_s']:>7.0f} {r['steps']:>6} {str(r['epochs']):>9} "
              f"{100 * r['data_wait_share']:>8.1f}% {r['peak_mib']:>8}  {per_class}  {r['mean_dice']:.4f}")
    if args.nnunet_dice is not None:
        print(f"{'nnU-Net v2':<10} {args.minutes:>6g} {'':>7} {'':>6} {'':>9} {'':>9} {'':>8}  (run.sh) "
              f"{args.nnunet_dice:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
