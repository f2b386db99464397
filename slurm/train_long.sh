#!/usr/bin/env bash
# witscale: Weighted Instruction Tuning of a 70B model on rows of 256k tokens, 8 nodes × 8 GPUs (80 GB).
#
#   mkdir -p logs
#   python tools/pack_dataset.py … --seq-len 262144 --output packed/long     # rows of 256k tokens (once)
#   DATA=packed/long MODEL=/models/llama-3-70b OUTPUT=$SCRATCH/$USER/70b-long sbatch slurm/train_long.sh
#   (OUTPUT defaults to $SCRATCH/$USER/witscale/<job>; one under $HOME is refused: 2-3 TB of checkpoints)
#
# The layout is the planner's (`tools/plan.py --model 70B --gpus 64 --seq-len 262144 --auto`, README
# "Long context"): ZeRO-3 over dp 8 × sp 4 with tp 2 inside each node (an sp × tp group of 8 = one node):
#   TP=2 SP=4                  each rank holds 1/4 of every row (Ulysses) and half of every matrix
#   TP_SEQUENCE_PARALLEL=on    Megatron sequence parallelism inside TP: norms, residuals, checkpoints sharded by tp
#   ACTIVATION_CHECKPOINTING=on
#   TILED_MLP=8                the MLP over 8 tiles of the rank's 64k tokens
# ≈ 72.0 GiB per GPU (parameters 4.6, gradients 2.1, Adam 12.3, activations 50.0, other 3.0). Rows must be a
# multiple of SP long (the trainer refuses others). Other sizes: the planner's table for the model, rows and GPUs;
# ACTIVATION_CHECKPOINTING=offload keeps the checkpoints in pinned host memory (its host/node column).
# All other variables as in slurm/train_70b.sh (DATA, MODEL, OUTPUT, PROMPT_WEIGHT, RESPONSE_WEIGHT,
# NORMALIZATION, MICRO_BATCH, GRAD_ACCUM, GLOBAL_BATCH, LR, EPOCHS, MAX_STEPS, LAUNCHER, NPROC_PER_NODE,
# PYTHON, EXTRA_ARGS, WITSCALE_SITE_ENV, …). Preemption and requeue work as there (the same 20-minute lead:
# the checkpoint is the same 0.97 TB).
#
#SBATCH --job-name=wit-long
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

: "${DS_CONFIG:=ds_configs/zero3.json}"
: "${TP:=2}" "${SP:=4}"
: "${TP_SEQUENCE_PARALLEL:=on}"          # --tp-sequence-parallel auto | on | off
: "${TILED_MLP:=8}"                      # --tiled-mlp N (1: off)
: "${ACTIVATION_CHECKPOINTING:=on}"      # on | offload (off does not fit at 256k)
# 70B checkpoints are big: save less often than the 7B default.
: "${SAVE_STEPS:=100}"
[ -n "${MAX_STEPS:-}${EPOCHS:-}" ] || EPOCHS=2
export WIT_LARGE_OUTPUT=1               # common.sh: refuse an OUTPUT under $HOME (WITSCALE_ALLOW_HOME_OUTPUT=1 to force)
export WITSCALE_SIGNAL_LEAD_S=1200       # = #SBATCH --signal=B:USR1@1200 (the trainer compares its save time with it)
export DS_CONFIG TP SP SAVE_STEPS EPOCHS ACTIVATION_CHECKPOINTING TP_SEQUENCE_PARALLEL TILED_MLP

# The batch script runs from a copy in Slurm's spool directory: find common.sh in the checkout.
# shellcheck source=slurm/common.sh
source "${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
wit_require_int TILED_MLP
# The long-context flags this template adds to the trainer's command line (each value one argument).
WIT_OBJECTIVE_ARGS=(--tp-sequence-parallel "$TP_SEQUENCE_PARALLEL" --tiled-mlp "$TILED_MLP")
wit_main
