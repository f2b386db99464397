#!/usr/bin/env bash
# witscale: Weighted Instruction Tuning of a 70B model on 8 nodes × 8 GPUs.
#
#   mkdir -p logs
#   DATA=packed/alpaca MODEL=/models/llama-2-70b OUTPUT=$SCRATCH/$USER/70b sbatch slurm/train_70b.sh
#   (OUTPUT defaults to $SCRATCH/$USER/witscale/<job>; one under $HOME is refused: 2-3 TB of checkpoints)
#   LAYOUT=3d TP=8 PP=4 DATA=… sbatch slurm/train_70b.sh       # Megatron-style TP × PP × DP with ZeRO-1
#
# LAYOUT=zero3 (default): ZeRO-3 over all 64 GPUs (optionally TP>1 inside a node), ds_configs/zero3.json.
# LAYOUT=3d: tensor × pipeline × data parallel, ZeRO-1 (DeepSpeed's pipeline engine allows ZeRO ≤ 1);
#            TP defaults to 8 (one node), PP to 4; DS_CONFIG to ds_configs/zero1.json.
# Preemption lead (--signal=B:USR1@1200, WITSCALE_SIGNAL_LEAD_S below; keep the two equal): the warning must
# leave time for the step in flight plus one full checkpoint, twice over (Slurm may signal up to 60 s off, and
# filesystems slow down when every job saves at once). A 70B checkpoint is 14 bytes per parameter (tools/plan.py:
# bf16 weights 2 + fp32 master, exp_avg, exp_avg_sq 12) × 69e9 ≈ 0.97 TB; at a stated aggregate write bandwidth
# of 1.6 GB/s for the job that is ≈ 600 s, so the lead is 2 × 600 = 1200 s. On a slower filesystem raise both
# (lead ≥ 2 × 970 GB / bandwidth); the trainer logs its first save's duration and warns when it exceeds half
# the lead.
# All other variables as in slurm/train_7b.sh (DATA, MODEL, OUTPUT, PROMPT_WEIGHT, RESPONSE_WEIGHT,
# NORMALIZATION, MICRO_BATCH, GRAD_ACCUM, GLOBAL_BATCH, LR, EPOCHS, MAX_STEPS, LAUNCHER, NPROC_PER_NODE,
# PYTHON, EXTRA_ARGS, WITSCALE_SITE_ENV, …). Preemption and requeue work as there.
#
#SBATCH --job-name=wit-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@1200
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
## Site-specific: uncomment and fill in.
##SBATCH --partition=gpu
##SBATCH --account=my-project
##SBATCH --qos=normal
set -euo pipefail

: "${LAYOUT:=zero3}"
case "$LAYOUT" in
    zero3) : "${DS_CONFIG:=ds_configs/zero3.json}" ;;
    3d)
        : "${TP:=8}" "${PP:=4}"
        : "${DS_CONFIG:=ds_configs/zero1.json}"
        ;;
    *) echo "LAYOUT=$LAYOUT: use zero3 or 3d" >&2; exit 2 ;;
esac
# At seq-len 4096 the activations of 70B do not fit without recomputing each block (tools/plan.py).
: "${ACTIVATION_CHECKPOINTING:=on}"
# 70B checkpoints are big: save less often than the 7B default.
: "${SAVE_STEPS:=100}"
[ -n "${MAX_STEPS:-}${EPOCHS:-}" ] || EPOCHS=2
export WIT_LARGE_OUTPUT=1               # common.sh: refuse an OUTPUT under $HOME (WITSCALE_ALLOW_HOME_OUTPUT=1 to force)
export WITSCALE_SIGNAL_LEAD_S=1200       # = #SBATCH --signal=B:USR1@1200 (the trainer compares its save time with it)
export LAYOUT DS_CONFIG SAVE_STEPS EPOCHS ACTIVATION_CHECKPOINTING ${TP:+TP} ${PP:+PP}

# The batch script runs from a copy in Slurm's spool directory: find common.sh in the checkout.
# shellcheck source=slurm/common.sh
source "${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
wit_main
