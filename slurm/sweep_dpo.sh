#!/usr/bin/env bash
# witscale: DPO on top of every cell of a (λp, λr) sweep — the paper's WIT → DPO (§4.2) — as Slurm job arrays:
# one DPO run per SFT cell, started from that cell's exported model ($SWEEP_DIR/lp<λp>_lr<λr>/hf), which is also
# its reference (each cell runs its own reference pass over its own linked copy of the preference data),
# exported and evaluated like the SFT cells (slurm/evaluate_cell.sh), then the report: tools/collect_sweep.py
# sets each DPO result beside its SFT cell in $SWEEP_DIR/sweep_report.md (section "WIT → DPO").
#
#   mkdir -p logs
#   bash slurm/sweep_dpo.sh runs/sweep packed/uf-4k [sbatch flags]         # after the SFT sweep has exported
#   AFTER_SFT=<training array id> bash slurm/sweep_dpo.sh runs/sweep packed/uf-4k
#       each DPO task waits for ITS cell's SFT training (aftercorr; a failed SFT cell's DPO is cancelled)
#   SWEEP_DIR=runs/sweep PREF_DATA=packed/uf-4k sbatch --array=0-34%8 slurm/sweep_dpo.sh
#       the first task to start submits the evaluation array and the report job
#
# Run with bash, it sizes the array to the cells of $SWEEP_DIR/cells.txt (the SFT sweep's list, same order)
# and submits the DPO array, the evaluation array (aftercorr) and the report job (afterany), printing their ids
# (--parsable: one per line). Each DPO run lives in $SWEEP_DIR/dpo/lp<λp>_lr<λr> (checkpoints, metrics.jsonl,
# pref_data/ with the cell's reference log-probs, hf/, train_status.json, eval_results.json):
# $SWEEP_DIR/dpo is a sweep directory of its own (collect_sweep.py $SWEEP_DIR/dpo reports it alone).
#
# Variables: PREF_EVAL_DATA (a packed preference eval set: reward accuracy/margin on held-out pairs; each cell
# computes its own reference over it too), MAX_PARALLEL (default 8), the DPO settings of slurm/dpo_7b.sh (LR,
# PAIRS_PER_STEP, EPOCHS, BETA, DPO_LOSS, …; the paper's by default), the launch settings of train_7b.sh,
# and the evaluation ones of sweep_weights.sh (EVAL_POSIX, EVAL_TASKS, EVAL_ALPACA_EVAL, EVAL_MT_BENCH, …,
# EVAL_SBATCH_ARGS, REPORT_SBATCH_ARGS). The SFT sweep's own EVAL_DATA, OUTPUT and weights are not used.
#
#SBATCH --job-name=wit-dpo-sweep
#SBATCH --array=0-34%8
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
## Site-specific: uncomment and fill in.
##SBATCH --partition=gpu
##SBATCH --account=my-project
set -euo pipefail

