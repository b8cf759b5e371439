"""Fold-0 validation Dice after a fixed CPU training budget, per schedule, plan variant and seed.

Usage: python benchmarks/bench_train_budget.py RUN_DIR [--minutes 30 | --epochs N] [--schedules both zoom-out]
       [--variants plan adam] [--seeds 2024 7] [--results results.json]

RUN_DIR is a planned and preprocessed run (``autoseg plan`` + ``autoseg preprocess``). Each schedule trains
fold 0 in its own copy of the run (plan and fingerprint copied, ``preprocessed/`` linked) with
``autoseg train 0 --time-budget MINUTES`` (or ``--epochs N``, the same steps whatever the step times):
``both`` is zoom-in then zoom-out, ``zoom-out`` a single stage at
the zoom-out patch. A variant edits the copied plan (``VARIANTS``: ``plan`` is the plan as written,
``adam`` Adam at 3e-3 for the zoom-in stage and 3e-4 for the zoom-out stage, ``cosine`` and ``onecycle``
the seeds' learning-rate schedules in place of poly, ``oversample50`` half the patches centred on foreground
instead of a third, ``torchaug`` the augmentation in the training process in torch (what plans have done since
2026-11-29), ``workeraug`` batchgenerators in the data workers (before), ``nods`` the loss of the
full-resolution output alone instead of deep supervision's weighted sum, ``batch4`` four patches per step
instead of the plan's batch in every stage, ``wide`` twice the planned features at every level); a seed replaces
``training.seed`` (network initialisation, sampling and augmentation). Rows accumulate in the results
JSON, so schedules can run one after another (each needs
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

#: plan edits per variant: stage fields for every stage of every configuration (a learning rate is scaled by the
#: stage's share of the first stage's, so the zoom-out stage keeps its lower rate)
VARIANTS: dict[str, dict] = {
    "plan": {},
    "sgd": {"optimizer": "sgd", "learning_rate": 1e-2},
    "adam": {"optimizer": "adam", "learning_rate": 3e-3},
    "adam1e-3": {"optimizer": "adam", "learning_rate": 1e-3},
    "cosine": {"scheduler": "cosine_restarts"},
    "onecycle": {"scheduler": "onecycle"},
    "oversample50": {"training": {"oversample_foreground": 0.5}},
    "torchaug": {"augmentation": {"on_device": True}},
    "workeraug": {"augmentation": {"on_device": False}},
    "nods": {"full_resolution_loss_only": True},
    "batch4": {"batch_size": 4},
    "wide": {"feature_factor": 2},
}


def edit_plan(path: Path, variant: str, seed: int | None) -> None:
    plan = json.loads(path.read_text())
    edits = dict(VARIANTS[variant])
    plan["training"].update(edits.pop("training", {}))
    if edits.pop("full_resolution_loss_only", False):  # deep supervision off: the full-resolution output's loss alone
        # every configuration holds its own weights (one per decoder output of its network)
        for t in [plan["training"]] + plan.get("other_configurations", []):
            t["deep_supervision_weights"] = [1.0] + [0.0] * (len(t["deep_supervision_weights"]) - 1)
    factor = edits.pop("feature_factor", 1)  # every configuration's network, every level's features
    for net in [plan["network"]] + [c["network"] for c in plan.get("other_configurations", [])]:
        net["features"] = [f * factor for f in net["features"]]
    aug = edits.pop("augmentation", {})
    for a in [plan["training"]["augmentation"]] + [c["augmentation"] for c in plan.get("other_configurations", [])]:
        a.update(aug)
    for stages in [plan["stages"]] + [c["stages"] for c in plan.get("other_configurations", [])]:
        first_lr = stages[0]["learning_rate"]
        for stage in stages:
            share = stage["learning_rate"] / first_lr
            stage.update(edits)
            if "learning_rate" in edits:
                stage["learning_rate"] = edits["learning_rate"] * share
    if seed is not None:
        plan["training"]["seed"] = seed
    path.write_text(json.dumps(plan, indent=1))


def run_schedule(run: Path, schedule: str, minutes: float | None, variant: str = "plan", seed: int | None = None,
                 epochs: int | None = None) -> dict:
    copy = run.parent / (f"{run.name}_bench_{schedule}_{variant}_{seed}" + (f"_e{epochs}" if epochs else ""))
    copy.mkdir(exist_ok=True)
    for name in ("plans.json", "fingerprint.json"):
        shutil.copyfile(run / name, copy / name)
    edit_plan(copy / "plans.json", variant, seed)
    if not (copy / "preprocessed").exists():
        (copy / "preprocessed").symlink_to((run / "preprocessed").resolve())
    log = copy / "bench_train.log"
    with open(log, "w") as f:
        length = ["--epochs", str(epochs)] if epochs else ["--time-budget", str(minutes)]
        wall, peak, code = run_measured([sys.executable, "-m", "autoseg", "train", "0", "--run", str(copy), "--stage",
                                         schedule, *length, "--restart", "--no-progress"],
                                        stdout=f, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{schedule}: autoseg train exited {code}; see {log}")
    fold = next(p for p in (copy / "fold_0", *copy.glob("*/fold_0")) if (p / "config.json").is_file())
    metrics = json.loads((fold / "validation" / "metrics.json").read_text())
    config = json.loads((fold / "config.json").read_text())
    ckpt = __import__("torch").load(fold / "checkpoint_final.pt", weights_only=True)
    h = ckpt["state"]["history"]
    steps = sum(s["epochs"] * s["iterations_per_epoch"] for s in config["stages"])
    train_s = sum(h["epoch_seconds"])
    return {"schedule": schedule, "variant": variant, "seed": seed, "minutes": minutes if not epochs else None,
            "fixed_epochs": epochs, "wall_s": round(wall, 1),
            "peak_mib": round(peak / 2**20),
            "steps": steps, "epochs": [s["epochs"] for s in config["stages"]],
            "step_s_measured": config.get("measured_step_seconds"),
            "data_wait_share": round(sum(w * s for w, s in zip(h["data_wait_share"], h["epoch_seconds"])) / train_s, 4),
            "dice": metrics["mean_per_class"], "mean_dice": round(metrics["mean_foreground_dice"], 4)}


def _key(row: dict) -> tuple:
    return row["schedule"], row.get("variant", "plan"), row.get("seed"), row["minutes"], row.get("fixed_epochs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="a planned and preprocessed run; the copies go beside it")
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="training budget per run, final validation included (default 30)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="train N epochs of the first stage (autoseg train --epochs) instead of a time budget: the "
                         "same steps for every variant, so that only the variant and the seed differ")
    ap.add_argument("--schedules", nargs="+", default=["both", "zoom-out"], choices=["both", "zoom-out", "zoom-in"],
                    help="stages trained: both (zoom-in then zoom-out) or one stage alone (default both zoom-out)")
    ap.add_argument("--variants", nargs="+", default=["plan"], choices=sorted(VARIANTS),
                    help="plan edits to compare (see above; default plan)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[None], help="training seeds (default: the plan's)")
    ap.add_argument("--results", type=Path, default=Path("bench_train_budget.json"),
                    help="results JSON, read first and rewritten after each run (default ./bench_train_budget.json)")
    ap.add_argument("--nnunet-dice", type=float, default=None, help="nnU-Net v2's fold-0 Dice for the same budget")
    args = ap.parse_args()
    rows = json.loads(args.results.read_text()) if args.results.is_file() else []
    for seed in args.seeds:
        for variant in args.variants:
            for schedule in args.schedules:
                minutes = None if args.epochs else args.minutes
                key = (schedule, variant, seed, minutes, args.epochs)
                rows = [r for r in rows if _key(r) != key] + [
                    run_schedule(args.run_dir, schedule, minutes, variant, seed, args.epochs)]
                args.results.write_text(json.dumps(rows, indent=1))
    print(f"{'schedule':<10} {'variant':<9} {'seed':>5} {'budget':>6} {'wall s':>7} {'steps':>6} {'epochs':>9} "
          f"{'data wait':>9} {'peak MiB':>8}  Dice per class               mean")
    for r in rows:
        per_class = " ".join(f"{k} {v:.4f}" for k, v in r["dice"].items())
        budget = f"{r['minutes']:g}" if r["minutes"] is not None else f"{r['fixed_epochs']}ep"
        print(f"{r['schedule']:<10} {r.get('variant', 'plan'):<9} {str(r.get('seed')):>5} {budget:>6} "
              f"{r['wall_s']:>7.0f} {r['steps']:>6} {str(r['epochs']):>9} "
              f"{100 * r['data_wait_share']:>8.1f}% {r['peak_mib']:>8}  {per_class}  {r['mean_dice']:.4f}")
    if args.nnunet_dice is not None:
        print(f"{'nnU-Net v2':<10} {'':<9} {'':>5} {args.minutes:>6g} {'':>7} {'':>6} {'':>9} {'':>9} {'':>8}  "
              f"(run.sh) {args.nnunet_dice:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
