"""Seed 002's comparison on our data: every configuration of one plan trained with the same CPU budget on fold 0.

Usage:
    python benchmarks/bench_configs.py DATASET [DATASET ...] --out DIR [--minutes 30]
        [--configs 3d,2d,segresnet,attention_unet,unetr] [--splits FILE]

Per dataset: one ``autoseg plan --configs ...`` and one ``preprocess`` (shared by every configuration), then per
configuration ``train 0 --config NAME --time-budget MINUTES``, ``predict`` of the fold-0 validation scans (with
mirroring, as a user would), and at the end ``find-best`` over all of them. Printed per configuration: Dice per
class and mean, HD95, steps trained, seconds per step, peak RSS of training and prediction, prediction seconds
per case; then find-best's table (pairs included). Results go to ``OUT/<dataset>/<config>.json`` and are reused
(delete one to redo it); each run needs the whole machine, so they run one after the other. Run by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench_datasets import _autoseg, train_and_predict

ALL = "3d,2d,segresnet,attention_unet,unetr"


def plan_once(dataset: Path, out: Path, configs: str, splits: Path | None) -> Path:
    run, log = out / "run", out / "autoseg.log"
    if not (run / "preprocessed").is_dir():
        shutil.rmtree(run, ignore_errors=True)
        _autoseg(["plan", str(dataset), "-o", str(run), "--configs", configs]
                 + (["--splits", str(splits)] if splits else []), log)
        _autoseg(["preprocess", str(run)], log)
    return run


def run_config(dataset: Path, run: Path, out: Path, name: str, minutes: float, tta: bool = True) -> dict:
    shutil.rmtree((run if name == "3d" else run / name) / "fold_0", ignore_errors=True)
    r = train_and_predict(dataset, run, name, minutes, out / f"{name}.log", out / "scans", out / f"pred_{name}",
                          tta)
    return {**r, "s_per_step": round(r["train_s"] / max(r["steps"], 1), 3)}


#: the header of the per-configuration table (:func:`config_row`); bench_patch_free.py prints the same table
TABLE_HEAD = ("| dataset | configuration | steps | s/step | fold-0 Dice per class | mean | HD95 mm | predict s/case | "
              "peak RSS GiB train / predict |\n|---|---|---|---|---|---|---|---|---|")


def config_row(ds: str, r: dict) -> str:
    """One configuration's row of :data:`TABLE_HEAD` (prediction marked when it was not mirrored)."""
    dice = "  ".join(f"{k} {v:.3f}" for k, v in r["dice"].items())
    mirrored = "" if r.get("predict_mirrored", True) else " (no mirroring)"
    return (f"| {ds} | {r['configuration']} | {r['steps']} | {r['s_per_step']:.2f} | {dice} | **{r['mean_dice']:.3f}** "
            f"| {r['hd95_mean_mm']:.1f} | {r['predict_s_per_case']:.1f}{mirrored} | {r['peak_rss_gib']['train']:.1f} / "
            f"{r['peak_rss_gib']['predict']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", type=Path, nargs="+", metavar="DATASET",
                    help="dataset folders in MSD or nnU-Net layout, each planned once for every configuration")
    ap.add_argument("--out", type=Path, required=True, metavar="DIR", help="results and runs (kept)")
    ap.add_argument("--minutes", type=float, default=30.0, help="training budget per configuration (default 30)")
    ap.add_argument("--configs", default=ALL, help=f"configurations to plan and train (default {ALL})")
    ap.add_argument("--splits", type=Path, default=None, metavar="FILE",
                    help="folds from this splits_final.json (e.g. nnU-Net's, to validate on its cases)")
    args = ap.parse_args()
    rows, tables = [], []
    for ds in args.datasets:
        out = args.out / ds.name
        out.mkdir(parents=True, exist_ok=True)
        run = plan_once(ds.resolve(), out, args.configs, args.splits)
        for name in args.configs.split(","):
            path = out / f"{name}.json"
            if not path.is_file():
                path.write_text(json.dumps(run_config(ds.resolve(), run, out, name, args.minutes), indent=1))
            rows.append(config_row(ds.name, json.loads(path.read_text())))
        fb = subprocess.run([sys.executable, "-m", "autoseg", "find-best", "--run", str(run), "--no-progress"],
                            capture_output=True, text=True)
        tables.append(f"{ds.name}:\n{fb.stdout or fb.stderr}")
    print(TABLE_HEAD)
    print("\n".join(rows))
    print("\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
