#!/usr/bin/env bash
# witscale: the (λp, λr) sweep of the paper as Slurm job arrays, end to end — one packed dataset, one training
# run per cell (each cell in $SWEEP_DIR/lp<λp>_lr<λr>, its model exported to <cell>/hf), then one evaluation
# per cell that starts as soon as that cell's training has finished (slurm/evaluate_cell.sh, an array with
# --dependency=aftercorr on the training array), then the report (tools/collect_sweep.py: every metric of
# every cell, heatmaps, average and gains over (0, 1)) once every evaluation has ended.
#
#   mkdir -p logs
#   WEIGHTS="0:1 0.2:1 1:1" DATA=… MODEL=… SWEEP_DIR=runs/sweep EVAL_POSIX=prompts.jsonl EVAL_TASKS=mmlu,bbh \
#       bash slurm/sweep_weights.sh [sbatch flags]
#       run with bash (not sbatch): computes the cells, submits the training array of the right size, the
#       evaluation array and the report job, and prints their ids
#   DATA=packed/alpaca MODEL=/models/llama-2-7b SWEEP_DIR=runs/sweep sbatch slurm/sweep_weights.sh
#       the paper's grid {0, 0.2, …, 1}² without (0, 0): 35 cells, array 0-34; the first task to start submits
#       the evaluation array and the report job (once)
#
# WEIGHTS: cells as "λp:λr" separated by spaces (default: the paper's grid). MAX_PARALLEL (bash mode):
# at most this many cells at once (default 8). Every other variable as in slurm/train_7b.sh; OUTPUT,
# PROMPT_WEIGHT, RESPONSE_WEIGHT and EXPORT_HF (<cell>/hf) are set per cell. A preempted cell requeues itself
# alone (scontrol requeue ARRAYJOB_TASK) and resumes from its own checkpoint; its evaluation waits for it.
# Each training task writes <cell>/train_status.json (completed | failed | requeued, exit code) as it ends.
#
# Evaluation (slurm/evaluate_cell.sh; submitted when any of these is set): EVAL_POSIX, EVAL_TASKS,
# EVAL_ALPACA_EVAL, EVAL_MT_BENCH, with EVAL_INCLUDE_PATH, EVAL_TEMPLATE, EVAL_LIMIT, EVAL_NPROC, EVAL_ARGS …
# (see that script). EVAL_SBATCH_ARGS / REPORT_SBATCH_ARGS: sbatch flags for those jobs only, after the
# shared ones (given flags override earlier ones). The report lands in $SWEEP_DIR/sweep_report.md and
# sweep_figure.png.
#
#SBATCH --job-name=wit-sweep
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

# Canonical spelling of a weight for directory names: 1 -> 1.0, 0.20 -> 0.2, 0.25 -> 0.25.
fmt_weight() {
    awk -v x="$1" 'BEGIN { if (x !~ /^[0-9]*\.?[0-9]+$/) exit 1; s = sprintf("%.6f", x + 0); sub(/0+$/, "", s);
                           if (s ~ /\.$/) s = s "0"; print s }' ||
        { echo "sweep_weights.sh: bad weight '$1' (want a number >= 0)" >&2; exit 2; }
}

# The cells, one "λp λr" per line, in array-index order.
sweep_cells() {
    local cell p r cells
    if [ -n "${WEIGHTS:-}" ]; then
        read -r -a cells <<<"$WEIGHTS"          # split on whitespace, never globbed
        for cell in "${cells[@]}"; do
            case "$cell" in *:*) ;; *) echo "sweep_weights.sh: WEIGHTS cell '$cell' is not λp:λr" >&2; exit 2 ;; esac
            p=$(fmt_weight "${cell%%:*}") || exit 2
            r=$(fmt_weight "${cell#*:}") || exit 2
            echo "$p $r"
        done
    else
        for p in 0 0.2 0.4 0.6 0.8 1; do
            for r in 0 0.2 0.4 0.6 0.8 1; do
                [ "$p" = 0 ] && [ "$r" = 0 ] && continue   # (0, 0) is the untrained base model
                echo "$(fmt_weight "$p") $(fmt_weight "$r")"
            done
        done
    fi
}

: "${SWEEP_DIR:?set SWEEP_DIR to the sweep directory}"
# (not `< <(sweep_cells)`: a bad cell must stop the script, not just the process substitution)
cell_lines=$(sweep_cells) || exit 2
mapfile -t CELLS <<<"$cell_lines"
[ -n "$cell_lines" ] || { echo "sweep_weights.sh: no cells" >&2; exit 2; }

