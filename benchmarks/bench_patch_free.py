"""Patch-free against our sliding-window 3D configuration, same CPU budget, same run, on CHAOS and on a
generated 4-channel 240x240x155 brain-tumour-like set.

Usage:
    python benchmarks/bench_patch_free.py --out DIR [--minutes 30] [--datasets chaos,big] [--chaos PATH]

Per dataset: one ``autoseg plan --configs 3d,patch_free`` and one ``preprocess``, then per configuration
``train 0 --config NAME --time-budget MINUTES`` (validation included) and ``predict`` of the fold-0 validation
scans with mirroring (``bench_configs.run_config``). Printed: Dice per class and mean, HD95, steps, seconds per
step, prediction seconds per case and peak RSS of each; the prediction speed-up and Dice difference of
patch-free; patch-free's prediction in one pass per scan against sliding its training region (the same trained
folds, ``whole_volume_prediction`` off in a copy of the plan); and, from the cost model alone, the plan both
configurations would get on a 24 GiB GPU. Results go to ``OUT/<dataset>/<config>.json`` and are reused
(delete one to redo it). Run by hand, on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench_configs import TABLE_HEAD, config_row, plan_once, run_config
from bench_datasets import _autoseg, make_big_dataset

from autoseg.device import DeviceInfo
from autoseg.fingerprint import load_fingerprint
from autoseg.planning import make_plan
from autoseg.plans import select_configuration

HERE = Path(__file__).resolve().parent
CHAOS = HERE.parent.parent / "shared" / "data" / "CHAOS_T2_Abdomen"
CONFIGS = ("3d", "patch_free")


def gpu_plan_rows(run: Path, name: str, gib: float = 24.0) -> list[str]:
    """Both configurations' zoom-out patch, batch and estimated memory on a ``gib`` GPU (cost model only)."""
    fp = load_fingerprint(run / "fingerprint.json")
    plan = make_plan(fp, DeviceInfo("cuda", f"{gib:g} GiB GPU (cost model)", 8, 64.0, gib, gib, "--gpu-memory"),
                     configurations=list(CONFIGS))
    rows = []
    for c in CONFIGS:
        p = select_configuration(plan, c)
        st = p.stages[-1]
        low = "x".join(str(e // f) for e, f in zip(st.patch_size, p.network.upsample_factor))
        rows.append(f"| {name} | {c} | {'x'.join(map(str, st.patch_size))} | {low if c == 'patch_free' else '-'} | "
                    f"{100 * st.share_of_median_volume:.0f}% | {st.batch_size} | {st.estimated_memory_gib:.1f} |")
    return rows


def _evaluate(pred: Path, labels: Path, refs: Path) -> float:
    """Mean foreground Dice of the label maps in ``pred`` (``autoseg evaluate`` against their references in
    ``labels``, linked into ``refs``: evaluate wants a prediction for every reference it is given)."""
    refs.mkdir(exist_ok=True)
    for f in pred.glob("*.nii.gz"):
        if not (refs / f.name).exists():
            (refs / f.name).symlink_to((labels / f.name).resolve())
    subprocess.run([sys.executable, "-m", "autoseg", "evaluate", str(pred), str(refs)], check=True,
                   capture_output=True)
    return float(json.loads((pred / "metrics.json").read_text())["mean"]["dice"])


def tiled_prediction(data: Path, run: Path, out: Path) -> dict:
    """The trained patch-free folds predicting the same scans by sliding their training region instead of one
    pass per scan (a copy of the plan with ``whole_volume_prediction`` off; mirrored as the one-pass prediction
    was): seconds per case and mean Dice of both ways, from ``autoseg evaluate`` on the written label maps."""
    tiles = out / "run_tiles"
    tiles.mkdir(exist_ok=True)
    plans = json.loads((run / "plans.json").read_text())
    for c in plans["other_configurations"]:
        if c["name"] == "patch_free":
            c["network"]["whole_volume_prediction"] = False
    (tiles / "plans.json").write_text(json.dumps(plans))
    if not (tiles / "patch_free").exists():
        (tiles / "patch_free").symlink_to((run / "patch_free").resolve())
    pred = out / "pred_patch_free_tiles"
    shutil.rmtree(pred, ignore_errors=True)
    n = len(list((out / "scans").glob("*_0000.nii.gz")))
    mirrored = json.loads((out / "patch_free.json").read_text()).get("predict_mirrored", True)
    t, _ = _autoseg(["predict", "-i", str(out / "scans"), "-o", str(pred), "--run", str(tiles), "--config",
                     "patch_free"] + ([] if mirrored else ["--no-tta"]), out / "tiles.log")
    refs = out / "references"
    return {"tiles_s_per_case": round(t / n, 2), "tiles_mean_dice": _evaluate(pred, data / "labelsTr", refs),
            "whole_mean_dice": _evaluate(out / "pred_patch_free", data / "labelsTr", refs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, metavar="DIR", help="results and runs (kept)")
    ap.add_argument("--minutes", type=float, default=30.0, help="training budget per configuration (default 30)")
    ap.add_argument("--datasets", default="chaos,big", help="chaos, big or both (default chaos,big)")
    ap.add_argument("--chaos", type=Path, default=CHAOS, help=f"the CHAOS T2 dataset (default {CHAOS})")
    ap.add_argument("--no-tta", action="store_true",
                    help="predict without mirroring (both configurations alike; on this CPU the 3d configuration's "
                    "mirrored prediction of one big scan takes tens of minutes)")
    args = ap.parse_args()
    rows, gpu, ratios = [], [], []
    for key in args.datasets.split(","):
        if key not in ("chaos", "big"):
            raise SystemExit(f"--datasets: unknown {key!r}; known: chaos, big")
        out = args.out / key
        out.mkdir(parents=True, exist_ok=True)
        data = args.chaos.resolve() if key == "chaos" else make_big_dataset(out / "data")
        run = plan_once(data, out, ",".join(CONFIGS), None)
        res = {}
        for name in CONFIGS:
            path = out / f"{name}.json"
            if not path.is_file():
                path.write_text(json.dumps(run_config(data, run, out, name, args.minutes, not args.no_tta),
                                           indent=1))
            res[name] = json.loads(path.read_text())
            rows.append(config_row(key, res[name]))
        a, b = res["3d"], res["patch_free"]
        tiled_path = out / "patch_free_tiles.json"
        if not tiled_path.is_file():
            tiled_path.write_text(json.dumps(tiled_prediction(data, run, out), indent=1))
        t = json.loads(tiled_path.read_text())
        ratios.append(f"{key}: patch-free predicting whole scans in one pass: {b['predict_s_per_case']:.1f} s per "
                      f"case, mean Dice {t['whole_mean_dice']:.3f} (autoseg evaluate); sliding its training region: "
                      f"{t['tiles_s_per_case']:.1f} s, {t['tiles_mean_dice']:.3f}")
        ratios.append(f"{key}: patch-free predicts {a['predict_s_per_case'] / b['predict_s_per_case']:.1f}x faster "
                      f"({b['predict_s_per_case']:.1f} vs {a['predict_s_per_case']:.1f} s per case); mean Dice "
                      f"{b['mean_dice'] - a['mean_dice']:+.3f} ({b['mean_dice']:.3f} vs {a['mean_dice']:.3f})")
        gpu += gpu_plan_rows(run, key)
    print(f"CPU, {args.minutes:g}-minute training budget per configuration, fold 0"
          + (", prediction without mirroring" if args.no_tta else "") + ":\n")
    print(TABLE_HEAD)
    print("\n".join(rows))
    print("\n" + "\n".join(ratios))
    print("\nOn a 24 GiB GPU (the planner's cost model, not run):\n")
    print("| dataset | configuration | zoom-out region | network input | share of median volume | batch | est. GiB |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(gpu))


if __name__ == "__main__":
    main()
