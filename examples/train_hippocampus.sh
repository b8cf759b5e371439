#!/usr/bin/env bash
# Plan, preprocess and train fold 0 of the real Hippocampus data within a time budget (default 30 minutes),
# then show the fold's validation Dice. Interrupt it at any time: the same command continues.
set -euo pipefail
data=${1:-../shared/data/MSD_Task04_Hippocampus}
minutes=${2:-30}
run=runs/hippocampus
autoseg plan "$data" -o "$run"
autoseg preprocess "$run"
autoseg train 0 --run "$run" --time-budget "$minutes"
python -c "import json,sys; m=json.load(open(sys.argv[1])); print(m['mean_per_class'], m['mean_foreground_dice'])" \
    "$run/fold_0/validation/metrics.json"
