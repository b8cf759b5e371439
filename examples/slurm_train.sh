#!/usr/bin/env bash
# One fold of a planned and preprocessed run, trained on several nodes of a SLURM cluster with PyTorch's own
# launcher (torchrun, c10d rendezvous). The run folder must be on a filesystem every node sees: every rank reads
# the preprocessed cases from it, and rank 0 alone writes the checkpoints and logs there.
#
#   sbatch --nodes 2 examples/slurm_train.sh RUN_DIR FOLD [MINUTES]
#
# Resubmitting the same job after a time limit or a node failure continues from checkpoint_latest.pt.
#SBATCH --job-name=autoseg-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@300
set -euo pipefail
run=${1:?usage: slurm_train.sh RUN_DIR FOLD [MINUTES]}
fold=${2:?usage: slurm_train.sh RUN_DIR FOLD [MINUTES]}
budget=()
[ -n "${3:-}" ] && budget=(--time-budget "$3")
# the first node of the allocation hosts the rendezvous
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus=${SLURM_GPUS_PER_NODE:-4}
gpus=${gpus##*:}
# SIGTERM from SLURM (--signal, 5 minutes before the limit) reaches torchrun, which passes it to every rank:
# rank 0 writes checkpoint_latest.pt and all ranks exit; resubmit to continue
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$gpus" \
    --rdzv-backend c10d --rdzv-endpoint "$head:29500" --rdzv-id "autoseg-$SLURM_JOB_ID" \
    -m autoseg train "$fold" --run-dir "$run" "${budget[@]}" --no-progress &
wait
