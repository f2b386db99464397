"""The run configuration: every setting of a training run, typed, built once from the command line.

``RunConfig`` mirrors ``witscale/train.py``'s flags one to one (a field per flag, the flag's name with
``_``), so ``--help`` documents it; the rest of the code takes this object, never the argparse namespace.
It is frozen: a run's settings do not change once it has started (``effective_config.json`` records them).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Optional


DEFAULT_LR = {"sft": 2e-5, "dpo": 5e-7}      # the paper's learning rates for SFT and for DPO
DPO_DEFAULTS = {"beta": 0.1, "dpo_loss": "sigmoid", "label_smoothing": 0.0}


@dataclass(frozen=True)
class RunConfig:
    # data and model
    data: str
    output_dir: str
    ds_config: str
    model: Optional[str] = None            # HF checkpoint directory, or
    model_config: Optional[str] = None     # an HF-style config.json for a seeded random init
    # loss weights (docs/objective.md)
    prompt_weight: float = 0.0
    response_weight: float = 1.0
    class_weights: str = ""
    normalization: str = "nonzero"
    # objective (docs/objective.md#dpo): 'sft' (the weighted token loss) or 'dpo' on preference pairs
    objective: str = "sft"
    # DPO-only settings: None = not given; filled with DPO_DEFAULTS for DPO, left None for SFT (where
    # train.py refuses any that was given rather than ignore it)
    beta: Optional[float] = None
    dpo_loss: Optional[str] = None         # sigmoid | ipo
    label_smoothing: Optional[float] = None
    reference_model: Optional[str] = None  # checked against the data's reference fingerprint
    pairs_per_step: Optional[int] = None   # DPO: choose --grad-accum for about this many pairs per step
    preset: Optional[str] = None           # recorded only: its values are already in the fields above
    # optimization
    micro_batch_size: int = 1
    grad_accum: Optional[int] = 1          # None only until plan_run resolves --pairs-per-step
    lr: Optional[float] = None             # None: DEFAULT_LR of the objective
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.01
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    clip_grad: Optional[float] = None
    seed: int = 0
    no_shuffle: bool = False
    # checkpoints, evaluation, export
    save_steps: int = 0
    keep_checkpoints: int = 2
    skip_nonfinite: int = 0                # non-finite steps skipped before the run stops (training/guard.py)
    resume: Optional[str] = None
    allow_data_change: bool = False
    allow_tokenizer_mismatch: bool = False
    reschedule: bool = False               # resume on a schedule rebuilt for this run's length (train.py)
    eval_data: Optional[str] = None
    eval_steps: int = 0
    export_hf: Optional[str] = None
    export_dtype: str = "bf16"
    tokenizer: Optional[str] = None
    log_every: int = 1
    no_tensorboard: bool = False
    report_to: str = "tensorboard"         # comma list of tensorboard, wandb, none (metrics.jsonl always)
    # parallelism and runtime
    tp: int = 1
    pp: int = 1
    pp_partition: str = "uniform"
    activation_checkpointing: str = "auto"    # auto | on | off (resolved by witscale/train.py)
    attention: str = "auto"
    dist_timeout: float = 30.0
    peak_tflops: Optional[float] = None    # the GPU's dense bf16 peak for MFU (None: training/peak_flops.py)
    step_timeout: float = 300.0          # seconds; the step watchdog after the first step, outside saves/export
    log_level: str = "INFO"

    def __post_init__(self):
        # Defaults that depend on the objective (frozen: set through object.__setattr__, once, here).
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR.get(self.objective, DEFAULT_LR["sft"]))
        if self.objective == "dpo":
            for key, default in DPO_DEFAULTS.items():
                if getattr(self, key) is None:
                    object.__setattr__(self, key, default)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values["adam_betas"] = tuple(values.get("adam_betas", cls.adam_betas))
        if values.get("grad_accum") is None and not values.get("pairs_per_step"):
            values["grad_accum"] = 1       # --grad-accum's default; left None for --pairs-per-step to decide
        return cls(**values)

    def as_dict(self) -> dict:
        return asdict(self)
