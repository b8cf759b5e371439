#!/usr/bin/env bash
# The whole pipeline on a real MSD dataset folder (default: Hippocampus): plan, preprocess, train fold 0 within
# a time budget (default 30 minutes), summarize its validation, then predict the fold's validation scans with
# autoseg predict and score them with autoseg evaluate. Interrupt it at any time: the same command continues.
set -euo pipefail
data=$(cd "${1:-../shared/data/MSD_Task04_Hippocampus}" && pwd)
minutes=${2:-30}
run=runs/$(basename "$data")
autoseg plan "$data" -o "$run"
autoseg preprocess "$run"
autoseg train 0 --run "$run" --time-budget "$minutes"
autoseg summarize --run "$run"
# the validation cases of fold 0, as a folder of scans and a folder of labels
mkdir -p "$run/fold0_scans" "$run/fold0_labels"
python - "$run" "$data" <<'PY'
import json, os, sys
run, data = sys.argv[1:3]
for case in json.load(open(f"{run}/plans.json"))["folds"][0]["val"]:
    for kind, folder in (("imagesTr", "fold0_scans"), ("labelsTr", "fold0_labels")):
        link = f"{run}/{folder}/{case}.nii.gz"
        if not os.path.lexists(link):
            os.symlink(f"{data}/{kind}/{case}.nii.gz", link)
PY
autoseg predict -i "$run/fold0_scans" -o "$run/fold0_predictions" --run "$run" --folds 0
autoseg evaluate "$run/fold0_predictions" "$run/fold0_labels"
