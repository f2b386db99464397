# shellcheck shell=bash
# DPO after WIT (the paper's §4.2), shared by slurm/dpo_7b.sh and slurm/sweep_dpo.sh; sourced after
# slurm/common.sh, inside the batch job. wit_dpo_main:
#   1. the paper's DPO defaults (train.py --preset dpo-paper: lr 5e-7, about 32 pairs per step, weight decay 0,
#      10% warm-up, 2 epochs, β 0.1, sigmoid loss), each overridable by its variable;
#   2. the reference pass: tools/precompute_reference.py writes the reference (SFT) model's log-probs into the
#      preference dataset, under the job's own launcher and layout — skipped when the dataset already holds
#      log-probs of this very model (a requeued job does not redo it);
#   3. DPO training through wit_main: the same preemption, requeue and resume as slurm/train_7b.sh.
# A preemption warning (USR1) during the reference pass stops the pass and requeues the job at once (the pass
# has no checkpoint: it starts again after the requeue); one that comes as the pass finishes lets training
# start, checkpoint at once and requeue. The reference log-probs, written atomically, are not computed again.

# A run-private copy of the packed preference dataset $1 at $2: symbolic links to its arrays, its own manifest
# without any reference record — so that this run's reference pass never overwrites another run's (a dataset
# holds one reference). Kept across requeues (the reference log-probs in it are reused) as long as the source
# is the same: its manifest's sha256 is recorded in $2/.linked_from, and a source re-packed since makes a new
# copy (reference log-probs also record the arrays they were computed on: format.content_digest). A directory
# at $2 that is not such a copy is never replaced.
wit_dpo_link_data() {
    "$PYTHON" - "$1" "$2" <<'PYEOF' || wit_die "cannot make a copy of $1 at $2"
import hashlib, json, os, sys
src, dst = (os.path.abspath(p) for p in sys.argv[1:3])
if not os.path.isfile(os.path.join(src, "manifest.json")):
    sys.exit(f"{src}: not a packed dataset (no manifest.json)")
with open(os.path.join(src, "manifest.json"), "rb") as f:
    raw = f.read()
manifest = json.loads(raw)
manifest.pop("reference", None)                 # the source's own reference (if any) does not count
source = {"source": src, "manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()}
marker = os.path.join(dst, ".linked_from")
if os.path.exists(dst):
    try:
        with open(marker, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        sys.exit(f"{dst} exists and is not a copy made by slurm/dpo_common.sh (no {os.path.basename(marker)}): "
                 f"not replacing it; choose another DATA or OUTPUT")
    if old == source:
        sys.exit(0)                             # this source's copy, from an earlier attempt: keep its log-probs
    print(f"[witscale] {src} changed since {dst} was made from {old.get('source')}: making a new copy", flush=True)
# written aside and swapped in; it replaces only an earlier copy (its .linked_from) — witscale/data/output_dir.py
from witscale.data.output_dir import DirectoryWriter, OutputError, OutputKind
kind = OutputKind("run-private copy of a packed dataset", "witscale-link", ".linked_from",
                  lambda d: os.path.isfile(os.path.join(d, ".linked_from")))
try:
    with DirectoryWriter(dst, kind) as writer:
        for name in os.listdir(src):
            if name not in ("manifest.json", "reference_logps.bin") and not name.startswith("."):
                os.symlink(os.path.realpath(os.path.join(src, name)), os.path.join(writer.tmp, name))
        with open(os.path.join(writer.tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        with open(os.path.join(writer.tmp, ".linked_from"), "w", encoding="utf-8") as f:
            json.dump(source, f)
        writer.commit()
except OutputError as e:
    sys.exit(str(e))
PYEOF
}

# The paper's defaults, as variables; every one overridable from the submitting environment.
wit_dpo_defaults() {
    : "${LR:=5e-7}"
    : "${PAIRS_PER_STEP:=32}"           # the trainer picks --grad-accum from the data's mean pairs per row
    : "${WEIGHT_DECAY:=0}"
    : "${WARMUP_RATIO:=0.1}"
    : "${BETA:=0.1}"
    : "${DPO_LOSS:=sigmoid}"            # sigmoid (DPO) | ipo
    : "${LABEL_SMOOTHING:=0}"
    [ -n "${MAX_STEPS:-}${EPOCHS:-}" ] || EPOCHS=2
    # The standard DPO mask: a completion's log-prob sums its response-side tokens (λp 0, λr 1). The reference
    # pass and training must use the same weights (the trainer refuses log-probs summed under others).
    : "${PROMPT_WEIGHT:=0}" "${RESPONSE_WEIGHT:=1}"
    # Per-class overrides (train.py --class-weights) go to the reference pass and to training alike.
    : "${CLASS_WEIGHTS:=}"
    case " ${EXTRA_ARGS:-} " in
        *" --class-weights "* | *" --class-weights="*)
            wit_die "set CLASS_WEIGHTS, not --class-weights in EXTRA_ARGS: the reference pass needs them too" ;;
    esac
    [ -n "${MODEL:-}" ] || wit_die "set MODEL to the SFT model's HF directory (the policy's start and the DPO reference)"
    [ -z "${MODEL_CONFIG:-}" ] || wit_die "DPO starts from a trained model: set MODEL, not MODEL_CONFIG"
    : "${REFERENCE_MODEL:=$MODEL}"
    # Trainer flags that common.sh does not pass itself: an array (a path with spaces or quotes stays one
    # argument), before the user's EXTRA_ARGS, which may override them.
    WIT_OBJECTIVE_ARGS=(--preset dpo-paper --objective dpo --beta "$BETA" --dpo-loss "$DPO_LOSS"
        --label-smoothing "$LABEL_SMOOTHING" --weight-decay "$WEIGHT_DECAY" --warmup-ratio "$WARMUP_RATIO"
        --reference-model "$REFERENCE_MODEL")
    [ -z "$CLASS_WEIGHTS" ] || WIT_OBJECTIVE_ARGS+=(--class-weights "$CLASS_WEIGHTS")
    export LR PAIRS_PER_STEP EPOCHS PROMPT_WEIGHT RESPONSE_WEIGHT CLASS_WEIGHTS REFERENCE_MODEL
}

# Does the packed dataset $1 hold reference log-probs of the model $2, summed under this run's weights, valid
# for its arrays as they are now? (the manifest's reference record: the model's fingerprint and path, the class
# weights, the values' sha256 and the data's digest — opening the dataset checks the last two —, and
# reference_logps.bin no older than the model's weights: a model re-exported into the same directory is not
# taken for the old one)
wit_dpo_has_reference() {
    "$PYTHON" - "$1" "$2" "$PROMPT_WEIGHT" "$RESPONSE_WEIGHT" "${CLASS_WEIGHTS:-}" <<'PYEOF'
import os, sys
data, model, pw, rw, cw = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
from witscale.data.format import PackedDataset
from witscale.data.weighting import build_weight_table, parse_class_weights
from witscale.training.objectives.reference import check_reference
try:
    manifest = PackedDataset(data).manifest
    check_reference(manifest, data, build_weight_table(pw, rw, parse_class_weights(cw)), model)
    written = os.path.getmtime(os.path.join(data, "reference_logps.bin"))
    newest = max(os.path.getmtime(os.path.join(model, n)) for n in os.listdir(model) if n.endswith(".safetensors"))
except (OSError, ValueError) as e:
    print(f"[witscale] no usable reference log-probs in {data}: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
recorded = (manifest.get("reference") or {}).get("model")
sys.exit(0 if written >= newest and (recorded is None or os.path.realpath(recorded) == os.path.realpath(model)) else 1)
PYEOF
}

# A preemption warning while the reference pass runs: stop the pass (it has nothing to save) and requeue.
# The ranks exit on USR1 (precompute_reference.py) but ignore it until they have started (launch_task.sh), so
# it is sent every 5 s until the pass is gone (the launchers ignore it too).
wit_dpo_on_usr1_in_reference() {
    [ "$WIT_PREEMPTED" = 0 ] || return 0
    WIT_PREEMPTED=1
    wit_log "USR1 during the reference pass: stopping it and requeueing (the pass starts again after the requeue)"
    ( trap - USR1 TERM
      while kill -0 "$WIT_LAUNCH_PID" 2>/dev/null; do wit_forward_usr1; sleep 5; done ) &
    WIT_FORWARD_PID=$!
}

# The reference pass over the packed dataset $1 (under the job's launcher, in the background so that the
# batch shell's USR1 trap runs while it does), unless it is already there.
wit_dpo_reference() {
    local data=$1 rc=0
    if wit_dpo_has_reference "$data" "$REFERENCE_MODEL"; then
        wit_log "reference log-probs of $REFERENCE_MODEL already in $data: no reference pass"
        return 0
    fi
    if [ "$WIT_PREEMPTED" = 1 ]; then wit_dpo_requeue_before_training; fi
    wit_launch_cmd
    local extra=()
    [ -z "${CLASS_WEIGHTS:-}" ] || extra=(--class-weights "$CLASS_WEIGHTS")
    wit_log "reference pass: $REFERENCE_MODEL over $data (${WIT_LAUNCH[*]})"
    trap wit_dpo_on_usr1_in_reference USR1
    "${WIT_LAUNCH[@]}" "$WITSCALE_HOME/tools/precompute_reference.py" --data "$data" --model "$REFERENCE_MODEL" \
        --ds_config "$DS_CONFIG" --tp "$TP" --pp "$PP" --micro-batch-size "$MICRO_BATCH" \
        --prompt-weight "$PROMPT_WEIGHT" --response-weight "$RESPONSE_WEIGHT" "${extra[@]}" &
    WIT_LAUNCH_PID=$!
    # as in wit_main: a trapped signal ends `wait` early; the last `wait` returns the pass's exit status
    while kill -0 "$WIT_LAUNCH_PID" 2>/dev/null; do wait "$WIT_LAUNCH_PID" || true; done
    wait "$WIT_LAUNCH_PID" || rc=$?
    WIT_LAUNCH_PID=
    trap wit_on_usr1 USR1
    if [ -n "$WIT_FORWARD_PID" ]; then kill "$WIT_FORWARD_PID" 2>/dev/null || true; wait "$WIT_FORWARD_PID" 2>/dev/null || true; fi
    WIT_FORWARD_PID=
    if [ "$rc" -ne 0 ] && [ "$WIT_PREEMPTED" = 1 ] && [ "$WIT_TERMINATED" = 0 ]; then
        wit_dpo_requeue_before_training
    fi
    [ "$rc" -eq 0 ] || { wit_log "reference pass over $data failed (exit $rc)"; exit "$rc"; }
}

# Preempted before training started (nothing to checkpoint): requeue now, while there is time.
wit_dpo_requeue_before_training() {
    wit_log "requeueing $(wit_job_ref) before training (the reference pass runs again after the requeue)"
    scontrol requeue "$(wit_job_ref)" || { wit_log "scontrol requeue failed"; exit 3; }
    exit 0
}

wit_dpo_main() {
    trap wit_on_usr1 USR1
    trap wit_on_term TERM
    # PREF_DATA / PREF_EVAL_DATA: shared preference datasets, used through run-private copies.
    if [ -n "${PREF_DATA:-}" ] && [ -z "${DATA:-}" ]; then DATA=${OUTPUT:?set OUTPUT to the run directory}/pref_data; fi
    if [ -n "${PREF_EVAL_DATA:-}" ] && [ -z "${EVAL_DATA:-}" ]; then EVAL_DATA=$OUTPUT/pref_eval_data; fi
    wit_dpo_defaults
    wit_defaults
    mkdir -p "$OUTPUT"
    if [ -n "${PREF_DATA:-}" ]; then wit_dpo_link_data "$PREF_DATA" "$DATA"; fi
    if [ -n "${PREF_EVAL_DATA:-}" ]; then wit_dpo_link_data "$PREF_EVAL_DATA" "$EVAL_DATA"; fi
    wit_dpo_reference "$DATA"
    if [ -n "${EVAL_DATA:-}" ]; then wit_dpo_reference "$EVAL_DATA"; fi
    [ "$WIT_TERMINATED" = 0 ] || { wit_log "job ending during the reference pass: not starting training"; exit 1; }
    wit_log "DPO: β=$BETA loss=$DPO_LOSS lr=$LR ~$PAIRS_PER_STEP pairs/step, from $MODEL"
    wit_main
}
