"""The ``autoseg`` command: parse arguments, call the library, report. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from autoseg import __version__
from autoseg.defaults import MIRRORING_MIN_GAIN, TILES_MIN_GAIN

__all__ = ["main", "build_parser"]

log = logging.getLogger("autoseg")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                   help="worker processes (default: from CPU cores and free RAM)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are off anyway without a TTY)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="autoseg", description="Self-configuring 3D medical image segmentation. Steps: verify -> plan -> "
        "preprocess -> train -> predict.")
    parser.add_argument("--version", action="version", version=f"autoseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    v = sub.add_parser("verify", help="check every case of a dataset and report all problems",
                       description="Check that every case exists and opens; that channels and label agree in "
                       "shape, spacing, origin and direction; that labels are declared integers; that images are "
                       "finite. Prints one line per problem and exits 1 if there is any. Writes nothing.")
    v.add_argument("dataset_dir", type=Path, metavar="DATASET_DIR",
                   help="folder with dataset.json, imagesTr/ and labelsTr/ (MSD or nnU-Net v2 layout)")
    _add_common(v)

    p = sub.add_parser("plan", help="verify, fingerprint and plan a dataset",
                       description="Verify every case, fingerprint the dataset (reused when unchanged) and "
                       "write RUN_DIR/fingerprint.json and RUN_DIR/plans.json, then print a summary.")
    p.add_argument("dataset_dir", type=Path, metavar="DATASET_DIR",
                   help="folder with dataset.json, imagesTr/ and labelsTr/ (MSD or nnU-Net v2 layout); only read")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="RUN_DIR",
                   help="run directory to write (default: ./autoseg_runs/<dataset name>); must not be inside "
                   "DATASET_DIR")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="plan for a CUDA GPU with this much memory in GiB, instead of the detected device")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="device to plan for (default auto: CUDA if visible, else CPU)")
    p.add_argument("--folds", type=int, default=5, metavar="K", help="cross-validation folds (default 5)")
    p.add_argument("--bias-correction", action="store_true",
                   help="N4 bias-field correction of every MRI (z-scored) channel before normalisation, in "
                   "preprocessing and prediction alike (SimpleITK; fitted on a ~4 mm copy; adds a few seconds per "
                   "case). Off by default: see docs/preprocessing.md for its cost and effect")
    p.add_argument("--splits", type=Path, default=None, metavar="FILE",
                   help="take the cross-validation folds from FILE, a JSON list of {\"train\": [ids], \"val\": "
                   "[ids]} such as nnU-Net's splits_final.json (to compare with it on the same cases), instead of "
                   "--folds")
    p.add_argument("--configs", default=None, metavar="NAMES",
                   help="comma-separated configurations to plan, from 3d (our residual U-Net on 3D patches, always "
                   "planned), 2d (the same on slices), segresnet, attention_unet, unetr (MONAI's networks), "
                   "patch_free (a low-resolution view of a large region, segmented at full resolution), or 'all'. "
                   "Default: those worth training on the device (CPU: 3d,2d; GPU: also segresnet and "
                   "attention_unet; either: patch_free when the 3d patch covers under 25%% of the median volume); "
                   "the plan says why each is in or out. Train each with autoseg train --config")
    p.add_argument("--refingerprint", action="store_true", help="recompute the fingerprint even if unchanged")
    p.add_argument("--dice-weights", choices=("equal", "size-rank"), default=None,
                   help="Dice loss weight per foreground class, for every configuration: equal (nnU-Net's), or "
                   "size-rank (seed 001: the rarer the class over the dataset, the larger its weight). Default: "
                   "equal, except size-rank for patch_free, whose low-resolution network otherwise learns the "
                   "smallest class late or not at all (docs/planning.md)")
    _add_common(p)

    pp = sub.add_parser("preprocess", help="crop, normalise and resample every case of a planned run",
                        description="Turn every training case of RUN_DIR into arrays at the planned spacing, "
                        "normalised as planned, in RUN_DIR/preprocessed/ (blosc2 arrays + a properties JSON "
                        "per case that undoes it). Cases already done and unchanged are skipped; an interrupted "
                        "run leaves no half-written case.")
    pp.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory written by autoseg plan")
    pp.add_argument("--force", action="store_true", help="redo every case, even those already done")
    _add_common(pp)

    t = sub.add_parser("train", help="train one cross-validation fold: zoom-in stage, then zoom-out stage",
                       description="Train FOLD of a planned and preprocessed run: the plan's zoom-in stage (small "
                       "patches, long), then its zoom-out stage (large patches, short, lower learning rate, starting "
                       "from the zoom-in weights). Writes RUN_DIR/fold_<FOLD>/ (RUN_DIR/<config>/fold_<FOLD>/ for any "
                       "--config but 3d): checkpoint_latest.pt while training (removed at the end), "
                       "checkpoint_best.pt and checkpoint_final.pt, "
                       "training_log.txt, progress.png, config.json (what was run) and plans.json, then predicts "
                       "the fold's validation cases into validation/ with metrics.json. Interrupted (Ctrl-C, "
                       "SIGTERM, a crash), the same command resumes exactly where the last checkpoint was. Under "
                       "torchrun (or with --gpus N) the fold trains on several GPUs with DistributedDataParallel.")
    t.add_argument("fold", metavar="FOLD", help="fold index 0..k-1, or 'all' (every case; validates on them)")
    t.add_argument("--run", "--run-dir", dest="run", type=Path, required=True, metavar="RUN_DIR",
                   help="run directory (autoseg plan -o); under a torchrun command line of your own write --run-dir "
                   "(torchrun's parser takes --run for its --run-path)")
    t.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="training device (default auto: CUDA if visible, else CPU)")
    t.add_argument("--stage", choices=("both", "zoom-in", "zoom-out"), default="both",
                   help="stages to train (default both). zoom-out alone is a single-stage schedule from scratch "
                   "at the large patch with the zoom-in learning rate")
    t.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="epochs of the first stage trained (the zoom-out stage keeps the plan's ratio to it)")
    t.add_argument("--iterations-per-epoch", type=int, default=None, metavar="N",
                   help="optimiser steps per epoch (default: the plan's)")
    t.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="measure this machine's step time and set the epochs so that the whole schedule, "
                   "its learning-rate decay and the final validation finish within MINUTES")
    t.add_argument("--stop-at-dice", default=None, metavar="D[,D...]",
                   help="early stopping: a stage ends at the first epoch where the EMA pseudo-Dice of every "
                   "foreground class reaches D (one bar for all classes, or one per class in label order, comma-"
                   "separated); a zoom-in stage that stops moves on to zoom-out, a zoom-out stage that stops ends "
                   "training. With --time-budget, the time a stopped zoom-in stage leaves is given to the zoom-out "
                   "stage by its budget check (after its second epoch), unless that stage stops first")
    t.add_argument("--patience", type=int, default=None, metavar="N",
                   help="early stopping: a stage ends after N epochs in a row without a new best EMA pseudo-Dice "
                   "within it")
    t.add_argument("--config", default=None, metavar="NAME",
                   help="configuration of the plan to train: 3d, 2d (slices as samples), a MONAI network or "
                   "patch_free, as the plan holds them (autoseg plan --configs); folds other than 3d's go to "
                   "RUN_DIR/<config>/. Default: the "
                   "plan's default configuration, printed by autoseg plan with the reason")
    t.add_argument("--restart", action="store_true", help="delete this fold's checkpoints and start over")
    t.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="train on N GPUs of this machine with DistributedDataParallel (launches torchrun; with "
                   "--device cpu, N CPU processes over gloo)")
    t.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                   help="data-loading worker processes (default: all cores but one on GPU, half the cores on CPU; "
                   "0 loads in the training process)")
    t.add_argument("--deterministic", action="store_true",
                   help="deterministic cuDNN/cuBLAS kernels and no cuDNN autotuning: on a GPU a resumed run then "
                   "ends with exactly the weights of an uninterrupted one (slower; see docs/training.md). On the "
                   "CPU training is deterministic anyway")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (they are off anyway without a TTY)")

    pr = sub.add_parser("predict", help="segment a folder of scans with a trained run",
                        description="Segment every scan in SCANS_DIR (nnU-Net naming case_0000.nii.gz, _0001, ... "
                        "or one file per case as in MSD) with the trained folds of RUN_DIR, averaging their "
                        "probabilities, and write OUT_DIR/<case> with the input's ending, shape, spacing, origin "
                        "and direction. Outputs that exist are skipped (--overwrite to redo). A scan that cannot "
                        "be read or does not fit the run is reported by name, the others are still written, and "
                        "the exit code is 1.")
    pr.add_argument("-i", "--input", type=Path, required=True, metavar="SCANS_DIR", help="folder of scans")
    pr.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR", help="folder for label maps")
    pr.add_argument("--run", "--run-dir", dest="run", type=Path, required=True, metavar="RUN_DIR",
                    help="trained run directory; under a torchrun command line of your own write --run-dir (torchrun's "
                    "parser takes --run for its --run-path)")
    pr.add_argument("--folds", nargs="+", default=None, metavar="K",
                    help="folds to use (default: every fold with the checkpoint)")
    pr.add_argument("--config", default=None, metavar="NAME",
                    help="configuration whose folds predict: 3d, 2d, a MONAI one or patch_free (whole scans in one "
                    "pass where they fit), as the plan holds them. Default: "
                    "autoseg find-best's choice (one configuration or an ensemble of two, with its post-processing) "
                    "when the run has one, else the plan's default configuration")
    pr.add_argument("--checkpoint", choices=("final", "best"), default="final",
                    help="checkpoint of each fold (default final)")
    tta = pr.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None,
                     help="mirroring test-time augmentation even where find-best decided it buys nothing")
    tta.add_argument("--no-tta", dest="tta", action="store_false",
                     help="no mirroring test-time augmentation (up to 8x faster). Default: mirror, unless autoseg "
                     f"find-best measured on the cross-validation that mirroring raised the Dice by less than "
                     f"{MIRRORING_MIN_GAIN:g}")
    whole = pr.add_mutually_exclusive_group()
    whole.add_argument("--one-pass", dest="whole_volume", action="store_true", default=None,
                       help="a patch-free configuration planned to predict whole scans (whole_volume_prediction in "
                       "its plan) segments each scan in one pass where the plan's memory budget allows, even where "
                       "find-best measured that tiles score better; no effect on other configurations")
    whole.add_argument("--tiles", dest="whole_volume", action="store_false",
                       help="a patch-free configuration slides its training region over each scan, as the other "
                       "configurations do (slower; find-best compares the two). Default: "
                       "one pass, unless autoseg find-best measured on the cross-validation (both unmirrored) that "
                       f"tiles raised the Dice by {TILES_MIN_GAIN:g} or more")
    pr.add_argument("--step", type=float, default=None, metavar="S",
                    help="sliding-window step as a share of the patch (default: the plan's, 0.5)")
    pr.add_argument("--save-probabilities", action="store_true",
                    help="also write <case>.npz with class probabilities (for autoseg ensemble)")
    pr.add_argument("--fp32", action="store_true",
                    help="run the network in float32 on a CPU with bfloat16 arithmetic (AMX or AVX512-BF16) too; by "
                    "default such a CPU predicts our residual U-Nets under bfloat16 autocast, about 2.5x faster "
                    "with 99.98 %% or more of the labels the same as float32's (measured on Hippocampus and CHAOS)")
    pr.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="device (default auto: CUDA if visible, else CPU)")
    pr.add_argument("--overlays", type=Path, default=None, metavar="DIR",
                    help="also write DIR/<case>.png per scan: the prediction over the scan's first channel in three "
                    "planes through the largest predicted structure, at the scan's physical aspect ratio, a fixed "
                    "colour per class (for a quick look without a viewer)")
    pr.add_argument("--fix-nonfinite", action="store_true",
                    help="replace NaN and infinite voxels with their channel's smallest finite value and say so per "
                    "case (default: such a scan is refused with the count of bad voxels, and the others go on)")
    pr.add_argument("--gpus", type=int, default=1, metavar="N",
                    help="predict in N processes on this machine, one GPU each (launches torchrun; with --device "
                    "cpu, N CPU processes sharing the cores); each takes its share of the scans, balanced by size. "
                    "On several machines, start 'torchrun ... -m autoseg predict ...' on each instead")
    pr.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")

    en = sub.add_parser("ensemble", help="average the saved probabilities of several predictions",
                        description="Average <case>.npz (autoseg predict --save-probabilities) over the folders "
                        "and write OUT_DIR/<case>.nii.gz, the arg-max labels on the scans' grid.")
    en.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="prediction folders (at least two)")
    en.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR", help="folder for label maps")
    en.add_argument("--save-probabilities", action="store_true", help="also write the averaged probabilities")
    en.add_argument("--no-progress", action="store_true", help="no progress bar")

    sm = sub.add_parser("summarize", help="gather the folds' validation results and decide the post-processing",
                        description="Read RUN_DIR/fold_*/validation/ (written at the end of autoseg train), print "
                        "the Dice per class per fold and over all folds' cases, and decide per class whether "
                        "keeping only its largest connected component raises the cross-validation Dice; the "
                        "decision goes to RUN_DIR/postprocessing.json, which autoseg predict applies. Writes "
                        "RUN_DIR/crossval.json.")
    sm.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="trained run directory")
    sm.add_argument("--config", default=None, metavar="NAME",
                    help="configuration to summarize (default: the plan's default configuration); the files go "
                    "beside its folds (RUN_DIR for 3d, RUN_DIR/<config> for the others)")

    fb = sub.add_parser("find-best", help="choose the best configuration or pair of configurations by "
                        "cross-validation", description="Score every trained configuration of RUN_DIR, and the "
                        "ensemble of every pair, on the validation cases of the folds that all of them validated "
                        "(their saved probabilities: Dice per class, mean, HD95), print the table, and write the best "
                        "(ties within 1e-4 mean Dice: the cheaper prediction) with its post-processing decision to "
                        "RUN_DIR/best_configuration.json, which autoseg predict then follows. It also decides "
                        "whether prediction mirrors: only if mirroring raised the chosen configuration's validation "
                        f"Dice by at least {MIRRORING_MIN_GAIN:g} (each fold's validation scores its cases with and "
                        "without), and whether a chosen patch-free configuration segments scans in one pass or by "
                        f"tiles: tiles only if they raised its validation Dice by at least {TILES_MIN_GAIN:g} (both "
                        "unmirrored; its validation scores both).")
    fb.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="trained run directory")
    fb.add_argument("--no-progress", action="store_true", help="no progress bar")

    rp = sub.add_parser("report", help="write one self-contained HTML page about a run",
                        description="Write an HTML page (images embedded: it opens from disk, no network) with the "
                        "plan in words, every fold's training curves (losses, pseudo-Dice, learning rate, stage "
                        "boundaries, early stops), the cross-validation table per class (Dice, HD95, ASSD, TPR, "
                        "precision, micro-Dice) and per case (sortable), the worst and best validation cases drawn "
                        "with reference and prediction on the slices where they differ most, and the post-processing "
                        "decision (autoseg summarize). The scans are read from the dataset the run was planned on.")
    rp.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="trained run directory")
    rp.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                    help="HTML file to write (default RUN_DIR/report.html)")
    rp.add_argument("--config", default=None, metavar="NAME",
                    help="configuration to report (default: find-best's choice when it is one configuration, else "
                    "the plan's default)")
    rp.add_argument("--cases", type=int, default=3, metavar="N",
                    help="draw the N worst and the N best validation cases (default 3)")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("evaluate", help="score predicted label maps against references",
                       description="Pair PRED_DIR and REF_DIR by case name and compute, per case and class, Dice, "
                       "95th-percentile Hausdorff distance and average symmetric surface distance (mm), true-positive "
                       "rate and precision, plus per-class means and the micro-Dice over all cases. Writes "
                       "PRED_DIR/metrics.json and PRED_DIR/metrics.csv and prints a table. A 0/0 ratio is 1 when "
                       "the class is in neither mask and 0 otherwise; distances are 0 when both masks are empty "
                       "and the image diagonal when one is. Every reference needs a prediction of the same shape "
                       "and spacing.")
    e.add_argument("pred_dir", type=Path, metavar="PRED_DIR", help="folder of predicted label maps")
    e.add_argument("ref_dir", type=Path, metavar="REF_DIR", help="folder of reference label maps (e.g. labelsTr)")
    e.add_argument("--labels", type=int, nargs="+", default=None, metavar="L",
                   help="label values to score (default: every non-zero value found)")

    d = sub.add_parser("demo", help="run the whole pipeline on real scans shipped with autoseg",
                       description="Train on 30 real hippocampus MRI crops shipped with autoseg (Medical "
                       "Segmentation Decathlon Task04, CC BY-SA 4.0), then segment 6 held-out scans it never saw: "
                       "plan, preprocess, train fold 0 within --minutes (the zoom-in stage alone, with the CPU "
                       "plan's Adam), predict the held-out scans (with overlay PNGs), evaluate them against their "
                       "labels, summarize and write the HTML report. Prints the held-out Dice and where the report "
                       "is. About 3.5 minutes on a 2-core CPU; a rerun reuses what is done. --synthetic uses generated "
                       "ellipsoid organs instead (a quick check any method passes).")
    d.add_argument("-o", "--output", type=Path, default=Path("autoseg_demo"), metavar="DIR",
                   help="folder for the run, predictions and report (default ./autoseg_demo)")
    d.add_argument("--minutes", type=float, default=3.0, metavar="M",
                   help="training budget in minutes, final validation included (default 3)")
    d.add_argument("--synthetic", action="store_true",
                   help="generate a synthetic dataset in DIR/data and 4 held-out cases in DIR/heldout instead")
    d.add_argument("--cases", type=int, default=10, metavar="N",
                   help="with --synthetic: number of training cases (default 10)")
    return parser


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _report_problems(problems: list[str]) -> int:
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    print(f"{len(problems)} problem(s) found; nothing was written.", file=sys.stderr)
    return 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from autoseg.dataset import load_dataset
    from autoseg.fingerprint import fingerprint_dataset

    spec = load_dataset(args.dataset_dir)
    fingerprint_dataset(spec, None, args.workers, not args.no_progress)
    print(f"{spec.name}: {len(spec.cases)} cases, {spec.layout} layout, channels {spec.channel_names}, "
          f"labels {sorted(spec.labels)}: no problems found")
    return 0


def _configurations(text: str | None) -> list[str] | None:
    """``--configs``: None (the planner's default), every known one for ``all``, else the names given.

    Raises:
        ValueError: an unknown name (names the known ones).
    """
    from autoseg.plans import CONFIGURATIONS

    if text is None:
        return None
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(CONFIGURATIONS)
    names = ["3d" if n == "residual_unet" else n for n in names]
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown or not names:
        what = f"unknown {', '.join(unknown)}" if unknown else "no configuration named"
        raise ValueError(f"--configs {text!r}: {what}; known: {', '.join(CONFIGURATIONS)} or all")
    return names


def _cmd_plan(args: argparse.Namespace) -> int:
    from autoseg.atomic import remove_temporaries
    from autoseg.dataset import load_dataset
    from autoseg.device import check_device_args
    from autoseg.fingerprint import fingerprint_dataset, save_fingerprint
    from autoseg.planning.splits import read_splits
    from autoseg.planning.summary import format_summary
    from autoseg.planning.warmup import Warmup
    from autoseg.plans import PLANS_FILE, save_plans

    t0 = time.perf_counter()
    configs = _configurations(args.configs)
    spec = load_dataset(args.dataset_dir)
    folds = read_splits(args.splits, [c.case_id for c in spec.cases]) if args.splits is not None else None
    run_dir = args.output or Path("autoseg_runs") / spec.name
    if _inside(run_dir, args.dataset_dir):
        return _report_problems([f"{run_dir}: run directory is inside the dataset folder {args.dataset_dir}; "
                                 "choose another with -o"])
    check_device_args(args.gpu_memory, args.device)
    warmup = Warmup(configs, args.gpu_memory, args.device)  # torch loads beside the fingerprint
    try:
        if args.device == "cuda":
            warmup.device.result()  # a missing GPU is reported before the dataset is read
        cache = None if args.refingerprint else run_dir
        fp, reused = fingerprint_dataset(spec, cache, args.workers, not args.no_progress)
        fp.device = device = warmup.device.result()
        from autoseg.planning import make_plan  # here, not above: the warm-up loads it beside the fingerprint

        plans = make_plan(fp, device, n_folds=args.folds, dice_weighting=args.dice_weights,
                          bias_correction=args.bias_correction, configurations=configs)
    finally:
        warmup.finish()
    if folds is not None:
        plans.folds = folds
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run_dir)  # left by a plan that was killed
    save_fingerprint(fp, run_dir)
    save_plans(plans, run_dir / PLANS_FILE)
    print(format_summary(fp, plans))
    how = "reused" if reused else "computed"
    print(f"wrote        {run_dir / 'fingerprint.json'} ({how}) and {run_dir / PLANS_FILE} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from autoseg.preprocessing.run import preprocess_run

    t0 = time.perf_counter()
    r = preprocess_run(args.run_dir, args.workers, not args.no_progress, args.force)
    print(f"preprocessed {len(r.written)} case(s) with {r.workers} worker(s), skipped {len(r.skipped)} already "
          f"done, into {r.folder} in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import json

    from autoseg.demo import demo_dataset, make_synthetic_dataset

    if args.synthetic:
        data, heldout = args.output / "data", args.output / "heldout"
        spacing = (0.9, 0.9, 2.0)
        if not (data / "dataset.json").is_file():
            make_synthetic_dataset(data, n_cases=args.cases, spacing_xyz=spacing)
            print(f"demo         wrote a synthetic dataset of {args.cases} cases to {data}")
        if not (heldout / "dataset.json").is_file():
            make_synthetic_dataset(heldout, n_cases=4, spacing_xyz=spacing, seed=1)
            print(f"demo         wrote 4 held-out cases to {heldout}")
        images, labels = heldout / "imagesTr", heldout / "labelsTr"
    else:
        data = demo_dataset()
        images, labels = data / "imagesTs", data / "labelsTs"
        print(f"demo         real scans: {data} (30 training cases; 6 held-out in imagesTs)")
    run, predictions = args.output / "run", args.output / "predictions"
    stage = ["--stage", "zoom-in"] if not args.synthetic else []
    steps = [["plan", str(data), "-o", str(run), "--device", "cpu"], ["preprocess", str(run)],
             ["train", "0", "--run", str(run), "--time-budget", f"{args.minutes:g}", *stage],
             ["predict", "-i", str(images), "-o", str(predictions), "--run", str(run), "--overlays",
              str(args.output / "overlays")],
             ["evaluate", str(predictions), str(labels)], ["summarize", "--run", str(run)],
             ["report", "--run", str(run), "-o", str(args.output / "report.html")]]
    for argv in steps:
        print(f"\n$ autoseg {' '.join(argv)}", flush=True)
        code = main(argv)
        if code:
            return code
    metrics = json.loads((predictions / "metrics.json").read_text())
    print(f"\ndemo         mean Dice on the {metrics['n_cases']} held-out cases: {metrics['mean']['dice']:.3f}"
          f"\ndemo         report: {args.output / 'report.html'} (open it in a browser); overlays: "
          f"{args.output / 'overlays'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from autoseg.workflows.report import write_report

    if args.cases < 0:
        raise ValueError("--cases must be 0 or more")
    t0 = time.perf_counter()
    path = write_report(args.run, args.output, args.config, args.cases, not args.no_progress and sys.stderr.isatty())
    print(f"report       {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    return 0


def _dice_bars(text: str | None) -> list[float]:
    """``--stop-at-dice 0.9`` or ``0.9,0.8``: the bars as numbers (their count and range: the trainer checks)."""
    if text is None:
        return []
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--stop-at-dice {text}: expected one Dice or a comma-separated list, e.g. 0.9 or "
                         "0.9,0.8") from None


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args.gpus, args.argv)
    from autoseg.runconfig import Overrides
    from autoseg.training.runtime import RankFailed, distributed_runtime
    from autoseg.workflows.fold import train_fold

    if args.epochs is not None and args.epochs < 1 or args.iterations_per_epoch is not None and \
            args.iterations_per_epoch < 1 or args.time_budget is not None and args.time_budget <= 0:
        raise ValueError("--epochs, --iterations-per-epoch and --time-budget must be positive")
    if args.time_budget is not None and args.epochs is not None:
        raise ValueError("--time-budget sets the epochs; give either it or --epochs")
    if args.patience is not None and args.patience < 1:
        raise ValueError("--patience must be at least 1 epoch")
    progress = not args.no_progress and sys.stderr.isatty()
    rt = distributed_runtime(args.device, args.workers, progress)
    overrides = Overrides(args.stage, args.epochs, args.iterations_per_epoch, args.time_budget, args.deterministic,
                          _dice_bars(args.stop_at_dice), args.patience)
    agreed = True  # every rank knows how this ended: leaving the process group cannot wait on a peer
    try:
        train_fold(args.run, args.fold, overrides, rt, args.restart, say=print if rt.main else _silent,
                   configuration=args.config)
    except KeyboardInterrupt:
        if rt.main:
            raise
        return 130  # rank 0 says it for every rank
    except RankFailed as e:  # every rank raises the same line: rank 0 prints it
        if rt.main:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if not rt.distributed:
            raise
        # this rank alone failed (out of memory in a step, a CUDA error): its peers may wait inside a collective,
        # so it leaves without the process group's goodbye, which could wait on them; the launcher stops the others
        agreed = False
        if not isinstance(e, (ValueError, OSError)):  # not one of our one-line errors: its traceback says where
            traceback.print_exc()
        print(f"error: rank {rt.rank} of {rt.world_size}: {e}", file=sys.stderr)
        return 1
    finally:
        if agreed:
            rt.close()
    return 0


def _silent(_: str) -> None:
    pass


def _cmd_predict(args: argparse.Namespace) -> int:
    import os

    from autoseg.device import first_line
    from autoseg.parallel import CaseError
    from autoseg.training.runtime import distributed_runtime

    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args.gpus, args.argv)
    t0 = time.perf_counter()
    rt = distributed_runtime(args.device, 0, not args.no_progress and sys.stderr.isatty())
    agreed = True  # False once this rank could not take part in the gather: leaving could wait on a peer
    try:
        if not rt.distributed:
            outcomes = [_predict_share(args, rt)]
        else:  # every rank reaches the gather, whatever happened to it, so that none waits forever
            try:
                outcome = _predict_share(args, rt)
            except (ValueError, OSError, CaseError) as e:
                outcome = {"error": str(e)}
            try:
                outcomes = rt.gather(outcome)
            except RuntimeError as e:
                # a GPU left unusable by a sticky error cannot take part in NCCL's gather (it copies through the
                # device): this rank says its own outcome and leaves without the goodbye; the launcher stops the
                # others, whose written cases stay, and a rerun skips them
                agreed = False
                _print_predicted(args, [outcome], 1, time.perf_counter() - t0)
                print(f"error: rank {rt.rank} of {rt.world_size} could not reach the other processes "
                      f"({first_line(e)})", file=sys.stderr)
                return 1
    finally:
        if agreed:
            rt.close()
    failed = any("error" in o or o["failed"] or o["stopped"] for o in outcomes)
    if rt.main:
        _print_predicted(args, outcomes, rt.world_size, time.perf_counter() - t0)
    return 1 if failed else 0


def _predict_share(args: argparse.Namespace, rt: Any) -> dict:
    """Predict this process's share of the scans; what it wrote, skipped, failed, and why it stopped early."""
    from autoseg.inference.choice import predictor_for_run
    from autoseg.inference.folder import RunStoppedError, predict_folder

    predictor, what = predictor_for_run(args.run, args.folds, args.checkpoint, args.device, args.tta,
                                        args.step, args.config, args.whole_volume, False if args.fp32 else None)
    if predictor.bfloat16:
        what += " under bfloat16 autocast (this CPU computes in bfloat16; --fp32 opts out)"
    if rt.main:
        print(f"predicting with {what}" + (f" in {rt.world_size} processes" if rt.distributed else ""))
    stopped = None
    try:
        r = predict_folder(predictor, args.input, args.output, args.overwrite, args.save_probabilities,
                           rt.progress and rt.main, args.overlays, args.fix_nonfinite, rt.rank, rt.world_size)
    except RunStoppedError as e:  # the run stopped: the cases that failed before it are still worth a line
        if not rt.distributed:
            for line in e.report.failed.values():
                print(f"error: {line}", file=sys.stderr)
            raise
        r, stopped = e.report, f"rank {rt.rank}: {e}"
    return {"written": r.written, "skipped": r.skipped, "failed": r.failed, "stopped": stopped,
            "networks": len(predictor.networks)}


def _print_predicted(args: argparse.Namespace, outcomes: list[dict], world: int, seconds: float) -> None:
    """Rank 0's lines: every failure once, then the summary of all processes."""
    for message in dict.fromkeys(o["error"] for o in outcomes if "error" in o):
        print(f"error: {message}", file=sys.stderr)
    done = [o for o in outcomes if "error" not in o]
    for o in done:
        for line in o["failed"].values():
            print(f"error: {line}", file=sys.stderr)
        if o["stopped"]:
            print(f"error: {o['stopped']}", file=sys.stderr)
    if not done:
        return
    n = sum(len(o["written"]) for o in done)
    per_case = f" ({seconds / n:.1f} s per case)" if n else ""
    where = f" over {world} processes" if world > 1 else ""
    print(f"predicted {n} case(s) into {args.output} with {done[0]['networks']} network(s){where}{per_case}; "
          f"skipped {sum(len(o['skipped']) for o in done)} already done; "
          f"{sum(len(o['failed']) for o in done)} failed"
          + (f"; overlays in {args.overlays}" if args.overlays is not None else ""))


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from autoseg.inference.ensemble import ensemble_folders

    done = ensemble_folders(args.folders, args.output, args.save_probabilities, not args.no_progress)
    print(f"ensembled {len(done)} case(s) from {len(args.folders)} folders into {args.output}")
    return 0


def _cmd_summarize(args: argparse.Namespace) -> int:
    from autoseg.runconfig import model_dir
    from autoseg.workflows.crossval import CROSSVAL_FILE, summarize_run

    r = summarize_run(args.run, args.config)
    for fold, dice in r["dice_per_fold"].items():
        print(f"{fold:<8} " + "  ".join(f"{k} {v:.4f}" for k, v in dice.items()))
    print(f"{'all':<8} " + "  ".join(f"{k} {v:.4f}" for k, v in r["dice_pooled"].items())
          + f"  (mean {r['mean_foreground_dice']:.4f}, {r['n_cases']} cases)")
    pp = r["postprocessing"]
    kept = pp["largest_component_classes"]
    print(f"postprocess  largest component for classes {kept or 'none'} (Dice before -> after: "
          + ", ".join(f"{k} {pp['dice_before'][k]:.4f} -> {pp['dice_after'][k]:.4f} "
                      f"({pp['dice_after'][k] - pp['dice_before'][k]:+.5f})" for k in pp["dice_before"]) + ")")
    if pp["hd95_before_mm"]:
        print("             HD95 before -> after: " + ", ".join(
            f"{k} {pp['hd95_before_mm'][k]:.1f} -> {pp['hd95_after_mm'][k]:.1f} mm" for k in pp["hd95_before_mm"])
              + " (adopted also where Dice stays within 0.001 and HD95 drops)")
    where = model_dir(args.run, r["configuration"])
    print(f"wrote        {where / CROSSVAL_FILE} and {where / 'postprocessing.json'}")
    return 0


def _cmd_find_best(args: argparse.Namespace) -> int:
    from autoseg.inference.choice import CHOICE_FILE
    from autoseg.workflows.findbest import find_best

    c = find_best(args.run, not args.no_progress and sys.stderr.isatty())
    classes = list(c.candidates[0].dice)
    print(f"{'candidate':<28} " + " ".join(f"{n[:12]:>12}" for n in classes) + f" {'mean':>7} {'HD95 mm':>8} "
          f"{'cost':>5}")
    for s in sorted(c.candidates, key=lambda s: -s.mean_dice):
        mark = " *" if s.configurations == c.configurations else ""
        print(f"{' + '.join(s.configurations) + mark:<28} " + " ".join(f"{s.dice[n]:>12.4f}" for n in classes)
              + f" {s.mean_dice:>7.4f} {s.hd95_mm:>8.2f} {s.relative_cost:>5.2f}")
    pp = c.postprocessing
    print(f"chosen       {' + '.join(c.configurations)}: {c.reason}")
    print(f"postprocess  largest component for classes {pp.largest_component_classes or 'none'}")
    print(f"mirroring    {'on' if c.mirroring else 'off'}: {c.mirroring_reason}")
    if c.whole_volume_reason:
        print(f"one pass     {'on' if c.whole_volume else 'off (tiles)'}: {c.whole_volume_reason}")
    print(f"wrote        {args.run / CHOICE_FILE}; autoseg predict follows it unless given --config (and "
          "--tta / --no-tta for mirroring, --one-pass / --tiles for a patch-free configuration)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from autoseg.evaluation.evaluate import evaluate_folders, format_table

    result = evaluate_folders(args.pred_dir, args.ref_dir, args.labels)
    print(format_table(result))
    print(f"{result['n_cases']} case(s); wrote {args.pred_dir / 'metrics.json'} and {args.pred_dir / 'metrics.csv'}")
    return 0


def _launch_torchrun(gpus: int, argv: list[str]) -> int:
    """Re-run this command (``argv``, without ``--gpus``) in ``gpus`` processes with PyTorch's elastic launcher
    (what ``torchrun --standalone`` runs), so that a failure ends with our one line per rank rather than the
    launcher's traceback."""
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rest = [a for i, a in enumerate(argv) if a != "--gpus" and (i == 0 or argv[i - 1] != "--gpus")]
    rest = [a for a in rest if not a.startswith("--gpus=")]
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure log repeats ours
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=gpus, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "autoseg", *rest)
    except SignalException as e:  # Ctrl-C or SIGTERM: the ranks were stopped and said where they stopped
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        code = max(codes) if codes else 1
        if code not in (1, 130, 128 + 15):  # 1 and the interruptions were explained by the ranks themselves
            print(f"error: {len(e.failures)} of {gpus} processes ended with exit code(s) {codes}",
                  file=sys.stderr)
        return code if 0 < code < 256 else 1
    return 0


COMMANDS = {"report": _cmd_report, "demo": _cmd_demo, "train": _cmd_train, "predict": _cmd_predict,
            "ensemble": _cmd_ensemble,
            "evaluate": _cmd_evaluate, "summarize": _cmd_summarize, "find-best": _cmd_find_best,
            "verify": _cmd_verify, "plan": _cmd_plan, "preprocess": _cmd_preprocess}


def run() -> None:
    """The ``autoseg`` program: :func:`main` on ``sys.argv``, then the process ends without the interpreter's
    module teardown (:mod:`autoseg.fastexit`: about 2 s once torch and MONAI are loaded)."""
    from autoseg.fastexit import exit_process

    exit_process(main())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 bad input, 2 usage, 130 interrupted)."""
    from autoseg.dataset import DatasetError
    from autoseg.parallel import CaseError
    from autoseg.typedjson import SchemaError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    logging.getLogger("numexpr").setLevel(logging.WARNING)  # blosc2 imports it; its thread notice is noise
    # torch's own info lines (e.g. FakeTensor cache statistics at exit, which a half-done import of
    # torch._dynamo leaves on) are not ours to print
    logging.getLogger("torch").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except DatasetError as e:
        return _report_problems(e.problems)
    except (CaseError, SchemaError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if hasattr(e, "code"):
            print(f"interrupted: {e}", file=sys.stderr)
            return int(e.code)
        print("interrupted: files are only ever written complete (temporary name, then rename); run the same "
              "command again to continue", file=sys.stderr)
        return 130