# wants_eval, submit_followups: the evaluation array and the report job after the training array
# shellcheck source=slurm/followups.sh
source "${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/followups.sh"

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    # Submit mode: an array exactly as large as the cell list (sbatch flags given here take precedence),
    # then the evaluation array and the report job.
    [ -n "${SLURM_JOB_ID:-}" ] && { echo "sweep_weights.sh: submit it as an array (sbatch) or run it with bash" >&2; exit 2; }
    mkdir -p "$SWEEP_DIR" logs
    printf '%s\n' "${CELLS[@]}" >"$SWEEP_DIR/cells.txt"
    SHARED=()
    for flag in "$@"; do [ "$flag" = --parsable ] || SHARED+=("$flag"); done
    # Held until its evaluation and report jobs are queued: no cell can finish before its dependent exists.
    train_id=$(sbatch --parsable --hold --array="0-$((${#CELLS[@]} - 1))%${MAX_PARALLEL:-8}" "${SHARED[@]}" "$0")
    train_id=${train_id%%;*}
    touch "$SWEEP_DIR/.followups-$train_id"            # the training tasks must not submit them again
    followups=$(submit_followups "$train_id" "$SWEEP_DIR" wit "${SHARED[@]}") || followups=""
    scontrol release "$train_id"
    if [ -z "$followups" ]; then
        echo "sweep_weights.sh: training array $train_id submitted, but not its evaluation/report jobs: submit" \
             "slurm/evaluate_cell.sh by hand (see its header)" >&2
        exit 1
    fi
    read -r eval_id report_id <<<"$followups"
    if [[ " $* " == *" --parsable "* ]]; then
        printf '%s\n%s\n%s\n' "$train_id" "$eval_id" "$report_id"
    else
        echo "Submitted training array $train_id (${#CELLS[@]} cells, $SWEEP_DIR/lp<λp>_lr<λr>)"
        [ "$eval_id" = - ] || echo "Submitted evaluation array $eval_id (each cell after its training: aftercorr)"
        echo "Submitted report job $report_id (after all of them): $SWEEP_DIR/sweep_report.md, sweep_figure.png"
    fi
    exit 0
fi

if [ "$SLURM_ARRAY_TASK_ID" -ge "${#CELLS[@]}" ]; then
    echo "sweep_weights.sh: array task $SLURM_ARRAY_TASK_ID but only ${#CELLS[@]} cells (WEIGHTS='${WEIGHTS:-}'); nothing to do" >&2
    exit 2
fi
# sbatch mode: the first task to start submits the evaluation array and the report job for this array
# (bash mode did it already and left the marker; mkdir is atomic: one task does it, once, across requeues).
mkdir -p "$SWEEP_DIR"
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ ! -e "$SWEEP_DIR/.followups-$SLURM_ARRAY_JOB_ID" ] &&
    mkdir "$SWEEP_DIR/.followups-$SLURM_ARRAY_JOB_ID.lock" 2>/dev/null; then
    printf '%s\n' "${CELLS[@]}" >"$SWEEP_DIR/cells.txt"
    if followups=$(submit_followups "$SLURM_ARRAY_JOB_ID" "$SWEEP_DIR" wit); then
        echo "[witscale-slurm] submitted evaluation array and report job: $followups"
    else
        echo "[witscale-slurm] warning: could not submit the evaluation/report jobs" >&2
    fi
fi

read -r PROMPT_WEIGHT RESPONSE_WEIGHT <<<"${CELLS[$SLURM_ARRAY_TASK_ID]}"
OUTPUT=$SWEEP_DIR/lp${PROMPT_WEIGHT}_lr${RESPONSE_WEIGHT}
mkdir -p "$OUTPUT"
printf '{"prompt_weight": %s, "response_weight": %s}\n' "$PROMPT_WEIGHT" "$RESPONSE_WEIGHT" >"$OUTPUT/cell.json"
: "${DS_CONFIG:=ds_configs/zero3.json}"
[ -n "${MAX_STEPS:-}${EPOCHS:-}" ] || EPOCHS=3
EXPORT_HF=$OUTPUT/hf                  # per cell (a shared EXPORT_HF would be overwritten by every cell)
export PROMPT_WEIGHT RESPONSE_WEIGHT OUTPUT DS_CONFIG EPOCHS EXPORT_HF
export WITSCALE_SIGNAL_LEAD_S=300        # = #SBATCH --signal=B:USR1@300 (the trainer compares its save time with it)

# train_status.json on exit: how this task ended, for tools/collect_sweep.py (slurm/followups.sh)
trap write_train_status EXIT

# shellcheck source=slurm/common.sh
source "${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
wit_main
