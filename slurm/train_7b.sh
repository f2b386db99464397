#!/usr/bin/env bash
# witscale: Weighted Instruction Tuning of a 7B model on one node × 8 GPUs with DeepSpeed ZeRO-3.
#
#   mkdir -p logs
#   DATA=packed/alpaca MODEL=/models/llama-2-7b OUTPUT=runs/7b-lp0.2 PROMPT_WEIGHT=0.2 sbatch slurm/train_7b.sh
#
# Submit from the repository root (or set WITSCALE_HOME). #SBATCH lines are overridden by sbatch's own
# flags (sbatch --nodes=2 --time=2:00:00 …); everything else by environment variables:
#   DATA MODEL|MODEL_CONFIG OUTPUT        packed data, HF model dir (or config for random init), run dir
#   PROMPT_WEIGHT RESPONSE_WEIGHT         λp (default 0) and λr (default 1)
#   NORMALIZATION                         nonzero (paper, default) | weight_sum | tokens
#   MICRO_BATCH GRAD_ACCUM GLOBAL_BATCH   GRAD_ACCUM defaults to GLOBAL_BATCH (64) / (MICRO_BATCH × data-parallel)
#   LR EPOCHS MAX_STEPS SEED SAVE_STEPS EVAL_DATA EVAL_STEPS EXPORT_HF TP PP RESUME (default auto)
#   DS_CONFIG                             default ds_configs/zero3.json
#   LAUNCHER                              torchrun (default) | deepspeed | srun | srun-mpi | mpirun
#   NPROC_PER_NODE                        ranks per node (default: the node's allocated GPUs)
#   PYTHON                                default .venv/bin/python of the checkout, else python3
#   EXTRA_ARGS                            further trainer flags, e.g. "--clip-grad 1.0 --eval-steps 100"
#   WITSCALE_SITE_ENV                     site environment file (default slurm/site_env.sh)
#   MASTER_ADDR MASTER_PORT               default: head node of the allocation, 20000 + job id % 20000
#
# Preemption: 5 minutes before the time limit Slurm sends USR1 to this script (B:), which forwards it to
# the ranks; they finish the step, checkpoint and exit 0, and this script requeues the job, which resumes
# from OUTPUT/checkpoints/latest. The log of every restart is appended to the same file.
#
#SBATCH --job-name=wit-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
##SBATCH --cpus-per-task=12          # --exclusive already gives the launcher every core of the node
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
## Site-specific: uncomment and fill in.
##SBATCH --partition=gpu
##SBATCH --account=my-project
##SBATCH --qos=normal
set -euo pipefail

: "${DS_CONFIG:=ds_configs/zero3.json}"
# auto: the trainer recomputes blocks only where tools/plan.py's estimate says the layout needs it (7B on
# 8 × 80 GB ZeRO-3 fits without, ~34 GiB per GPU; on smaller GPUs it turns on).
: "${ACTIVATION_CHECKPOINTING:=auto}"
[ -n "${MAX_STEPS:-}${EPOCHS:-}" ] || EPOCHS=3
# 7B checkpoint ≈ 14 B × 6.7e9 ≈ 94 GB: ≈ 60 s at 1.6 GB/s, well inside half the lead (train_70b.sh: the rule).
export WITSCALE_SIGNAL_LEAD_S=300        # = #SBATCH --signal=B:USR1@300 (the trainer compares its save time with it)
export DS_CONFIG EPOCHS ACTIVATION_CHECKPOINTING

# The batch script runs from a copy in Slurm's spool directory: find common.sh in the checkout.
# shellcheck source=slurm/common.sh
source "${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
wit_main
