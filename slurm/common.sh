# shellcheck shell=bash
# Shared logic of the witscale sbatch templates (train_7b.sh, train_70b.sh, sweep_weights.sh), sourced by
# them inside the batch job. It:
#   - sources the site environment (NCCL, modules…): $WITSCALE_SITE_ENV, default slurm/site_env.sh;
#   - derives the rendezvous from the allocation: head node = first of `scontrol show hostnames`,
#     its NodeAddr as MASTER_ADDR, a port derived from the job id;
#   - runs the universal-checkpoint conversion a resume at another layout needs as a job step of its own, before
#     the training step (wit_convert_layout);
#   - starts ONE launcher per node (torchrun or the deepspeed launcher, with srun --ntasks=$SLURM_NNODES
#     --ntasks-per-node=1) or one task per GPU (srun, srun --mpi, mpirun);
#   - turns Slurm's preemption warning (USR1 to the batch shell: #SBATCH --signal=B:USR1@…) into a
#     checkpoint (the trainer checkpoints and exits 0 on USR1/TERM) and requeues the job, unless the run
#     had finished anyway.
#
# Every setting is an environment variable with a default (see wit_defaults); sbatch exports the
# submitting shell's environment, so `DATA=… OUTPUT=… sbatch slurm/train_7b.sh` overrides them.

wit_log() { echo "[witscale-slurm $(date +%H:%M:%S)] $*"; }
wit_die() { echo "[witscale-slurm] error: $*" >&2; exit 2; }

# The job's own id for scontrol/scancel: inside an array, requeue must name ARRAYJOB_TASK
# (requeueing $SLURM_JOB_ID of a task does not work on Slurm 22.05).
wit_job_ref() {
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "${SLURM_JOB_ID}"
    fi
}

# Die unless each named variable holds a whole number. Bash evaluates a variable used in $(( )) as an
# arithmetic expression, and `a[$(cmd)]` there runs cmd: every value that reaches arithmetic is checked first.
wit_require_int() {
    local name
    for name in "$@"; do
        case "${!name:-}" in
            '' | *[!0-9]*) wit_die "$name='${!name:-}': expected a whole number" ;;
        esac
    done
}

