#!/usr/bin/env bash
# witscale: evaluate the cells of a (λp, λr) sweep, one array task per cell — POSIX, lm-eval benchmarks and
# judge-benchmark generations of the cell's exported model ($SWEEP_DIR/lp<λp>_lr<λr>/hf) into the cell's
# eval_results.json (tools/evaluate.py). slurm/sweep_weights.sh submits it with
# --dependency=aftercorr:<training array>, so each cell is evaluated as soon as ITS training has finished
# (and never if it failed: --kill-on-invalid-dep=yes cancels that task). By hand:
#
#   mkdir -p logs
#   SWEEP_DIR=runs/sweep EVAL_POSIX=prompts.jsonl EVAL_TASKS=mmlu,bbh,ifeval \
#       sbatch --array=0-34 --dependency=aftercorr:<train job id> --kill-on-invalid-dep=yes slurm/evaluate_cell.sh
#
# The cells are the lines of $SWEEP_DIR/cells.txt ("λp λr", in array-index order; written by sweep_weights.sh).
# Settings (environment):
#   EVAL_POSIX            prompt sets or single prompts (JSONL) for POSIX; EVAL_POSIX_KINDS (spelling,template)
#   EVAL_MAX_NEW_TOKENS   POSIX response length bound (default 64)
#   EVAL_TASKS            lm-eval task names (comma-separated); EVAL_INCLUDE_PATH: local task YAMLs
#   EVAL_ALPACA_EVAL      AlpacaEval's evaluation set → <cell>/alpaca_eval/model_outputs.json
#   EVAL_MT_BENCH         MT-Bench's question.jsonl → <cell>/mt_bench/model_answer/<cell>.jsonl
#   EVAL_TEMPLATE         the packer's template of the training data (default: the one the export recorded
#                         in hf/witscale.json, else plain; a different one is used with a warning)
#   EVAL_LIMIT            only the first N prompt sets / documents (quick looks)
#   EVAL_NPROC            data-parallel ranks (default: the GPUs Slurm gave the job, else 1)
#   EVAL_ARGS             more tools/evaluate.py flags, e.g. "--backend vllm --dtype bf16"
#   PYTHON WITSCALE_HOME WITSCALE_SITE_ENV   as for training
# Writes <cell>/eval_status.json ({"state": "completed"|"failed", "exit_code", "job"}) at the end, which
# tools/collect_sweep.py reads to tell a failed evaluation from one that has not run.
#
#SBATCH --job-name=wit-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=8:00:00
#SBATCH --output=logs/%x-%A_%a.out
## Site-specific: uncomment and fill in.
##SBATCH --partition=gpu
##SBATCH --account=my-project
set -euo pipefail

: "${SWEEP_DIR:?set SWEEP_DIR to the sweep directory}"
: "${WITSCALE_HOME:=${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$WITSCALE_HOME" || { echo "evaluate_cell.sh: cannot cd to $WITSCALE_HOME" >&2; exit 2; }
: "${WITSCALE_SITE_ENV:=$WITSCALE_HOME/slurm/site_env.sh}"
if [ -f "$WITSCALE_SITE_ENV" ]; then
    # shellcheck source=slurm/site_env.sh
    source "$WITSCALE_SITE_ENV"
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$WITSCALE_HOME/.venv/bin/python" ]; then PYTHON=$WITSCALE_HOME/.venv/bin/python; else PYTHON=python3; fi
fi

log() { echo "[witscale-eval $(date +%H:%M:%S)] $*"; }

task=${SLURM_ARRAY_TASK_ID:?submit as an array: one task per line of \$SWEEP_DIR/cells.txt}
[ -f "$SWEEP_DIR/cells.txt" ] || { echo "evaluate_cell.sh: $SWEEP_DIR/cells.txt is missing" >&2; exit 2; }
mapfile -t CELLS < "$SWEEP_DIR/cells.txt"
[ "$task" -lt "${#CELLS[@]}" ] || { echo "evaluate_cell.sh: array task $task but ${#CELLS[@]} cells" >&2; exit 2; }
read -r PW RW <<<"${CELLS[$task]}"
CELL=$SWEEP_DIR/lp${PW}_lr${RW}
mkdir -p "$CELL"

write_status() {
    local rc=$?
    local state=completed
    [ "$rc" -eq 0 ] || state=failed
    printf '{"state": "%s", "exit_code": %d, "job": "%s"}\n' "$state" "$rc" \
        "${SLURM_ARRAY_JOB_ID:-?}_${SLURM_ARRAY_TASK_ID:-?}" >"$CELL/eval_status.json"
    log "evaluation of $CELL $state (exit $rc)"
}
trap write_status EXIT

[ -f "$CELL/hf/config.json" ] || { log "no exported model in $CELL/hf (did training export it?)"; exit 3; }

ARGS=(tools/evaluate.py --model "$CELL/hf" --output "$CELL" --no-progress)
[ -z "${EVAL_TEMPLATE:-}" ] || ARGS+=(--template "$EVAL_TEMPLATE")
[ -z "${EVAL_POSIX:-}" ] || ARGS+=(--posix "$EVAL_POSIX" --posix-kinds "${EVAL_POSIX_KINDS:-spelling,template}"
                                  --max-new-tokens "${EVAL_MAX_NEW_TOKENS:-64}")
[ -z "${EVAL_TASKS:-}" ] || ARGS+=(--tasks "$EVAL_TASKS")
[ -z "${EVAL_INCLUDE_PATH:-}" ] || ARGS+=(--include-path "$EVAL_INCLUDE_PATH")
[ -z "${EVAL_ALPACA_EVAL:-}" ] || ARGS+=(--alpaca-eval "$EVAL_ALPACA_EVAL")
[ -z "${EVAL_MT_BENCH:-}" ] || ARGS+=(--mt-bench "$EVAL_MT_BENCH")
[ -z "${EVAL_LIMIT:-}" ] || ARGS+=(--limit "$EVAL_LIMIT")
read -r -a EXTRA <<<"${EVAL_ARGS:-}"
ARGS+=("${EXTRA[@]}")

NPROC=${EVAL_NPROC:-${SLURM_GPUS_ON_NODE:-1}}
log "cell $CELL (λp=$PW, λr=$RW), job ${SLURM_ARRAY_JOB_ID:-?}_$task on ${SLURM_JOB_NODELIST:-?}, $NPROC rank(s)"
if [ "$NPROC" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "${ARGS[@]}"
else
    "$PYTHON" "${ARGS[@]}"
fi
