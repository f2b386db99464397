#!/usr/bin/env bash
# witscale: the (λp, λr) sweep of the paper as a Slurm job array — one packed dataset, one run per cell,
# each cell in $SWEEP_DIR/lp<λp>_lr<λr>. Then: python tools/collect_sweep.py $SWEEP_DIR
#
#   mkdir -p logs
#   DATA=packed/alpaca MODEL=/models/llama-2-7b SWEEP_DIR=runs/sweep sbatch slurm/sweep_weights.sh
#       the paper's grid {0, 0.2, …, 1}² without (0, 0): 35 cells, array 0-34
#   WEIGHTS="0:1 0.2:1 1:1" DATA=… MODEL=… SWEEP_DIR=… bash slurm/sweep_weights.sh [sbatch flags]
#       run with bash (not sbatch) it computes the cells and submits the array of the right size itself
#
# WEIGHTS: cells as "λp:λr" separated by spaces (default: the paper's grid). MAX_PARALLEL (bash mode):
# at most this many cells at once (default 8). Every other variable as in slurm/train_7b.sh; OUTPUT,
# PROMPT_WEIGHT and RESPONSE_WEIGHT are set per cell. A preempted cell requeues itself alone
# (scontrol requeue ARRAYJOB_TASK) and resumes from its own checkpoint.
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
    local cell p r
    if [ -n "${WEIGHTS:-}" ]; then
        for cell in $WEIGHTS; do
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
mapfile -t CELLS < <(sweep_cells)
[ "${#CELLS[@]}" -gt 0 ] || { echo "sweep_weights.sh: no cells" >&2; exit 2; }

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    # Submit mode: an array exactly as large as the cell list (sbatch flags given here take precedence).
    [ -n "${SLURM_JOB_ID:-}" ] && { echo "sweep_weights.sh: submit it as an array (sbatch) or run it with bash" >&2; exit 2; }
    mkdir -p "$SWEEP_DIR" logs
    printf '%s\n' "${CELLS[@]}" >"$SWEEP_DIR/cells.txt"
    exec sbatch --array="0-$((${#CELLS[@]} - 1))%${MAX_PARALLEL:-8}" "$@" "$0"
fi

if [ "$SLURM_ARRAY_TASK_ID" -ge "${#CELLS[@]}" ]; then
    echo "sweep_weights.sh: array task $SLURM_ARRAY_TASK_ID but only ${#CELLS[@]} cells (WEIGHTS='${WEIGHTS:-}'); nothing to do" >&2
    exit 2
fi
read -r PROMPT_WEIGHT RESPONSE_WEIGHT <<<"${CELLS[$SLURM_ARRAY_TASK_ID]}"
OUTPUT=$SWEEP_DIR/lp${PROMPT_WEIGHT}_lr${RESPONSE_WEIGHT}
mkdir -p "$OUTPUT"
printf '{"prompt_weight": %s, "response_weight": %s}\n' "$PROMPT_WEIGHT" "$RESPONSE_WEIGHT" >"$OUTPUT/cell.json"
: "${DS_CONFIG:=ds_configs/zero3.json}"
[ -n "${MAX_STEPS:-}${EPOCHS:-}" ] || EPOCHS=3
export PROMPT_WEIGHT RESPONSE_WEIGHT OUTPUT DS_CONFIG EPOCHS

# shellcheck source=slurm/common.sh
source "${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
wit_main