wit_defaults() {
    : "${WITSCALE_HOME:=${SLURM_SUBMIT_DIR:-$PWD}}"
    [ -f "$WITSCALE_HOME/witscale/train.py" ] ||
        wit_die "WITSCALE_HOME=$WITSCALE_HOME is not a witscale checkout (submit from the repository root or set WITSCALE_HOME)"
    cd "$WITSCALE_HOME" || wit_die "cannot cd to $WITSCALE_HOME"

    : "${WITSCALE_SITE_ENV:=$WITSCALE_HOME/slurm/site_env.sh}"
    if [ -f "$WITSCALE_SITE_ENV" ]; then
        # shellcheck source=slurm/site_env.sh
        source "$WITSCALE_SITE_ENV"
    fi

    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$WITSCALE_HOME/.venv/bin/python" ]; then PYTHON=$WITSCALE_HOME/.venv/bin/python; else PYTHON=python3; fi
    fi
    : "${LAUNCHER:=torchrun}"          # torchrun | deepspeed | srun | srun-mpi | mpirun
    : "${SRUN_MPI:=pmix}"              # plugin for LAUNCHER=srun-mpi (`srun --mpi=list`)
    : "${NNODES:=${SLURM_NNODES:-1}}"
    wit_accelerator
    : "${NPROC_PER_NODE:=$(wit_nproc_per_node)}"
    [ -n "$NPROC_PER_NODE" ] || exit 2        # wit_nproc_per_node said why
    : "${DS_CONFIG:=ds_configs/zero3.json}"
    : "${PROMPT_WEIGHT:=0}"
    : "${RESPONSE_WEIGHT:=1}"
    : "${NORMALIZATION:=nonzero}"
    : "${MICRO_BATCH:=1}"
    : "${LR:=2e-5}"
    : "${SEED:=0}"
    : "${SAVE_STEPS:=200}"
    : "${TP:=1}"
    : "${PP:=1}"
    : "${SP:=1}"                           # --sp: Ulysses sequence parallelism (README "Sequence parallelism")
    : "${EXTRA_ARGS:=}"
    : "${RESUME:=auto}"
    : "${ACTIVATION_CHECKPOINTING:=auto}"  # auto | on | off | offload (auto: where the planner says it is needed; 70B template: on)
    [ -n "${DATA:-}" ] || wit_die "set DATA to a packed dataset directory (tools/pack_dataset.py)"
    if [ -z "${OUTPUT:-}" ] && [ -n "${SCRATCH:-}" ]; then
        OUTPUT=$SCRATCH/${USER:-$(id -un)}/witscale/${SLURM_JOB_NAME:-run}-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}
    fi
    [ -n "${OUTPUT:-}" ] || wit_die "set OUTPUT to the run directory (on a scratch filesystem: checkpoints are large; \$SCRATCH/\$USER/witscale/<job> is the default where \$SCRATCH is set)"
    # A 70B run writes 2-3 TB (two kept checkpoints): never by default into a home directory (quota, backups).
    if [ "${WIT_LARGE_OUTPUT:-0}" = 1 ] && [ "${WITSCALE_ALLOW_HOME_OUTPUT:-0}" != 1 ] && [ -n "${HOME:-}" ]; then
        case "$(realpath -m "$OUTPUT")/" in
            "$(realpath -m "$HOME")"/*) wit_die "OUTPUT=$OUTPUT is under \$HOME: a 70B run writes 2-3 TB of checkpoints; put it on scratch (OUTPUT=\$SCRATCH/…) or set WITSCALE_ALLOW_HOME_OUTPUT=1" ;;
        esac
    fi
    [ -n "${MODEL:-}${MODEL_CONFIG:-}" ] || wit_die "set MODEL (HF directory) or MODEL_CONFIG (config.json, random init)"
    : "${GLOBAL_BATCH:=64}"
    wit_require_int NNODES NPROC_PER_NODE TP PP SP MICRO_BATCH GLOBAL_BATCH
    if [ -z "${GRAD_ACCUM:-}" ] && [ -z "${PAIRS_PER_STEP:-}" ]; then
        # The paper's effective batch of GLOBAL_BATCH sequences: micro × accum × data-parallel ranks.
        # (DPO's PAIRS_PER_STEP leaves it to the trainer, which knows the data's pairs per row.)
        if [ "$TP" -lt 1 ] || [ "$PP" -lt 1 ] || [ "$SP" -lt 1 ] || [ "$MICRO_BATCH" -lt 1 ]; then
            wit_die "TP, PP, SP and MICRO_BATCH must be >= 1"
        fi
        # sp ranks share each row: the data-parallel ranks are world / (tp × pp × sp)
        local dp=$((NNODES * NPROC_PER_NODE / (TP * PP * SP)))
        [ "$dp" -ge 1 ] || wit_die "TP=$TP × PP=$PP × SP=$SP exceeds the $((NNODES * NPROC_PER_NODE)) ranks"
        GRAD_ACCUM=$((GLOBAL_BATCH / (MICRO_BATCH * dp)))
        [ "$GRAD_ACCUM" -ge 1 ] || GRAD_ACCUM=1
    fi

    # Rendezvous from the allocation. NodeAddr is the address Slurm itself reaches the node on; it is
    # the hostname on most clusters.
    if [ -z "${MASTER_ADDR:-}" ]; then
        local head
        head=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" | head -n 1)
        MASTER_ADDR=$(scontrol show node "$head" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
        : "${MASTER_ADDR:=$head}"
    fi
    # DeepSpeed's FusedAdam JIT-builds into a per-job, node-local directory: no torch FileBaton lock shared
    # with other jobs (a killed build's lock stalls every later one), no NFS. The trainer builds it before the
    # model loads, bounded by WITSCALE_EXT_BUILD_TIMEOUT_S; DS_BUILD_FUSED_ADAM=1 at install time skips it.
    : "${TORCH_EXTENSIONS_DIR:=${TMPDIR:-/tmp}/witscale-ext-${SLURM_JOB_ID:-$$}}"
    export TORCH_EXTENSIONS_DIR
    # A port per job, so that jobs sharing a node do not collide (an array's tasks have distinct ids), in
    # 20000-32767: below Linux's ephemeral range (32768-60999, net.ipv4.ip_local_port_range), from which the
    # kernel hands out the source ports of outgoing connections (NCCL, gloo, the store) — a port there may be
    # taken by one of them when the store binds.
    local job_id=${SLURM_JOB_ID:-0}
    case "$job_id" in '' | *[!0-9]*) job_id=0 ;; esac
    : "${MASTER_PORT:=$((20000 + job_id % 12768))}"
    export WITSCALE_HOME PYTHON LAUNCHER NNODES NPROC_PER_NODE MASTER_ADDR MASTER_PORT
}

# DS_ACCELERATOR=cpu only where this node has no GPU: none allocated by Slurm and none that torch sees (a
# missing nvidia-smi on the batch shell's PATH says nothing). DeepSpeed picks CUDA by itself otherwise.
wit_accelerator() {
    [ -z "${DS_ACCELERATOR:-}" ] || return 0
    if [ "${SLURM_GPUS_ON_NODE:-0}" != 0 ] || { [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]; }; then
        return 0
    fi
    if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" != True ]; then
        export DS_ACCELERATOR=cpu
    fi
}

# Ranks per node: one per allocated GPU — SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("8", "h100:8"), else
# the devices in CUDA_VISIBLE_DEVICES; 1 on a CPU node (DS_ACCELERATOR=cpu). A GPU job that shows none of
# these is refused in one line rather than started with one rank per node.
wit_nproc_per_node() {
    local n=${SLURM_GPUS_ON_NODE:-}
    if [ -z "$n" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then n=${SLURM_GPUS_PER_NODE##*:}; fi
    if [ -z "$n" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]; then
        n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    fi
    if [ -z "$n" ] && [ "${DS_ACCELERATOR:-}" = cpu ]; then n=1; fi
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "[witscale-slurm] error: cannot tell how many GPUs this node has (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE and CUDA_VISIBLE_DEVICES are unset or 0): request them with --gres=gpu:N or --gpus-per-node=N, or set NPROC_PER_NODE" >&2
        return 0
    fi
    echo "$n"
}

# The trainer's command line (script and flags), in WIT_TRAIN_ARGS.
wit_train_args() {
    WIT_TRAIN_ARGS=("$WITSCALE_HOME/witscale/train.py" --data "$DATA" --output-dir "$OUTPUT"
        --ds_config "$DS_CONFIG" --prompt-weight "$PROMPT_WEIGHT" --response-weight "$RESPONSE_WEIGHT"
        --normalization "$NORMALIZATION" --micro-batch-size "$MICRO_BATCH"
        --lr "$LR" --seed "$SEED" --save-steps "$SAVE_STEPS" --tp "$TP" --pp "$PP" --sp "$SP"
        --activation-checkpointing "$ACTIVATION_CHECKPOINTING")
    if [ -n "${GRAD_ACCUM:-}" ]; then WIT_TRAIN_ARGS+=(--grad-accum "$GRAD_ACCUM"); fi
    if [ -n "${PAIRS_PER_STEP:-}" ]; then WIT_TRAIN_ARGS+=(--pairs-per-step "$PAIRS_PER_STEP"); fi
    if [ -n "${MODEL:-}" ]; then WIT_TRAIN_ARGS+=(--model "$MODEL"); else WIT_TRAIN_ARGS+=(--model-config "$MODEL_CONFIG"); fi
    if [ -n "${MAX_STEPS:-}" ]; then WIT_TRAIN_ARGS+=(--max-steps "$MAX_STEPS"); fi
    if [ -n "${EPOCHS:-}" ]; then WIT_TRAIN_ARGS+=(--epochs "$EPOCHS"); fi
    if [ -n "${EVAL_DATA:-}" ]; then WIT_TRAIN_ARGS+=(--eval-data "$EVAL_DATA"); fi
    if [ -n "${EVAL_STEPS:-}" ]; then WIT_TRAIN_ARGS+=(--eval-steps "$EVAL_STEPS"); fi
    if [ -n "${EXPORT_HF:-}" ]; then WIT_TRAIN_ARGS+=(--export-hf "$EXPORT_HF"); fi
    if [ -n "$RESUME" ]; then WIT_TRAIN_ARGS+=(--resume "$RESUME"); fi
    # WIT_OBJECTIVE_ARGS: flags a template adds (slurm/dpo_common.sh), an array: each value one argument.
    WIT_TRAIN_ARGS+=("${WIT_OBJECTIVE_ARGS[@]}")
    # EXTRA_ARGS: further trainer flags, split on whitespace (no quoting inside; never run through a shell).
    local extra
    read -r -a extra <<<"$EXTRA_ARGS"
    WIT_TRAIN_ARGS+=("${extra[@]}")
}

# A rank's share of the node's cores (under task/cgroup a step without --cpus-per-task gets one core per task:
# data loading and DeepSpeed's host work would then crawl).
wit_cpus_per_rank() {
    local c=$(( ${SLURM_CPUS_ON_NODE:-1} / NPROC_PER_NODE ))
    [ "$c" -ge 1 ] || c=1
    echo "$c"
}

# The launch command, in WIT_LAUNCH. The per-task half is slurm/launch_task.sh. srun --label prefixes every
# line with its task id (torchrun/deepspeed: the node index); the trainer's own lines carry host and rank.
wit_launch_cmd() {
    local task=$WITSCALE_HOME/slurm/launch_task.sh
    case "$LAUNCHER" in
        torchrun | deepspeed)
            if [ "$LAUNCHER" = deepspeed ]; then
                # --no_ssh: every node runs its own launcher (this srun), which reads its rank from
                # --node_rank; the hostfile only fixes the world (slots = ranks per node).
                WIT_HOSTFILE=${OUTPUT}/hostfile.${SLURM_JOB_ID:-local}
                scontrol show hostnames "${SLURM_JOB_NODELIST}" |
                    while read -r host; do printf '%s slots=%s\n' "$host" "$NPROC_PER_NODE"; done >"$WIT_HOSTFILE"
                export WIT_HOSTFILE
            fi
            # --ntasks is needed too: --ntasks-per-node alone is ignored inside a --ntasks-per-node=8
            # allocation. The launcher gets all of the node's CPUs (and, by default, all its GPUs).
            WIT_LAUNCH=(srun --ntasks="$NNODES" --ntasks-per-node=1 --nodes="$NNODES"
                --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 --label "$task")
            ;;
        srun)
            WIT_LAUNCH=(srun --ntasks=$((NNODES * NPROC_PER_NODE)) --ntasks-per-node="$NPROC_PER_NODE"
                --nodes="$NNODES" --cpus-per-task="$(wit_cpus_per_rank)" --kill-on-bad-exit=1 --label "$task")
            ;;
        srun-mpi)
            WIT_LAUNCH=(srun --mpi="$SRUN_MPI" --ntasks=$((NNODES * NPROC_PER_NODE))
                --ntasks-per-node="$NPROC_PER_NODE" --nodes="$NNODES" --cpus-per-task="$(wit_cpus_per_rank)"
                --kill-on-bad-exit=1 --label "$task")
            ;;
        mpirun)
            # Open MPI starts its daemons on the other nodes through srun by itself.
            WIT_LAUNCH=(mpirun -np $((NNODES * NPROC_PER_NODE)) --map-by "ppr:$NPROC_PER_NODE:node" --bind-to none
                -x WITSCALE_HOME -x PYTHON -x LAUNCHER -x MASTER_ADDR -x MASTER_PORT -x TORCH_EXTENSIONS_DIR
                -x WITSCALE_FAILURE_FILE -x WITSCALE_SIGNAL_LEAD_S)
            [ "$(id -u)" -ne 0 ] || WIT_LAUNCH+=(--allow-run-as-root)
            [ "${MPIRUN_ARGS:-}" = "" ] || { local more; read -r -a more <<<"$MPIRUN_ARGS"; WIT_LAUNCH+=("${more[@]}"); }
            WIT_LAUNCH+=("$task")
            ;;
        *) wit_die "LAUNCHER=$LAUNCHER: use torchrun, deepspeed, srun, srun-mpi or mpirun" ;;
    esac
}

# Batch-shell signal handling. USR1 (#SBATCH --signal=B:USR1@…, or `scancel --batch -s USR1`) means
# "checkpoint and come back": forward it to the ranks and remember to requeue. TERM (scancel, time limit,
# Slurm's own preemption) reaches every process of the job anyway: no requeue from here.
WIT_OBJECTIVE_ARGS=()
WIT_PREEMPTED=0
WIT_TERMINATED=0
WIT_LAUNCH_PID=
WIT_FORWARD_PID=
WIT_STAMP=

wit_forward_usr1() {
    [ -n "$WIT_LAUNCH_PID" ] && kill -0 "$WIT_LAUNCH_PID" 2>/dev/null || return 0
    if [ "$LAUNCHER" = mpirun ]; then
        kill -USR1 "$WIT_LAUNCH_PID" 2>/dev/null || true    # mpirun forwards USR1 to its ranks
    else
        # every process of the job's steps (not the batch shell): the trainer's ranks catch it, the
        # launchers ignore it (launch_task.sh)
        scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true
    fi
}

# The trainer writes effective_config.json once every rank has joined the process group, i.e. after
# every rank installed its signal handlers (train.py's first act). Before that the ranks ignore USR1
# (launch_task.sh), so an early warning must wait; after the ranks are done a USR1 is fatal again (Python
# restores default handlers at exit), so it is sent exactly once, never repeated.
wit_trainer_ready() { [ -n "$WIT_STAMP" ] && [ "$OUTPUT/effective_config.json" -nt "$WIT_STAMP" ]; }

wit_on_usr1() {
    [ "$WIT_PREEMPTED" = 0 ] || return 0
    WIT_PREEMPTED=1
    if [ -z "$WIT_LAUNCH_PID" ]; then
        wit_log "USR1 before the launch: the trainer will be asked to stop as soon as it has started"
    elif wit_trainer_ready; then
        wit_log "USR1: preemption warning; asking the trainer to checkpoint and exit"
        wit_forward_usr1
    else
        wit_log "USR1 during start-up: forwarding once the trainer is up"
        wit_forward_when_ready
    fi
}

wit_forward_when_ready() {
    ( trap - USR1 TERM
      while kill -0 "$WIT_LAUNCH_PID" 2>/dev/null; do
          if wit_trainer_ready; then wit_forward_usr1; exit 0; fi
          sleep 2
      done ) &
    WIT_FORWARD_PID=$!
}

wit_on_term() {
    wit_log "TERM: job ending (cancelled, time limit or preempted by Slurm); the trainer checkpoints if it can"
    WIT_TERMINATED=1
}

# Did the run reach its last step? (its latest complete checkpoint is at total_steps)
wit_run_finished() {
    "$PYTHON" - "$OUTPUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
try:
    total = json.load(open(os.path.join(out, "effective_config.json")))["total_steps"]
    tag = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    step = json.load(open(os.path.join(out, "checkpoints", tag, "witscale_state.json")))["step"]
except (OSError, ValueError, KeyError):
    sys.exit(1)
sys.exit(0 if int(step) >= int(total) else 1)
PYEOF
}

# The trainer writes "collective <hosts> | <line>" to $WITSCALE_FAILURE_FILE when one of its collectives failed
# (a timeout: a hung or lost rank, a network fault; distributed.py names the ranks that never joined). Such a
# job is requeued — at most WITSCALE_MAX_NODE_REQUEUES times (default 2; counted in $OUTPUT/.node-failure-requeues)
# and without the named nodes (ExcNodeList, unless WITSCALE_EXCLUDE_FAILED_NODES=0); a job that died of
# anything else (a Python exception in witscale: a bug or bad input) is not.
wit_requeue_after_node_failure() {
    [ -n "${WITSCALE_FAILURE_FILE:-}" ] && [ -s "$WITSCALE_FAILURE_FILE" ] || return 1
    grep -q '^collective ' "$WITSCALE_FAILURE_FILE" || return 1
    local counter=$OUTPUT/.node-failure-requeues count=0 hosts line
    if [ -f "$counter" ]; then count=$(tr -dc 0-9 <"$counter"); fi
    line=$(sed -n 's/^collective [^|]*| //p' "$WITSCALE_FAILURE_FILE" | head -n 1)
    wit_log "a collective failed (node or network fault): $line"
    if [ "${count:-0}" -ge "${WITSCALE_MAX_NODE_REQUEUES:-2}" ]; then
        wit_log "already requeued ${count} time(s) after node failures (WITSCALE_MAX_NODE_REQUEUES): not again"
        return 1
    fi
    echo $(( ${count:-0} + 1 )) >"$counter"
    hosts=$(sed -n 's/^collective \([^ |]*\) |.*/\1/p' "$WITSCALE_FAILURE_FILE" | tr ',' '\n' |
        grep -E '^[A-Za-z0-9._-]+$' | sort -u | paste -sd, -)
    wit_log "requeueing $(wit_job_ref) ($(( ${count:-0} + 1 )) of at most ${WITSCALE_MAX_NODE_REQUEUES:-2})"
    scontrol requeue "$(wit_job_ref)" || { wit_log "scontrol requeue failed"; return 1; }
    if [ -n "$hosts" ] && [ "${WITSCALE_EXCLUDE_FAILED_NODES:-1}" = 1 ]; then
        if scontrol update JobId="$(wit_job_ref)" ExcNodeList="$hosts"; then
            wit_log "the requeued job excludes $hosts"
        else
            wit_log "could not exclude $hosts from the requeued job"
        fi
    fi
    return 0
}

