"""autoseg beside nnU-Net v2 on real datasets, and autoseg alone on a generated big 4-channel set.

Usage:
    python benchmarks/bench_datasets.py DATASET [DATASET ...] --out DIR [--minutes 30] [--tools autoseg nnunet]
        [--config NAME] [--nnunet-config 3d_fullres|2d] [--nnunet-venv V]
    python benchmarks/bench_datasets.py --big --out DIR --minutes 6

Per dataset (MSD or nnU-Net v2 layout), in this order so that both tools validate the same cases:

- nnU-Net v2 (``../shared/bench/nnunet/run.sh DATASET MINUTES OUT``): plan + preprocess, fold 0 trained on the
  CPU for the budget, its own fold-0 validation. run.sh knows only ``3d_fullres``; ``--nnunet-config 2d``
  runs a copy of it with every ``3d_fullres`` replaced by ``2d`` (nnU-Net's own 2d configuration, same
  budget trainer), written to ``OUT/<dataset>/nnunet_2d/run.sh`` so the exact script stays beside its results;
- autoseg: ``plan`` (with ``--splits`` = nnU-Net's ``splits_final.json`` when nnU-Net ran first, so fold 0 is
  the same cases), ``preprocess``, ``train 0 --time-budget MINUTES`` (the plan's default configuration, or
  ``--config``), then ``predict`` of the fold-0 validation scans (with mirroring, as a user would).

Each figure is the wall time and the peak resident memory of the command and every process it starts
(sampled every 50 ms). Results go to ``OUT/<dataset>/<tool>.json`` and are reused on the next call (delete
one to redo it): each tool needs the whole machine, so they run one after the other, never together.

``--big`` generates a 4-channel 240x240x155 dataset at 1 mm with three nested classes (brain-tumour-like,
8 cases, ~560 MB of float32 per case) and runs autoseg's steps on it with the peak memory of each: the check
that big multi-channel volumes run end to end within this machine's RAM. Run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from _measure import run_measured

HERE = Path(__file__).resolve().parent
NNUNET = HERE.parent.parent / "shared" / "bench" / "nnunet" / "run.sh"


def _autoseg(args: list[str], log: Path) -> tuple[float, int]:
    with open(log, "a") as f:
        f.write(f"\n$ autoseg {' '.join(args)}\n")
        f.flush()
        wall, peak, code = run_measured([sys.executable, "-m", "autoseg", *args, "--no-progress"], stdout=f,
                                        stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"autoseg {args[0]} exited {code}; see {log}")
    return wall, peak


def _scans_of(dataset: Path, case_ids: list[str], folder: Path) -> int:
    """Link the images of ``case_ids`` into ``folder`` (nnU-Net or MSD naming); returns how many cases."""
    folder.mkdir(parents=True, exist_ok=True)
    for cid in case_ids:
        for img in sorted((dataset / "imagesTr").glob(f"{cid}*.nii.gz")):
            stem = img.name[:-len(".nii.gz")]
            if stem == cid or stem[len(cid):len(cid) + 1] == "_" and stem[len(cid) + 1:].isdigit():
                dst = folder / img.name
                if not dst.exists():
                    dst.symlink_to(img.resolve())
    return len(case_ids)


def train_and_predict(dataset: Path, run: Path, config: str | None, minutes: float, log: Path, scans: Path,
                      pred: Path, tta: bool = True) -> dict:
    """Train fold 0 of the planned and preprocessed ``run`` in ``config`` (None: the plan's default) with the time
    budget, then predict its validation scans (linked into ``scans``) into ``pred`` (mirrored unless not ``tta``):
    the figures this benchmark, ``bench_configs.py`` and ``bench_patch_free.py`` report, peak RSS of training
    and prediction included."""
    pick = ["--config", config] if config else []
    t_train, m_train = _autoseg(["train", "0", "--run", str(run), "--time-budget", f"{minutes:g}"] + pick, log)
    name = config or json.loads((run / "plans.json").read_text()).get("default_configuration", "3d")
    fold = run / "fold_0" if name == "3d" else run / name / "fold_0"
    cfg = json.loads((fold / "config.json").read_text())
    metrics = json.loads((fold / "validation" / "metrics.json").read_text())
    n = _scans_of(dataset, cfg["val_cases"], scans)
    shutil.rmtree(pred, ignore_errors=True)
    t_pred, m_pred = _autoseg(["predict", "-i", str(scans), "-o", str(pred), "--run", str(run)] + pick
                              + ([] if tta else ["--no-tta"]), log)
    hd95 = [v["hd95_mm"] for c in metrics["cases"].values() for v in c.values()]
    return {"configuration": name, "train_s": round(t_train, 1), "budget_s": minutes * 60,
            "steps": sum(s["epochs"] * s["iterations_per_epoch"] for s in cfg["stages"]),
            "val_cases": cfg["val_cases"], "dice": metrics["mean_per_class"],
            "mean_dice": metrics["mean_foreground_dice"], "hd95_mean_mm": float(np.mean(hd95)),
            "predict_s_per_case": round(t_pred / n, 2), "predict_mirrored": tta,
            "peak_rss_gib": {"train": round(m_train / 2**30, 2), "predict": round(m_pred / 2**30, 2)}}


def run_autoseg(dataset: Path, out: Path, minutes: float, config: str | None, splits: Path | None) -> dict:
    run, log = out / "autoseg_run", out / "autoseg.log"
    if run.exists():
        shutil.rmtree(run)
    plan = ["plan", str(dataset), "-o", str(run)] + (["--splits", str(splits)] if splits else [])
    t_plan, m_plan = _autoseg(plan, log)
    t_pre, m_pre = _autoseg(["preprocess", str(run)], log)
    r = train_and_predict(dataset, run, config, minutes, log, out / "autoseg_scans", out / "autoseg_pred")
    peaks = {"plan": round(m_plan / 2**30, 2), "preprocess": round(m_pre / 2**30, 2), **r["peak_rss_gib"]}
    return {"tool": "autoseg", **r, "plan_preprocess_s": round(t_plan + t_pre, 1), "peak_rss_gib": peaks}


def _nnunet_script(config: str, nn: Path) -> Path:
    """run.sh itself for 3d_fullres; for another configuration a copy of it that plans, trains and validates
    that configuration instead (the shim and the budget trainer are looked up beside the original)."""
    if config == "3d_fullres":
        return NNUNET
    nn.mkdir(parents=True, exist_ok=True)
    text = NNUNET.read_text().replace("3d_fullres", config)
    text = text.replace('here=$(cd "$(dirname "$0")" && pwd)', f'here={NNUNET.parent}')
    script = nn / "run.sh"
    script.write_text(text)
    return script


def run_nnunet(dataset: Path, out: Path, minutes: float, venv: Path, config: str) -> dict:
    tag = _nnunet_tag(config)
    nn = out / tag
    script = _nnunet_script(config, nn)
    with open(out / f"{tag}.log", "w") as f:
        wall, peak, code = run_measured(["bash", str(script), str(dataset), f"{minutes:g}", str(nn)],
                                        env={**os.environ, "NNUNET_VENV": str(venv)}, stdout=f,
                                        stderr=subprocess.STDOUT)
    lines = (out / f"{tag}.log").read_text().strip().splitlines()
    if code or not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"nnU-Net exited {code}; see {out / f'{tag}.log'}")
    return nnunet_result(nn, json.loads(lines[-1]), peak, config)


def _nnunet_tag(config: str) -> str:
    """Results of nnU-Net's default run.sh stay under ``nnunet``; other configurations under ``nnunet_<name>``."""
    return "nnunet" if config == "3d_fullres" else f"nnunet_{config}"


def nnunet_result(nn: Path, line: dict, peak: int | None, config: str = "3d_fullres") -> dict:
    """run.sh's JSON line plus per-class Dice, validation cases and steps from nnU-Net's own files."""
    summary = json.loads(next(nn.glob("res/*/*/fold_0/validation/summary.json")).read_text())
    labels = json.loads(next(nn.glob("pre/*/dataset.json")).read_text())["labels"]
    names = {str(v): k for k, v in labels.items()}
    splits = json.loads(next(nn.glob("pre/*/splits_final.json")).read_text())
    return {"tool": "nnU-Net v2", "configuration": config, "plan_preprocess_s": line["preprocess_s"],
            "train_s": line["train_s"], "steps": 50 * line["epochs_of_50_iterations"],
            "val_cases": sorted(splits[0]["val"]),
            "dice": {names[k]: v["Dice"] for k, v in summary["mean"].items()},
            "mean_dice": summary["foreground_mean"]["Dice"], "hd95_mean_mm": None,
            "predict_s_per_case": line["predict_s_per_case"],
            "peak_rss_gib": {"all": round(peak / 2**30, 2)} if peak else {}}


def make_big_dataset(root: Path, n_cases: int = 8) -> Path:
    """4 channels (T1, T1ce, T2, FLAIR-like), 155x240x240 at 1 mm, skull-stripped (zero outside a brain
    ellipsoid), three nested classes (1 inside 2 inside 3) of varying size and place."""
    import SimpleITK as sitk

    if (root / "dataset.json").is_file():
        return root
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:155, :240, :240]
    brain = ((z - 77) / 70.0) ** 2 + ((y - 120) / 100.0) ** 2 + ((x - 120) / 85.0) ** 2 < 1
    for i in range(n_cases):
        c = [int(rng.integers(50, 105)), int(rng.integers(80, 160)), int(rng.integers(80, 160))]
        r = float(rng.uniform(14, 26))
        d = np.sqrt(((z - c[0]) / r) ** 2 + ((y - c[1]) / (1.2 * r)) ** 2 + ((x - c[2]) / r) ** 2)
        seg = np.zeros((155, 240, 240), np.uint8)
        seg[(d < 1.0) & brain], seg[(d < 0.6) & brain], seg[(d < 0.3) & brain] = 3, 2, 1
        for ch, (base, gain) in enumerate([(300, 60), (320, 150), (500, -80), (400, 200)]):
            img = np.where(brain, base + rng.normal(0, 25, brain.shape), 0).astype(np.float32)
            img += gain * (seg > 0) + 0.5 * gain * (seg == 1)
            img[~brain] = 0
            im = sitk.GetImageFromArray(img)
            sitk.WriteImage(im, str(root / "imagesTr" / f"brain_{i:03d}_{ch:04d}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(seg), str(root / "labelsTr" / f"brain_{i:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "name": "big4ch", "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
        "labels": {"background": 0, "core": 1, "enhancing": 2, "edema": 3}, "numTraining": n_cases,
        "file_ending": ".nii.gz"}))
    return root


