#!/usr/bin/env bash
# witscale: DPO of a 7B SFT model (e.g. a WIT cell's export) on one node × 8 GPUs, ZeRO-3 — the paper's
# second stage (§4.2): the reference pass once, then DPO with the paper's defaults.
#
#   mkdir -p logs
#   .venv/bin/python tools/pack_dataset.py --task preference --input ultrafeedback.jsonl --tokenizer runs/wit/hf \
#       --seq-len 4096 --template plain --output packed/uf-4k          # the SFT data's template
#   DATA=packed/uf-4k MODEL=runs/wit-0.2-1.0/hf OUTPUT=runs/dpo-0.2-1.0 sbatch slurm/dpo_7b.sh
#
# 1. Reference pass: tools/precompute_reference.py writes MODEL's log-probs of every completion into DATA
#    (and into EVAL_DATA, if set: a packed preference eval set), under the same launcher; skipped when DATA
#    already holds log-probs of this model. A dataset holds ONE reference: with PREF_DATA (and PREF_EVAL_DATA)
#    instead of DATA, the run gets a private copy (OUTPUT/pref_data: links to the shared arrays, its own
#    manifest and log-probs) — what slurm/sweep_dpo.sh does for every cell.
# 2. DPO training from MODEL (train.py --preset dpo-paper --objective dpo --reference-model MODEL), exported
#    to EXPORT_HF if set.
#
# The paper's defaults (variables, overridable): LR=5e-7, PAIRS_PER_STEP=32 (the trainer picks --grad-accum
# from the data's mean pairs per row), WEIGHT_DECAY=0, WARMUP_RATIO=0.1, EPOCHS=2, BETA=0.1, DPO_LOSS=sigmoid
# (or ipo), LABEL_SMOOTHING=0. PROMPT_WEIGHT=0 RESPONSE_WEIGHT=1: the standard DPO mask (response tokens
# only); CLASS_WEIGHTS=eot=0.5,… per-class overrides, for the reference pass and training alike. Everything else as in slurm/train_7b.sh: MICRO_BATCH, GRAD_ACCUM (overrides PAIRS_PER_STEP), MAX_STEPS,
# SAVE_STEPS, EVAL_STEPS, TP, PP, DS_CONFIG, LAUNCHER, NPROC_PER_NODE, PYTHON, EXTRA_ARGS, WITSCALE_SITE_ENV …
# 70B: sbatch --nodes=8 --time=48:00:00 slurm/dpo_7b.sh with ACTIVATION_CHECKPOINTING=on SAVE_STEPS=100 (README,
# "Align with DPO"), from a copy of this template whose #SBATCH --signal lead and WITSCALE_SIGNAL_LEAD_S both say
# 1200 (train_70b.sh's arithmetic): a lead given on sbatch's command line does not reach the trainer's save-time check.
#
# Preemption: as train_7b.sh — USR1 5 minutes before the time limit, the ranks checkpoint, the job requeues
# and resumes from OUTPUT/checkpoints/latest without a second reference pass. A USR1 during the reference
# pass (no checkpoint there) stops it and requeues at once; the pass runs again.
#
#SBATCH --job-name=wit-dpo-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
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
: "${ACTIVATION_CHECKPOINTING:=auto}"
export DS_CONFIG ACTIVATION_CHECKPOINTING
export WITSCALE_SIGNAL_LEAD_S=300        # = #SBATCH --signal=B:USR1@300 (the trainer compares its save time with it)

# The batch script runs from a copy in Slurm's spool directory: find common.sh in the checkout.
# shellcheck source=slurm/common.sh
source "${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
# shellcheck source=slurm/dpo_common.sh
source "${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/dpo_common.sh"
wit_dpo_main