# A resume at another data-parallel size or tp loads DeepSpeed's universal checkpoint of the tag; making it reads and
# writes the whole optimizer state (30-90 min at 70B). It is made here, as a job step of its own on one node before
# the training step, so that no rank waits on it (witscale/training/layout_conversion.py; a second's check when the
# layout is the same). Its output is renamed into place: a conversion interrupted midway leaves the checkpoint as it
# was and is redone on the next start. A failure is left to the training step, which names it (or falls back to an
# older checkpoint). A preemption warning meanwhile stops it and requeues the job at once: there is nothing to save.
wit_convert_layout() {
    [ -n "$RESUME" ] || return 0
    if [ "$RESUME" = auto ] && [ ! -f "$OUTPUT/checkpoints/latest" ]; then return 0; fi
    local rc=0 pid
    srun --ntasks=1 --nodes=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --label \
        "$PYTHON" -m witscale.training.layout_conversion --output-dir "$OUTPUT" --resume "$RESUME" \
        --world $((NNODES * NPROC_PER_NODE)) --tp "$TP" --pp "$PP" --sp "$SP" --ds_config "$DS_CONFIG" &
    pid=$!
    # as for the training step: a trapped signal ends `wait` early
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$WIT_PREEMPTED" = 1 ]; then kill -TERM "$pid" 2>/dev/null || true; fi
        wait "$pid" || true
    done
    wait "$pid" || rc=$?
    if [ "$WIT_PREEMPTED" = 1 ] && [ "$WIT_TERMINATED" = 0 ]; then
        wit_log "preemption warning during the layout conversion: stopped it; requeueing $(wit_job_ref) (it converts again)"
        scontrol requeue "$(wit_job_ref)" || { wit_log "scontrol requeue failed"; exit 3; }
        exit 0
    fi
    [ "$rc" -eq 0 ] || wit_log "the layout conversion step failed (status $rc): the training step converts on rank 0 or says why"
}

