# shellcheck shell=bash
# DPO after WIT (the paper's §4.2), shared by slurm/dpo_7b.sh and slurm/sweep_dpo.sh; sourced after
# slurm/common.sh, inside the batch job. wit_dpo_main:
#   1. the paper's DPO defaults (train.py --preset dpo-paper: lr 5e-7, about 32 pairs per step, weight decay 0,
#      10% warm-up, 2 epochs, β 0.1, sigmoid loss), each overridable by its variable;
#   2. the reference pass: tools/precompute_reference.py writes the reference (SFT) model's log-probs into the
#      preference dataset, under the job's own launcher and layout — skipped when the dataset already holds
#      log-probs of this very model (a requeued job does not redo it);
#   3. DPO training through wit_main: the same preemption, requeue and resume as slurm/train_7b.sh.
# A preemption warning during the reference pass is kept: training then starts, checkpoints at once and the
# job requeues; the reference log-probs, written atomically, are not computed again.

# A run-private copy of the packed preference dataset $1 at $2: symbolic links to its arrays, its own manifest
# without any reference record — so that this run's reference pass never overwrites another run's (a dataset
# holds one reference). Kept across requeues (the reference log-probs in it are reused).
wit_dpo_link_data() {
    [ -f "$2/manifest.json" ] && return 0
    "$PYTHON" - "$1" "$2" <<'PYEOF' || wit_die "cannot make a copy of $1 at $2"
import json, os, shutil, sys
src, dst = (os.path.abspath(p) for p in sys.argv[1:3])
if not os.path.isfile(os.path.join(src, "manifest.json")):
    sys.exit(f"{src}: not a packed dataset (no manifest.json)")
tmp = dst + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
for name in os.listdir(src):
    if name not in ("manifest.json", "reference_logps.bin") and not name.startswith("."):
        os.symlink(os.path.realpath(os.path.join(src, name)), os.path.join(tmp, name))
with open(os.path.join(src, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
manifest.pop("reference", None)
with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
shutil.rmtree(dst, ignore_errors=True)          # a half-made copy of an earlier attempt
os.rename(tmp, dst)
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
    [ -n "${MODEL:-}" ] || wit_die "set MODEL to the SFT model's HF directory (the policy's start and the DPO reference)"
    [ -z "${MODEL_CONFIG:-}" ] || wit_die "DPO starts from a trained model: set MODEL, not MODEL_CONFIG"
    : "${REFERENCE_MODEL:=$MODEL}"
    # Trainer flags that common.sh does not pass itself (EXTRA_ARGS is split on whitespace).
    EXTRA_ARGS="--preset dpo-paper --objective dpo --beta $BETA --dpo-loss $DPO_LOSS --label-smoothing $LABEL_SMOOTHING \
--weight-decay $WEIGHT_DECAY --warmup-ratio $WARMUP_RATIO --reference-model $REFERENCE_MODEL ${EXTRA_ARGS:-}"
    export LR PAIRS_PER_STEP EPOCHS PROMPT_WEIGHT RESPONSE_WEIGHT REFERENCE_MODEL EXTRA_ARGS
}

# Does the packed dataset $1 hold reference log-probs of the model $2, summed under this run's weights?
# (the manifest's reference record: the model's fingerprint and path, and reference_logps.bin no older than
# the model's weights — a model re-exported into the same directory is not taken for the old one)
wit_dpo_has_reference() {
    "$PYTHON" - "$1" "$2" "$PROMPT_WEIGHT" "$RESPONSE_WEIGHT" <<'PYEOF'
import json, os, sys
data, model, pw, rw = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
from witscale.data.weighting import build_weight_table
from witscale.training.dpo import check_reference
try:
    with open(os.path.join(data, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    check_reference(manifest, data, build_weight_table(pw, rw), model)
    written = os.path.getmtime(os.path.join(data, "reference_logps.bin"))
    newest = max(os.path.getmtime(os.path.join(model, n)) for n in os.listdir(model) if n.endswith(".safetensors"))
except (OSError, ValueError):
    sys.exit(1)
recorded = (manifest.get("reference") or {}).get("model")
sys.exit(0 if written >= newest and (recorded is None or os.path.realpath(recorded) == os.path.realpath(model)) else 1)
PYEOF
}

# The reference pass over the packed dataset $1 (under the job's launcher), unless it is already there.
wit_dpo_reference() {
    local data=$1 rc=0
    if wit_dpo_has_reference "$data" "$REFERENCE_MODEL"; then
        wit_log "reference log-probs of $REFERENCE_MODEL already in $data: no reference pass"
        return 0
    fi
    wit_launch_cmd
    wit_log "reference pass: $REFERENCE_MODEL over $data (${WIT_LAUNCH[*]})"
    "${WIT_LAUNCH[@]}" "$WITSCALE_HOME/tools/precompute_reference.py" --data "$data" --model "$REFERENCE_MODEL" \
        --ds_config "$DS_CONFIG" --tp "$TP" --pp "$PP" --micro-batch-size "$MICRO_BATCH" \
        --prompt-weight "$PROMPT_WEIGHT" --response-weight "$RESPONSE_WEIGHT" || rc=$?
    [ "$rc" -eq 0 ] || { wit_log "reference pass over $data failed (exit $rc)"; exit "$rc"; }
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
