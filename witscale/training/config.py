"""The run configuration: every setting of a training run, typed, built once from the command line.

``RunConfig`` IS the declaration of ``witscale/train.py``'s flags: each field carries its flag's help, group,
choices and range check (``option(...)``, witscale/training/flags.py), and the parser is generated from the
fields, so a field per flag, the flag's name with ``_``. The rest of the code takes this object, never the
argparse namespace. It is frozen: a run's settings do not change once it has started (``effective_config.json``
records them). Building one checks every range: a bad value is refused in one line naming the flag.

Adding a flag: one field here, with its metadata (docs/README.md "Adding a flag").
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Optional

from witscale.data.classes import PROMPT_SIDE, RESPONSE_SIDE
from witscale.data.weighting import NORMALIZATIONS
from witscale.model.hf_io import EXPORT_DTYPES
from witscale.model.pipeline import PARTITION_METHODS
from witscale.training.objectives import OBJECTIVES, get_objective, registered
from witscale.training.objectives.dpo import DPO_LOSSES
from witscale.training.flags import at_least, check_values, fraction, non_negative, option, positive


# The objectives' defaults, shown in their fields' help (witscale/training/objectives/)
DPO_DEFAULTS = get_objective("dpo").defaults
SIMPO_DEFAULTS = get_objective("simpo").defaults
ORPO_DEFAULTS = get_objective("orpo").defaults
ACTIVATION_CHECKPOINTING = ("auto", "on", "off", "offload")
TP_SEQUENCE_PARALLEL = ("auto", "on", "off")

# Documented presets: a preset fills defaults, every flag given explicitly still wins.
PRESETS = {
    # The paper's DPO stage (Chatterjee et al. 2025, §4.2: DPO on UltraFeedback after each SFT cell): lr 5e-7,
    # weight decay 0, 10% warm-up, 2 epochs, global batch 32 pairs (β 0.1, sigmoid loss: TRL's defaults).
    # Packing puts a variable number of pairs in a row, so "32 pairs" picks --grad-accum from the manifest's
    # mean pairs_per_row (--pairs-per-step); the loss is divided by each step's exact global pair count.
    "dpo-paper": dict(objective="dpo", lr=5e-7, weight_decay=0.0, warmup_ratio=0.1, epochs=2.0, beta=0.1,
                      dpo_loss="sigmoid", pairs_per_step=32),
}

# The --help groups, in this order (a field names its group).
DATA = "data and model"
WEIGHTS = "loss weights"
OBJECTIVE = "objective (docs/objective.md)"
SETTINGS = "presets and config files (a flag given > --config FILE > --preset > the default)"
OPTIMIZATION = "optimization"
OUTPUTS = "checkpoints, evaluation, export"
RUNTIME = "parallelism and runtime"
GROUPS = (DATA, WEIGHTS, OBJECTIVE, SETTINGS, OPTIMIZATION, OUTPUTS, RUNTIME)

NORMALIZATION_HELP = """how the weighted sum of token losses is divided, over the GLOBAL batch
(all micro-batches of all data-parallel ranks):
  nonzero     the paper's: count of predicted tokens with non-zero weight (default).
  weight_sum  Σ w: a weighted mean NLL; prompt tokens count by λp in N.
  tokens      all predicted (non-pad) tokens, whatever their weight.
Scaling all weights by c scales the gradient by c under nonzero and tokens, not under weight_sum; AdamW
without clipping ignores that scale (up to its eps), so there only the ratio λp:λr and which weights are
zero matter. With --clip-grad the scale decides how much is clipped (docs/objective.md)."""


def side_names(classes, sep: str = "/") -> str:
    """A side's class names for help texts (e.g. 'system/prompt/template')."""
    return sep.join(c.name.lower() for c in classes)


def _number(v) -> str:
    return f"{v:g}".replace("e-0", "e-") if isinstance(v, float) else str(v)     # 5e-7, not 5e-07