# Run the training step of this job and decide about requeueing. Exits the batch script.
wit_main() {
    trap wit_on_usr1 USR1
    trap wit_on_term TERM
    wit_defaults
    wit_train_args
    mkdir -p "$OUTPUT"
    wit_launch_cmd
    wit_log "job $(wit_job_ref) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}: $NNODES node(s) × $NPROC_PER_NODE rank(s), launcher $LAUNCHER, rendezvous $MASTER_ADDR:$MASTER_PORT"
    wit_log "output $OUTPUT; weights λp=$PROMPT_WEIGHT λr=$RESPONSE_WEIGHT; ${WIT_LAUNCH[*]} ${WIT_TRAIN_ARGS[*]}"

    wit_convert_layout
    WIT_STAMP=$OUTPUT/.launch-stamp.${SLURM_JOB_ID:-local}
    touch "$WIT_STAMP"
    WITSCALE_FAILURE_FILE=$OUTPUT/.failure.${SLURM_JOB_ID:-local}.${SLURM_RESTART_COUNT:-0}
    rm -f "$WITSCALE_FAILURE_FILE"
    export WITSCALE_FAILURE_FILE
    "${WIT_LAUNCH[@]}" "${WIT_TRAIN_ARGS[@]}" &
    WIT_LAUNCH_PID=$!
    if [ "$WIT_PREEMPTED" = 1 ]; then wit_forward_when_ready; fi    # the warning came before the launch
    # `wait` returns early whenever a trapped signal arrives: wait again until the launcher is gone;
    # the last `wait` returns its exit status (bash keeps it).
    while kill -0 "$WIT_LAUNCH_PID" 2>/dev/null; do wait "$WIT_LAUNCH_PID" || true; done
    local rc=0
    wait "$WIT_LAUNCH_PID" || rc=$?
    if [ -n "$WIT_FORWARD_PID" ]; then kill "$WIT_FORWARD_PID" 2>/dev/null || true; wait "$WIT_FORWARD_PID" 2>/dev/null || true; fi

    local saved=0    # did this run commit a checkpoint? (`latest` moves only once one is complete)
    if [ "$OUTPUT/checkpoints/latest" -nt "$WIT_STAMP" ]; then saved=1; fi
    rm -f "$WIT_STAMP"
    if [ "$WIT_PREEMPTED" = 1 ] && [ "$WIT_TERMINATED" = 0 ] && { [ "$rc" -eq 0 ] || [ "$saved" = 1 ]; }; then
        # rc != 0 with a fresh checkpoint: a rank died after the checkpoint (e.g. in its shutdown);
        # the checkpoint is complete, so resuming from it is right.
        [ "$rc" -eq 0 ] || wit_log "training exited with status $rc after checkpointing"
        if wit_run_finished; then
            wit_log "preemption warning came, but the run had finished: not requeueing"
        else
            wit_log "checkpoint written; requeueing $(wit_job_ref) (it resumes with --resume $RESUME)"
            scontrol requeue "$(wit_job_ref)" || { wit_log "scontrol requeue failed"; exit 3; }
        fi
        exit 0
    fi
    if [ "$rc" -ne 0 ] && [ "$WIT_TERMINATED" = 0 ] && wit_requeue_after_node_failure; then
        exit 0
    fi
    if [ "$rc" -ne 0 ]; then
        wit_log "training exited with status $rc"
        if [ "$rc" -gt 128 ] && [ "$WIT_TERMINATED" = 0 ]; then
            # e.g. SIGABRT: NCCL's watchdog after a collective timeout. The trainer's step watchdog normally ends a
            # stalled step first and writes the failure file (then the job is requeued above); without that file
            # nothing says a node was at fault, so a possible bug is not retried.
            wit_log "a task died of SIG$(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128))) and no failure file says a collective failed: not requeued (scontrol requeue $(wit_job_ref) by hand if the log shows a node fault)"
        fi
        exit "$rc"
    fi
    wit_log "training finished"
    exit 0
}