def run_big(out: Path, minutes: float) -> dict:
    data = make_big_dataset(out / "big4ch_data")
    res = run_autoseg(data, out, minutes, None, None)
    res["dataset"] = "generated 4-channel 155x240x240"
    return res


def _row(name: str, r: dict) -> str:
    dice = "  ".join(f"{k} {v:.3f}" for k, v in r["dice"].items())
    hd = f"{r['hd95_mean_mm']:.1f}" if r.get("hd95_mean_mm") is not None else "-"
    pred = f"{r['predict_s_per_case']:.1f}" if r.get("predict_s_per_case") is not None else "-"
    rss = ", ".join(f"{k} {v:.1f}" for k, v in r.get("peak_rss_gib", {}).items())
    return (f"| {name} | {r['tool']} ({r['configuration']}) | {r['plan_preprocess_s']:.0f} | {r['train_s']:.0f} | "
            f"{r['steps']} | {dice} | **{r['mean_dice']:.3f}** | {hd} | {pred} | {rss} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", type=Path, nargs="*", metavar="DATASET",
                    help="dataset folders in MSD or nnU-Net layout (none with --big)")
    ap.add_argument("--out", type=Path, required=True, metavar="DIR", help="results and runs (kept)")
    ap.add_argument("--minutes", type=float, default=30.0, help="training budget per tool (default 30)")
    ap.add_argument("--tools", nargs="+", choices=("nnunet", "autoseg"), default=["nnunet", "autoseg"],
                    help="tools to run on each dataset, one after the other (default both)")
    ap.add_argument("--config", default=None, help="autoseg configuration (default: the plan's default)")
    ap.add_argument("--nnunet-config", default="3d_fullres", choices=("3d_fullres", "2d"),
                    help="nnU-Net configuration to train (default 3d_fullres, run.sh's own)")
    ap.add_argument("--nnunet-venv", type=Path, default=Path(".venv-nnunet"), help="venv with nnunetv2")
    ap.add_argument("--big", action="store_true", help="the generated 4-channel 240x240x155 set, autoseg only")
    args = ap.parse_args()
    rows = []
    if args.big:
        out = args.out / "big4ch"
        out.mkdir(parents=True, exist_ok=True)
        path = out / "autoseg.json"
        if not path.is_file():
            path.write_text(json.dumps(run_big(out, args.minutes), indent=1))
        rows.append(_row("big 4-channel", json.loads(path.read_text())))
    for ds in args.datasets:
        out = args.out / ds.name
        out.mkdir(parents=True, exist_ok=True)
        nn_tag = _nnunet_tag(args.nnunet_config)
        for tool in ("nnunet", "autoseg"):  # nnU-Net first: its splits become autoseg's folds
            path = out / f"{nn_tag if tool == 'nnunet' else tool}.json"
            if tool in args.tools and not path.is_file():
                if tool == "nnunet":
                    r = run_nnunet(ds.resolve(), out, args.minutes, args.nnunet_venv.resolve(), args.nnunet_config)
                else:
                    splits = next(out.glob("nnunet*/pre/*/splits_final.json"), None)
                    r = run_autoseg(ds.resolve(), out, args.minutes, args.config, splits)
                path.write_text(json.dumps(r, indent=1))
            if path.is_file():
                rows.append(_row(ds.name, json.loads(path.read_text())))
    print("| dataset | tool | plan+preprocess s | train s | steps | fold-0 Dice per class | mean | HD95 mm | "
          "predict s/case | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