def _as_flags(settings: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {_number(v)}" for k, v in settings.items())


def _attention_backend(name: str) -> None:
    from witscale.model.attention import check_backend_name      # torch: only once a config is built
    check_backend_name(name)        # before reading data or config: a typo fails at once


@dataclass(frozen=True)
class RunConfig:
    # data and model
    data: str = option(help="packed dataset directory (tools/pack_dataset.py)", group=DATA)
    output_dir: str = option(help="metrics.jsonl, the effective config and the log go here", group=DATA)
    ds_config: str = option(help="DeepSpeed JSON (ds_configs/zero3.json …); \"auto\" fields are filled from these "
                                 "flags", group=RUNTIME, names=("--ds_config", "--ds-config"))
    model: Optional[str] = option(None, "HF checkpoint directory: config.json + *.safetensors",
                                  group=DATA, one_of="model", required=True)
    model_config: Optional[str] = option(None, "HF-style config.json; the model starts from a seeded random init",
                                         group=DATA, one_of="model", required=True)
    # loss weights (docs/objective.md); their checks: witscale/data/weighting.py (the weight table)
    prompt_weight: float = option(0.0, f"λp for {side_names(PROMPT_SIDE)} tokens (default 0)", group=WEIGHTS)
    response_weight: float = option(1.0, f"λr for {side_names(RESPONSE_SIDE)} tokens (default 1)", group=WEIGHTS)
    class_weights: str = option("", "per-class overrides, e.g. 'template=0,reasoning=0.3,tool=0'", group=WEIGHTS)
    normalization: str = option("nonzero", NORMALIZATION_HELP, group=WEIGHTS, choices=NORMALIZATIONS)
    # learned weights (docs/objective.md#learned-weights; witscale/training/learned_weights.py)
    learn_weights: bool = option(
        False, "tune the class weights online by a first-order validation hypergradient on --eval-data (needed); "
               "ZeRO-0/1/2 ± tp, --normalization nonzero or tokens", group=WEIGHTS)
    learn_classes: str = option(
        "", "--learn-weights: classes each learned on its own weight, e.g. 'prompt,system'; the others stay fixed "
            "(default: one weight for the prompt side, the response side fixed as the reference)", group=WEIGHTS)
    weights_every: int = option(10, "--learn-weights: measure the hypergradient and update λ every K steps",
                                group=WEIGHTS, metavar="K", check=at_least(1))
    weights_lr: float = option(0.1, "--learn-weights: α in λ ← λ·exp(−α·h/RMS(h))", group=WEIGHTS,
                               check=non_negative)
    weights_bounds: tuple[float, float] = option(
        (1e-3, 10.0), "--learn-weights: λ is kept in [LOW, HIGH] (LOW > 0; a class starting at 0 starts at LOW)",
        group=WEIGHTS, metavar=("LOW", "HIGH"))
    weights_objective: str = option(
        "", "--learn-weights: the validation loss's class weights, e.g. 'response=1,eot=1' (classes not named: 0; "
            "default: the response side's mean NLL)", group=WEIGHTS)
    # objective (docs/objective.md#dpo): 'sft' (the weighted token loss) or 'dpo' on preference pairs
    objective: str = option("sft", "sft: the weighted token loss (default); dpo: Direct Preference Optimization on "
                                   "a preference dataset (pack_dataset.py --task preference) whose reference "
                                   "log-probs tools/precompute_reference.py has written; simpo, orpo: the "
                                   "reference-free SimPO and ORPO on a preference dataset (docs/objective.md#simpo, "
                                   "#orpo)",
                            group=OBJECTIVE, choices=OBJECTIVES)
    # An objective's own settings (its ``flags``, witscale/training/objectives): None = not given; filled with
    # its ``defaults`` when it is the run's, left None otherwise (where
    # train.py refuses any that was given rather than ignore it); checked by DPOSettings.check
    beta: Optional[float] = option(None, f"DPO: β, the strength of the KL penalty (default {DPO_DEFAULTS['beta']})",
                                   group=OBJECTIVE)
    dpo_loss: Optional[str] = option(None, "DPO: sigmoid (−log σ(β·margin), the DPO paper's) or ipo ((margin − "
                                           f"1/(2β))², on summed log-probs); default {DPO_DEFAULTS['dpo_loss']}",
                                     group=OBJECTIVE, choices=DPO_LOSSES)
    label_smoothing: Optional[float] = option(
        None, "DPO sigmoid: ε in [0, 0.5), the assumed rate of flipped preference labels (cDPO); default "
              f"{_number(DPO_DEFAULTS['label_smoothing'])}", group=OBJECTIVE)
    reference_model: Optional[str] = option(
        None, "DPO: the reference (SFT) HF directory, when it is not --model; the data's reference log-probs must "
              "come from it (default: from --model, the usual DPO start)", group=OBJECTIVE, metavar="DIR")
    pairs_per_step: Optional[int] = option(
        None, "DPO: choose --grad-accum so that a step holds about N pairs (from the data's mean pairs per row); "
              "the loss is divided by the exact pair count of each step", group=OBJECTIVE, metavar="N",
        check=at_least(1))
    simpo_beta: Optional[float] = option(
        None, "SimPO: β, the reward scale of the mean response log-prob ā (default "
              f"{_number(SIMPO_DEFAULTS['simpo_beta'])}, the paper's)", group=OBJECTIVE, metavar="BETA")
    simpo_gamma: Optional[float] = option(
        None, "SimPO: γ, the target reward margin in −log σ(β·ā_chosen − β·ā_rejected − γ) (default "
              f"{_number(SIMPO_DEFAULTS['simpo_gamma'])})", group=OBJECTIVE, metavar="GAMMA")
    simpo_label_smoothing: Optional[float] = option(
        None, "SimPO: ε in [0, 0.5), as DPO's --label-smoothing (default "
              f"{_number(SIMPO_DEFAULTS['simpo_label_smoothing'])}, the paper's)", group=OBJECTIVE, metavar="EPS")
    orpo_lambda: Optional[float] = option(
        None, "ORPO: λ, the weight of the odds-ratio term beside the SFT term (default "
              f"{_number(ORPO_DEFAULTS['orpo_lambda'])})", group=OBJECTIVE, metavar="LAMBDA")
    preset: Optional[str] = option(     # recorded only: its values are already in the fields
        None, "documented defaults; explicit flags override them. "
              + "; ".join(f"{name}: {_as_flags(values)}" for name, values in PRESETS.items()),
        group=SETTINGS, choices=tuple(sorted(PRESETS)))
    # optimization
    micro_batch_size: int = option(1, "packed rows per micro-batch per rank", group=OPTIMIZATION, check=at_least(1))
    grad_accum: Optional[int] = option(  # None: 1, or (--pairs-per-step) resolved by train.py's plan_run
        None, "micro-batches per optimizer step per rank (default 1, or from --pairs-per-step)", group=OPTIMIZATION,
        check=at_least(1))
    lr: Optional[float] = option(       # None: the objective's default_lr
        None, "peak learning rate (default: the paper's, by --objective: "
              + ", ".join(f"{_number(c.default_lr)} for {c.name}" for c in registered()) + "; it used 5e-6 for Mistral-7B sft)",
        group=OPTIMIZATION, check=positive)
    weight_decay: float = option(0.1, group=OPTIMIZATION, check=non_negative)
    adam_betas: tuple[float, float] = option((0.9, 0.999), group=OPTIMIZATION)
    adam_eps: float = option(1e-8, group=OPTIMIZATION)
    warmup_ratio: float = option(0.01, "linear warm-up fraction, then cosine decay", group=OPTIMIZATION,
                                 check=fraction)
    max_steps: Optional[int] = option(None, "optimizer steps to run", group=OPTIMIZATION, one_of="length",
                                      check=at_least(1))
    epochs: Optional[float] = option(None, "passes over the packed rows (default 1)", group=OPTIMIZATION,
                                     one_of="length", check=positive)
    clip_grad: Optional[float] = option(
        None, "global grad-norm clipping; default off, as in the paper (DeepSpeed's own default, 1.0, is "
              "overridden). With clipping, (λp, λr) and (cλp, cλr) no longer train alike.", group=OPTIMIZATION,
        check=non_negative)
    seed: int = option(0, group=OPTIMIZATION)
    no_shuffle: bool = option(False, "visit rows in stored order", group=OPTIMIZATION)
    # checkpoints, evaluation, export
    save_steps: int = option(0, "checkpoint every N steps (always at the end)", group=OUTPUTS, check=non_negative)
    keep_checkpoints: int = option(
        2, "keep the last K complete checkpoints (never pruning the newest one recorded finite)", group=OUTPUTS,
        check=non_negative)
    skip_nonfinite: int = option(       # non-finite steps skipped before the run stops (training/guard.py)
        0, "a step with a NaN/inf loss or gradient norm stops the run (exit 3, nothing saved after it); with N > 0 "
           "up to N such steps are skipped (update not applied, logged) first", group=OUTPUTS, metavar="N",
        check=non_negative)
    resume: Optional[str] = option(
        None, "'auto': continue from <output-dir>/checkpoints/latest if it exists; or a checkpoint path",
        group=OUTPUTS, metavar="auto|PATH")
    allow_data_change: bool = option(False, "resume even though the packed data differs from the checkpoint's",
                                     group=OUTPUTS)
    allow_tokenizer_mismatch: bool = option(
        False, "train although the data's tokenizer digest differs from --model's (or --tokenizer's) tokenizer "
               "files (logged); without it that is refused", group=DATA)
    reschedule: bool = option(          # resume on a schedule rebuilt for this run's length (train.py)
        False, "resume although --max-steps/--epochs/the global batch/--warmup-ratio change the schedule: continue "
               "at the checkpoint's step on the warm-up + cosine schedule of this run's length, with this run's "
               "--lr/--weight-decay/--adam-betas/--adam-eps in place of the checkpoint's (refused without it)",
        group=OUTPUTS)
    eval_data: Optional[str] = option(None, "packed eval set, scored every --eval-steps and at the end",
                                      group=OUTPUTS)
    eval_steps: int = option(0, "evaluate every N steps (0: only at the end)", group=OUTPUTS, check=non_negative)
    export_hf: Optional[str] = option(
        None, "at the end, write an HF directory (safetensors + config + tokenizer files); it replaces only an "
              "earlier witscale export there (or an empty directory), and never --output-dir or a directory "
              "containing it", group=OUTPUTS, metavar="DIR")
    export_dtype: str = option(
        "bf16", "dtype of the --export-hf weights (recorded in config.json as torch_dtype; default bf16)",
        group=OUTPUTS, choices=tuple(EXPORT_DTYPES))
    tokenizer: Optional[str] = option(None, "tokenizer files to copy into --export-hf (default: those in --model, "
                                            "if any)", group=OUTPUTS)
    log_every: int = option(1, "console line every N steps (non-TTY)", group=OUTPUTS, check=non_negative)
    no_tensorboard: bool = option(False, "the same as leaving tensorboard out of --report-to", group=OUTPUTS)
    report_to: str = option(            # checked with --no-tensorboard by train.py's report_sinks
        "tensorboard", "where metrics go besides metrics.jsonl: a comma list of tensorboard, wandb (Weights & "
                       "Biases, rank 0: the resolved config and every metric; pip install 'witscale[wandb]'; "
                       "WANDB_MODE=offline works without a network), none (default tensorboard)",
        group=OUTPUTS, metavar="SINKS")
    # parallelism and runtime
    tp: int = option(1, "tensor-parallel size", group=RUNTIME)
    pp: int = option(1, "pipeline-parallel size (ZeRO-0/1 configs only)", group=RUNTIME)
    sp: int = option(1, "sequence-parallel size (Ulysses): each rank holds 1/sp of every packed row, attention "
                        "exchanges heads for the whole row (docs/parallel-layout.md#sequence-parallelism); ZeRO-0..3, "
                        "with --tp; not with --pp, --compile or --learn-weights", group=RUNTIME, check=at_least(1))
    tp_sequence_parallel: str = option(  # resolved by witscale/train.py
        "auto", "at --tp > 1, shard the residual stream, the norms and the checkpointed block inputs along the "
                "sequence over the TP ranks (Megatron's sequence parallelism: all-gather before the column-parallel "
                "linears, reduce-scatter after the row-parallel ones; the same results, 1/tp of that memory; "
                "docs/parallel-layout.md#tp-sequence-parallelism). auto (default): on at --tp > 1 with --sp > 1 or "
                "activation checkpointing on; each rank's row length (--seq-len / --sp) must divide by --tp; not "
                "with --compile", group=RUNTIME, choices=TP_SEQUENCE_PARALLEL)
    pp_partition: str = option(
        "uniform", "pipeline stages: the same number of decoder layers each (embedding on the first, norm + LM "
                   "head on the last), or balanced parameter counts", group=RUNTIME, choices=PARTITION_METHODS)
    activation_checkpointing: str = option(  # resolved by witscale/train.py
        "auto", "recompute each decoder block in backward (saves activations, costs ~1/3 more compute); offload: "
                "the same, each block's input kept in (pinned) host memory until backward (long rows; not with "
                "--pp); auto (default): on where the planner says the layout would not fit this GPU without it, "
                "off on the CPU", group=RUNTIME, choices=ACTIVATION_CHECKPOINTING, nargs="?", const="on")
    tiled_mlp: int = option(
        1, "run each block's gated MLP over N sequence tiles, forward and backward (DeepSpeed's TiledMLP): its "
           "[tokens, intermediate] activations exist for one tile at a time, for one more MLP forward per step "
           "(long rows; not with --pp); 1 (default): untiled", group=RUNTIME, metavar="N", check=at_least(1))
    attention: str = option(
        "auto", "packed-attention backend (witscale/model/attention.py lists them); auto: torch's varlen "
                "(FlashAttention-2) kernels on a bf16 GPU, sdpa_grouped (documents batched by length) on the CPU; "
                "with attention soft-capping (Gemma-2) flash_varlen or flex on a GPU, eager on the CPU. All keep "
                "attention inside documents.", group=RUNTIME, metavar="BACKEND", check=_attention_backend)
    compile: bool = option(                 # refused with ZeRO-3 and --pp by witscale/train.py
        False, "torch.compile each decoder block (norms, RoPE and the gated MLP fused; attention stays eager); "
               "ZeRO-0..2 with any --tp", group=RUNTIME)
    dist_timeout: float = option(
        30.0, "collective timeout (NCCL/gloo) in minutes; a rank that fails ends the job at once whatever this is "
              "(default 30: long enough for a 70B checkpoint write between barriers); after the first step it "
              "bounds only checkpoint saves and the export", group=RUNTIME, metavar="MINUTES", check=positive)
    peak_tflops: Optional[float] = option(   # None: training/peak_flops.py
        None, "the GPU's dense bf16 peak for MFU (default: by exact GPU model; unknown cards log no MFU)",
        group=RUNTIME, metavar="TFLOPS", check=positive)
    step_timeout: float = option(       # the step watchdog after the first step, outside saves/export
        300.0, "after the first step, a phase of a step (its batch, forward/backward/optimizer, each evaluation "
               "micro-batch) that makes no progress for this long ends the job, naming the ranks and hosts that "
               "stopped (the step watchdog; collectives time out 60 s after it); saves and the export are bounded "
               "by --dist-timeout instead (default 300)", group=RUNTIME,
        metavar="SECONDS", check=positive)
    log_level: str = option("INFO", group=RUNTIME)

    def __post_init__(self):
        # Defaults that depend on the objective (frozen: set through object.__setattr__, once, here); an unknown
        # name keeps SFT's lr and is refused where the objective is built (objectives.get_objective).
        from witscale.training.objectives import DEFAULT_OBJECTIVE, find_objective, get_objective
        objective = find_objective(self.objective) or get_objective(DEFAULT_OBJECTIVE)
        if self.lr is None:
            object.__setattr__(self, "lr", objective.default_lr)
        for key, default in objective.defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)
        if self.grad_accum is None and not self.pairs_per_step:
            object.__setattr__(self, "grad_accum", 1)     # left None for --pairs-per-step to decide
        check_values(type(self), self.__dict__)           # every range, one line naming the flag

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values["adam_betas"] = tuple(values.get("adam_betas", cls.adam_betas))
        values["weights_bounds"] = tuple(values.get("weights_bounds", cls.weights_bounds))
        return cls(**values)

    def as_dict(self) -> dict:
        return asdict(self)
