#!/usr/bin/env bash
# Verify and plan the real Hippocampus data: for this machine, then for an 8 GB and a 24 GB GPU.
set -euo pipefail
data=${1:-../shared/data/MSD_Task04_Hippocampus}
autoseg verify "$data"
autoseg plan "$data" -o runs/hippocampus_here
autoseg plan "$data" -o runs/hippocampus_8g --gpu-memory 8
autoseg plan "$data" -o runs/hippocampus_24g --gpu-memory 24
