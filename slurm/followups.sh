# shellcheck shell=bash
# Shared by slurm/sweep_weights.sh and slurm/sweep_dpo.sh (sourced before slurm/common.sh): in submit mode the
# jobs that follow a sweep's training array — the evaluation array, task k after training task k (aftercorr),
# when any evaluation input is set, and the report job (tools/collect_sweep.py) after everything (afterany);
# in task mode the task's status file.

# A sweep task's EXIT trap (task mode; wit_run_finished comes from slurm/common.sh, sourced by then whenever
# the exit status is 0): $OUTPUT/train_status.json says how the task ended, for tools/collect_sweep.py —
# completed (the run reached its last step), requeued (preempted: checkpointed, exit 0, back in the queue) or
# failed (its exit code).
# shellcheck disable=SC2317  # invoked by the EXIT trap
write_train_status() {
    local rc=$? state=failed
    if [ "$rc" -eq 0 ]; then
        if wit_run_finished; then state=completed; else state=requeued; fi
    fi
    printf '{"state": "%s", "exit_code": %d, "job": "%s", "restart": %s}\n' "$state" "$rc" \
        "${SLURM_ARRAY_JOB_ID:-?}_${SLURM_ARRAY_TASK_ID:-?}" "${SLURM_RESTART_COUNT:-0}" >"$OUTPUT/train_status.json"
}

# A JSON string of $1 (for the small JSON files the templates write: a path may hold quotes or backslashes).
wit_json_string() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    printf '"%s"' "$s"
}

# Evaluation requested? (any input for slurm/evaluate_cell.sh)
wants_eval() { [ -n "${EVAL_POSIX:-}${EVAL_TASKS:-}${EVAL_ALPACA_EVAL:-}${EVAL_MT_BENCH:-}" ]; }

# submit_followups TRAIN_ARRAY_ID CELLS_DIR JOB_PREFIX [sbatch flags...]
#   CELLS_DIR: the directory whose cells.txt the evaluation array walks (evaluate_cell.sh's SWEEP_DIR);
#   the report always covers $SWEEP_DIR (the SFT sweep: it shows a DPO grid under it beside the SFT one).
#   Uses CELLS (the array's cells) and MAX_PARALLEL. Prints "<eval id or -> <report id>". The report job is
#   slurm/sweep_report.sh with the checkout, the Python and the sweep directory as its arguments.
submit_followups() {
    local train=$1 cells_dir=$2 prefix=$3 home py eval_id="" report_dep report_id
    shift 3
    home=${WITSCALE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    py=${PYTHON:-}
    [ -n "$py" ] || { if [ -x "$home/.venv/bin/python" ]; then py=$home/.venv/bin/python; else py=python3; fi; }
    local -a eval_args report_args
    read -r -a eval_args <<<"${EVAL_SBATCH_ARGS:-}"
    read -r -a report_args <<<"${REPORT_SBATCH_ARGS:-}"
    report_dep=afterany:$train
    if wants_eval; then
        eval_id=$(SWEEP_DIR=$cells_dir sbatch --parsable --job-name="$prefix-eval" \
            --array="0-$((${#CELLS[@]} - 1))%${MAX_PARALLEL:-8}" \
            --dependency="aftercorr:$train" --kill-on-invalid-dep=yes "$@" "${eval_args[@]}" \
            "$home/slurm/evaluate_cell.sh") || { echo "$prefix: submitting the evaluation failed" >&2; return 1; }
        eval_id=${eval_id%%;*}
        report_dep=$report_dep:$eval_id
    fi
    # the values travel as the script's arguments, never inside a string a shell parses again (--wrap "…")
    report_id=$(sbatch --parsable --job-name="$prefix-report" --dependency="$report_dep" --nodes=1 --ntasks=1 \
        --time=0:30:00 --output=logs/%x-%j.out "$@" "${report_args[@]}" "$home/slurm/sweep_report.sh" "$home" "$py" "$SWEEP_DIR") ||
        { echo "$prefix: submitting the report job failed" >&2; return 1; }
    echo "${eval_id:--} ${report_id%%;*}"
}