die() { echo "sweep_dpo.sh: $*" >&2; exit 2; }
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ] && [ $# -ge 2 ] && [ "${1#-}" = "$1" ]; then
    SWEEP_DIR=$1 PREF_DATA=$2
    shift 2
fi
[ -n "${SWEEP_DIR:-}" ] || die "give the SFT sweep directory: bash slurm/sweep_dpo.sh SWEEP_DIR PREF_DATA"
[ -n "${PREF_DATA:-}" ] || die "give the packed preference data: bash slurm/sweep_dpo.sh SWEEP_DIR PREF_DATA"
SWEEP_DIR=$(cd "$SWEEP_DIR" 2>/dev/null && pwd) || die "$SWEEP_DIR: no such directory"
PREF_DATA=$(cd "$PREF_DATA" 2>/dev/null && pwd) || die "$PREF_DATA: no such directory"
DPO_DIR=$SWEEP_DIR/dpo
export SWEEP_DIR PREF_DATA

# wants_eval, submit_followups: the evaluation array and the report job after the training array
# shellcheck source=slurm/followups.sh
source "${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/followups.sh"

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    # Submit mode: one DPO task per SFT cell, in the SFT array's order (so that aftercorr pairs task k with k).
    [ -n "${SLURM_JOB_ID:-}" ] && die "submit it as an array (sbatch) or run it with bash"
    [ -f "$SWEEP_DIR/cells.txt" ] || die "$SWEEP_DIR/cells.txt is missing: not a sweep of slurm/sweep_weights.sh"
    [ -f "$PREF_DATA/manifest.json" ] || die "$PREF_DATA is not a packed dataset (tools/pack_dataset.py --task preference)"
    mapfile -t CELLS < "$SWEEP_DIR/cells.txt"
    [ "${#CELLS[@]}" -gt 0 ] || die "$SWEEP_DIR/cells.txt lists no cells"
    mkdir -p "$DPO_DIR" logs
    cp "$SWEEP_DIR/cells.txt" "$DPO_DIR/cells.txt"
    SHARED=()
    for flag in "$@"; do [ "$flag" = --parsable ] || SHARED+=("$flag"); done
    AFTER=()
    [ -z "${AFTER_SFT:-}" ] || AFTER=(--dependency="aftercorr:$AFTER_SFT" --kill-on-invalid-dep=yes)
    # Held until its evaluation and report jobs are queued: no cell can finish before its dependent exists.
    dpo_id=$(sbatch --parsable --hold --array="0-$((${#CELLS[@]} - 1))%${MAX_PARALLEL:-8}" "${AFTER[@]}" "${SHARED[@]}" "$0")
    dpo_id=${dpo_id%%;*}
    touch "$DPO_DIR/.followups-$dpo_id"            # the DPO tasks must not submit them again
    followups=$(submit_followups "$dpo_id" "$DPO_DIR" wit-dpo "${SHARED[@]}") || followups=""
    scontrol release "$dpo_id"
    [ -n "$followups" ] || { echo "sweep_dpo.sh: DPO array $dpo_id submitted, but not its evaluation/report jobs" >&2; exit 1; }
    read -r eval_id report_id <<<"$followups"
    if [[ " $* " == *" --parsable "* ]]; then
        printf '%s\n%s\n%s\n' "$dpo_id" "$eval_id" "$report_id"
    else
        echo "Submitted DPO array $dpo_id (${#CELLS[@]} cells, $DPO_DIR/lp<λp>_lr<λr>)${AFTER_SFT:+, each after its SFT task of $AFTER_SFT}"
        [ "$eval_id" = - ] || echo "Submitted evaluation array $eval_id (each DPO cell after its run: aftercorr)"
        echo "Submitted report job $report_id: $SWEEP_DIR/sweep_report.md (section WIT → DPO), sweep_dpo_figure.png"
    fi
    exit 0
fi

# sbatch mode: the first task to start lists the cells and submits the followers (once, across requeues).
mkdir -p "$DPO_DIR"
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ ! -e "$DPO_DIR/.followups-$SLURM_ARRAY_JOB_ID" ] &&
    mkdir "$DPO_DIR/.followups-$SLURM_ARRAY_JOB_ID.lock" 2>/dev/null; then
    cp "$SWEEP_DIR/cells.txt" "$DPO_DIR/cells.txt"
    mapfile -t CELLS < "$DPO_DIR/cells.txt"
    if followups=$(submit_followups "$SLURM_ARRAY_JOB_ID" "$DPO_DIR" wit-dpo); then
        echo "[witscale-slurm] submitted evaluation array and report job: $followups"
    else
        echo "[witscale-slurm] warning: could not submit the evaluation/report jobs" >&2
    fi
fi
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -f "$DPO_DIR/cells.txt" ] && break; sleep 1; done   # another task writes it
[ -f "$DPO_DIR/cells.txt" ] || die "$DPO_DIR/cells.txt is missing"
mapfile -t CELLS < "$DPO_DIR/cells.txt"
[ "$SLURM_ARRAY_TASK_ID" -lt "${#CELLS[@]}" ] || die "array task $SLURM_ARRAY_TASK_ID but only ${#CELLS[@]} cells"

read -r PW RW <<<"${CELLS[$SLURM_ARRAY_TASK_ID]}"
NAME=lp${PW}_lr${RW}
OUTPUT=$DPO_DIR/$NAME
MODEL=$SWEEP_DIR/$NAME/hf                   # the SFT cell's export: the policy's start and the reference
EXPORT_HF=$OUTPUT/hf
mkdir -p "$OUTPUT"
printf '{"prompt_weight": %s, "response_weight": %s, "objective": "dpo", "sft_model": %s}\n' "$PW" "$RW" \
    "$(wit_json_string "$MODEL")" >"$OUTPUT/cell.json"
# The SFT cell's λ name the cell; DPO itself uses the standard mask (DPO_PROMPT_WEIGHT/DPO_RESPONSE_WEIGHT).
PROMPT_WEIGHT=${DPO_PROMPT_WEIGHT:-0} RESPONSE_WEIGHT=${DPO_RESPONSE_WEIGHT:-1}
unset MODEL_CONFIG DATA EVAL_DATA
[ -z "${PREF_EVAL_DATA:-}" ] || PREF_EVAL_DATA=$(cd "$PREF_EVAL_DATA" && pwd)
export OUTPUT MODEL EXPORT_HF PROMPT_WEIGHT RESPONSE_WEIGHT
export WITSCALE_SIGNAL_LEAD_S=300        # = #SBATCH --signal=B:USR1@300 (the trainer compares its save time with it)

# train_status.json on exit: how this task ended, for tools/collect_sweep.py (slurm/followups.sh)
trap write_train_status EXIT

[ -f "$MODEL/config.json" ] || { echo "sweep_dpo.sh: no exported SFT model in $MODEL (has its training finished?)" >&2; exit 3; }
# shellcheck source=slurm/common.sh
source "${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
# shellcheck source=slurm/dpo_common.sh
source "${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/dpo_common.sh"
wit_dpo_main
