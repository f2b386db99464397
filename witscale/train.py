"""witscale training entry point.

    deepspeed --num_gpus 8 witscale/train.py --ds_config ds_configs/zero3.json --data packed/ --model llama-7b/ ...
    torchrun --nproc_per_node 2 witscale/train.py ...
    python witscale/train.py ...            (a single process)

Every flag and file is checked before any process group is created: a bad run fails in a second with one
line that says what is wrong, not after minutes of start-up on a cluster.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, replace

if __package__ in (None, ""):   # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from witscale.data.classes import CLASS_NAMES, PROMPT_SIDE, RESPONSE_SIDE  # noqa: E402
from witscale.data.weighting import build_weight_table, describe_weight_table, parse_class_weights  # noqa: E402
from witscale.training.config import GROUPS, PRESETS, SETTINGS, RunConfig, side_names  # noqa: E402
from witscale.training.ds_config import DSConfigError, fill_ds_config, load_ds_config, zero_stage  # noqa: E402
from witscale.training.flags import UsageError, add_flags  # noqa: E402,F401 - UsageError: train.py's refusals

log = logging.getLogger("witscale")


class _PresetParser(argparse.ArgumentParser):
    """``--preset NAME`` sets the defaults of PRESETS[NAME] and ``--config FILE`` sets those of the file, over
    the preset's; flags given on the command line override both whatever their order. Precedence: explicit
    flag > config file > preset > built-in default (witscale/training/config_file.py)."""

    def parse_known_args(self, args=None, namespace=None):
        from witscale.training.config_file import apply_config_file, settings_from_file
        args = list(sys.argv[1:] if args is None else args)
        first = argparse.ArgumentParser(add_help=False)
        first.add_argument("--preset", choices=sorted(PRESETS), default=None)
        first.add_argument("--config", default=None)
        early, _ = first.parse_known_args(args)
        settings = settings_from_file(early.config, self) if early.config else {}
        preset = early.preset or settings.get("preset")
        if preset:
            self.set_defaults(**PRESETS[preset])
        if settings:
            apply_config_file(self, early.config, settings)
        parsed, rest = super().parse_known_args(args, namespace)
        if settings:
            _flags_beat_file_in_groups(self, args, settings, parsed)
        return parsed, rest


def _flags_beat_file_in_groups(parser: argparse.ArgumentParser, argv: list, settings: dict, parsed) -> None:
    """A flag given beside --config replaces the file's member of its one-of group (--model beats the file's
    model_config, --epochs its max_steps) instead of colliding with it."""
    given = {a.dest for a in parser._actions
             if any(arg == s or arg.startswith(s + "=") for s in a.option_strings for arg in argv)}
    for group in parser._mutually_exclusive_groups:
        dests = {a.dest for a in group._group_actions}
        if dests & given:
            for dest in dests - given:
                if dest in settings:
                    setattr(parsed, dest, None)


def build_parser() -> argparse.ArgumentParser:
    """The flags are RunConfig's fields (witscale/training/config.py declares each once, with its help, group,
    choices and range check); only --config and the launcher's --local_rank are the parser's own."""
    p = _PresetParser(
        prog="witscale/train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Weighted Instruction Tuning on DeepSpeed: prompt tokens weighted λp, response tokens λr.",
        epilog="Token classes: " + ", ".join(CLASS_NAMES) + f". --prompt-weight sets {side_names(PROMPT_SIDE, ', ')}; "
               f"--response-weight sets {side_names(RESPONSE_SIDE, ', ')}; pad is always 0.")
    groups = add_flags(p, RunConfig, groups=GROUPS)
    groups[SETTINGS].add_argument(
        "--config", default=None, metavar="FILE",
        help="settings from a YAML or JSON file (keys: these flags' names, e.g. max_steps; a run's "
             "effective_config.json is accepted); flags given beside it win (configs/ has examples)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


@dataclass
class Plan:
    """Everything validated, before any process group exists."""
    config: RunConfig
    model_config: object
    dataset: object
    eval_dataset: object
    weight_table: object
    ds_config: dict
    world_size: int
    dims: object
    total_steps: int
    steps_per_epoch: int
    activation_checkpointing: bool | str = False     # True/False, or "offload"
    tp_sequence_parallel: bool = False      # --tp-sequence-parallel, resolved (_tp_sequence_parallel)
    vocab_grown_from: int | None = None     # --model's vocabulary, grown to the data's (--add-special-tokens)
    config_file: dict | None = None         # --config's path and digest (config_file.config_file_record)


def _require_file(path: str, flag: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or directory")


def plan_run(cfg: RunConfig, world_size: int) -> Plan:
    from witscale.data.loader import check_model_compat, grow_model_config
    from witscale.data.format import PackedDataset
    from witscale.model import ModelConfig
    from witscale.parallel.topology import LayoutError, ParallelDims
    from witscale.training.distributed import validation_shard

    try:
        table = build_weight_table(cfg.prompt_weight, cfg.response_weight, parse_class_weights(cfg.class_weights))
    except ValueError as e:
        raise UsageError(str(e)) from None
    # every flag's own range (and --attention's name) was checked when cfg was built: RunConfig's fields
    from witscale.model.attention import check_backend_request
    _require_file(cfg.data, "--data")
    try:
        dataset = PackedDataset(cfg.data, shard=validation_shard(world_size))
    except (OSError, ValueError) as e:
        raise UsageError(f"--data {cfg.data}: {e}") from None
    if cfg.model:
        _require_file(os.path.join(cfg.model, "config.json"), "--model")
        config_path = os.path.join(cfg.model, "config.json")
    else:
        _require_file(cfg.model_config, "--model-config")
        config_path = cfg.model_config
    try:
        model_config = ModelConfig.from_json_file(config_path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        message = str(e)                # from_json_file's ValueErrors already name the file
        raise UsageError(message if message.startswith(config_path) else f"{config_path}: {message}") from None
    try:
        check_model_compat(dataset.manifest, model_config, cfg.data)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model_config, grown_from = grow_model_config(dataset.manifest, model_config)     # --add-special-tokens data
    _check_tokenizer_identity(cfg, dataset, "--data")
    try:
        check_backend_request(cfg.attention, model_config.attn_logit_softcapping)
    except ValueError as e:
        raise UsageError(f"--attention {cfg.attention} with {config_path}: {e}") from None
    _check_objective(cfg, dataset, table)

    _require_file(cfg.ds_config, "--ds_config")
    try:
        raw_ds = load_ds_config(cfg.ds_config)
        dims = ParallelDims(world_size, cfg.tp, cfg.pp, zero_stage(raw_ds), model_config, sp=cfg.sp,
                            gpus_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None)    # torchrun's
    except (DSConfigError, LayoutError) as e:
        raise UsageError(str(e)) from None
    if dataset.seq_len % cfg.sp:     # each sp rank takes a contiguous 1/sp of every row
        raise UsageError(f"--data {cfg.data}: rows of {dataset.seq_len} tokens cannot be cut into --sp {cfg.sp} "
                         "equal parts; repack with a --seq-len divisible by it")
    if cfg.micro_batch_size * dataset.seq_len >= 1 << 31:     # PackedLoader refuses it too (int32 cu_seqlens)
        raise UsageError(f"--data {cfg.data}: --micro-batch-size {cfg.micro_batch_size} rows of {dataset.seq_len} "
                         f"tokens is 2^31 tokens or more, beyond the int32 cu_seqlens of packed attention: lower it")
    if dims.pp > 1 and (cfg.activation_checkpointing == "offload" or cfg.tiled_mlp > 1):
        # DeepSpeed's pipeline engine checkpoints the stages' blocks itself (pipeline.py): neither is wired there
        raise UsageError(f"--pp {dims.pp}: --activation-checkpointing offload and --tiled-mlp are not supported with "
                         "pipeline parallelism yet; use --activation-checkpointing on and --tiled-mlp 1")
    if cfg.compile:
        from witscale.model.transformer import compile_refusal
        why = compile_refusal(zero_stage=dims.zero_stage, pp=dims.pp, sp=dims.sp)
        if why:
            raise UsageError(f"--compile with {cfg.ds_config}: {why}")
    if cfg.grad_accum is None:
        cfg = replace(cfg, grad_accum=grad_accum_for_pairs(cfg, dataset.manifest, dims.dp))
    elif cfg.pairs_per_step:
        log.info(f"--grad-accum {cfg.grad_accum} given: --pairs-per-step {cfg.pairs_per_step} is not used")
    import torch
    try:
        ds_config = fill_ds_config(
            raw_ds, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum, dp_size=dims.dp,
            clip_grad=cfg.clip_grad, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas),
            eps=cfg.adam_eps, hidden_size=model_config.hidden_size, use_cuda=torch.cuda.is_available(),
            path=cfg.ds_config)
    except DSConfigError as e:
        raise UsageError(str(e)) from None

    global_rows = cfg.micro_batch_size * cfg.grad_accum * dims.dp
    if len(dataset) < global_rows:
        raise UsageError(f"--data {cfg.data} has {len(dataset)} packed rows but one optimizer step needs "
                         f"{global_rows} (micro-batch {cfg.micro_batch_size} × grad-accum {cfg.grad_accum} × "
                         f"data-parallel {dims.dp})")
    eval_dataset = None
    if cfg.eval_data:
        _require_file(cfg.eval_data, "--eval-data")
        try:
            eval_dataset = PackedDataset(cfg.eval_data, shard=validation_shard(world_size))
            check_model_compat(eval_dataset.manifest, model_config, cfg.eval_data)
            if len(eval_dataset) == 0:
                raise ValueError("the eval set has no rows")
        except (OSError, ValueError) as e:
            raise UsageError(f"--eval-data {cfg.eval_data}: {e}") from None
        _check_tokenizer_identity(cfg, eval_dataset, "--eval-data")
        _check_objective(cfg, eval_dataset, table, flag="--eval-data")
    _check_learn_weights(cfg, table, zero_stage(raw_ds))
    report_sinks(cfg)
    if cfg.resume not in (None, "auto") and not os.path.exists(cfg.resume):
        raise UsageError(f"--resume {cfg.resume}: no such checkpoint")
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    if cfg.resume is None and os.path.isdir(ckpt_root) and os.listdir(ckpt_root):
        raise UsageError(f"--output-dir {cfg.output_dir} already holds checkpoints: pass --resume auto to "
                         "continue that run, or choose a new --output-dir")
    if cfg.tokenizer:
        _require_file(cfg.tokenizer, "--tokenizer")
    if cfg.export_hf:     # never discovered after days of training: a path the export may not replace
        from witscale.data.output_dir import OutputError
        from witscale.training.export import check_export_path
        try:
            check_export_path(cfg.export_hf, cfg.output_dir)
        except OutputError as e:
            raise UsageError(str(e)) from None
    steps_per_epoch = len(dataset) // global_rows
    total = cfg.max_steps if cfg.max_steps else max(1, int(steps_per_epoch * (cfg.epochs or 1.0)))
    checkpointing = _activation_checkpointing(cfg, model_config, dims, ds_config, dataset.seq_len)
    rows = [("--data", cfg.data, dataset), ("--eval-data", cfg.eval_data, eval_dataset)]
    tp_sequence_parallel = _tp_sequence_parallel(cfg, dims, checkpointing, rows)
    return Plan(cfg, model_config, dataset, eval_dataset, table, ds_config, world_size, dims, total,
                steps_per_epoch, checkpointing, tp_sequence_parallel, grown_from)


def _check_learn_weights(cfg: RunConfig, table, stage: int) -> None:
    """--learn-weights: refused in one line before anything starts where it cannot work; its settings without it
    are refused rather than ignored."""
    from witscale.training.learned_weights import WeightLearner, check_layout, parse_learn_classes, validation_table
    from witscale.training.objectives import DEFAULT_OBJECTIVE
    if not cfg.learn_weights:
        given = [f"--{f.replace('_', '-')}" for f in ("learn_classes", "weights_every", "weights_lr", "weights_bounds",
                                                      "weights_objective")
                 if getattr(cfg, f) != getattr(RunConfig, f)]
        if given:
            raise UsageError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} with --learn-weights only")
        return
    if not cfg.eval_data:
        raise UsageError("--learn-weights needs --eval-data: the validation loss it tunes the weights on")
    if cfg.objective != DEFAULT_OBJECTIVE:
        raise UsageError(f"--learn-weights tunes the weighted token loss (--objective {DEFAULT_OBJECTIVE}) only")
    try:
        check_layout(stage, cfg.pp, cfg.normalization, cfg.sp)
        WeightLearner(parse_learn_classes(cfg.learn_classes), table, validation_table(cfg.weights_objective), None,
                      every=cfg.weights_every, lr=cfg.weights_lr, bounds=cfg.weights_bounds)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_tokenizer_identity(cfg: RunConfig, dataset, flag: str) -> None:
    """The data's tokenizer digest against the tokenizer that goes with the model: --model's files and
    --tokenizer (what --export-hf copies). A mismatch is refused unless --allow-tokenizer-mismatch; warnings
    are logged once (rank 0)."""
    from witscale.data.loader import check_tokenizer_identity
    from witscale.training.distributed import rank_from_env
    notes = []
    for source_flag, source in (("--model", cfg.model), ("--tokenizer", cfg.tokenizer)):
        if not source:
            continue
        try:
            note = check_tokenizer_identity(dataset.manifest, source, f"{flag} {dataset.path}", flag=source_flag,
                                            allow_mismatch=cfg.allow_tokenizer_mismatch)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if note and note not in notes:
            notes.append(note)
    for note in notes if rank_from_env() == 0 else ():
        log.warning(note)


def _check_objective(cfg: RunConfig, dataset, table, flag: str = "--data") -> None:
    """The objective's settings and its checks of the data (witscale/training/objectives: e.g. SFT refuses
    preference data, DPO SFT data or reference log-probs of another model); flags of other objectives are
    refused rather than ignored (the user meant something)."""
    from witscale.training.objectives import foreign_flags, objective_for
    try:
        objective = objective_for(cfg)
        objective.check()
        from witscale.training.trainer import check_sequence_parallel_objective
        check_sequence_parallel_objective(objective, cfg.sp)
        objective.check_data(dataset.manifest, getattr(dataset, "path", cfg.data), table, cfg, flag)
        foreign = foreign_flags(cfg)
        if foreign:
            owners = foreign[0][1]
            raise ValueError(f"{', '.join(f for f, o in foreign if o == owners)} apply to --objective "
                             f"{' or '.join(owners)} only")
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None


def grad_accum_for_pairs(cfg: RunConfig, manifest: dict, dp: int) -> int:
    """--pairs-per-step N: the --grad-accum whose global batch holds about N pairs, from the data's mean pairs
    per row (rows hold a variable number of pairs; each step divides by its exact pair count)."""
    per_row = float(manifest.get("pairs_per_row") or 0)
    if per_row <= 0:
        raise UsageError(f"--pairs-per-step: --data {cfg.data} records no pairs_per_row (not a preference dataset?)")
    accum = max(1, round(cfg.pairs_per_step / (per_row * cfg.micro_batch_size * dp)))
    log.info(f"--pairs-per-step {cfg.pairs_per_step}: --grad-accum {accum} (mean {per_row:.2f} pairs per row × "
             f"micro-batch {cfg.micro_batch_size} × dp {dp} × {accum} ≈ "
             f"{per_row * cfg.micro_batch_size * dp * accum:.1f} pairs per step)")
    return accum


def _activation_checkpointing(cfg: RunConfig, model_config, dims, ds_config: dict, seq_len: int) -> bool | str:
    """--activation-checkpointing auto: on where the planner's estimate without it exceeds 90% of this GPU;
    'offload' as given (the model's mode: witscale/model/memory.py)."""
    if cfg.activation_checkpointing == "offload":
        return "offload"
    if cfg.activation_checkpointing != "auto":
        return cfg.activation_checkpointing == "on"
    import torch
    if not torch.cuda.is_available():
        return False
    from witscale.planner import Layout, ModelShape, needs_activation_checkpointing
    gpu_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2 ** 30
    layout = Layout(dims.tp, dims.pp, dims.dp, zero_stage(ds_config), dims.sp)
    on = needs_activation_checkpointing(ModelShape.from_config(model_config), layout, seq_len=seq_len,
                                        micro_batch=cfg.micro_batch_size, gpu_gib=gpu_gib)
    log.info(f"--activation-checkpointing auto: {'on' if on else 'off'} (planner, {gpu_gib:.0f} GiB per GPU)")
    return on


def _tp_sequence_parallel(cfg: RunConfig, dims, checkpointing, datasets) -> bool:
    """--tp-sequence-parallel: ``on`` where it cannot run is refused in one line; ``auto`` is on at tp > 1 when
    sp > 1 or activation checkpointing resolved on (the planner said memory is tight, or the user asked),
    and off where it cannot run (said in the log). The rule for rows: each TP rank holds 1/tp of the tokens
    an sp rank holds, so seq_len / sp of the training (and eval) rows must divide by tp — packed rows have a
    fixed length, so this is decided here, once."""
    if cfg.tp_sequence_parallel == "off":
        return False
    why = None
    if dims.tp == 1:
        why = "it shards over the TP ranks and --tp is 1"
    elif cfg.compile:
        why = "not with --compile: compiled blocks around its sequence collectives are not tested yet"
    else:
        for flag, path, data in (d for d in datasets if d[2] is not None):
            per_rank = data.seq_len // dims.sp
            if per_rank % dims.tp:
                why = (f"{flag} {path}: rows of {data.seq_len} tokens ({per_rank} per --sp rank) cannot be cut into "
                       f"--tp {dims.tp} equal parts (repack with a --seq-len divisible by sp × tp = "
                       f"{dims.sp * dims.tp})")
                break
    if cfg.tp_sequence_parallel == "on":
        if why:
            raise UsageError(f"--tp-sequence-parallel on: {why}; or pass --tp-sequence-parallel off")
        return True
    on = why is None and (dims.sp > 1 or checkpointing)
    if dims.tp > 1:
        reason = why or ("--sp > 1" if dims.sp > 1 else "activation checkpointing on" if checkpointing
                         else "neither --sp > 1 nor activation checkpointing")
        log.info(f"--tp-sequence-parallel auto: {'on' if on else 'off'} ({reason})")
    return on


def run(args: argparse.Namespace | RunConfig):
    """Validate, start the process group, train. Returns (trainer, per-step results)."""
    import torch
    import torch.distributed as dist

    from witscale.parallel.topology import Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import PeerFailureWatch, init_distributed, world_size_from_env
    from witscale.training.run_lock import hold_output_dir

    config = args if isinstance(args, RunConfig) else RunConfig.from_args(args)
    world = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    plan = plan_run(config, world)
    if getattr(args, "config", None):
        from witscale.training.config_file import config_file_record
        plan = replace(plan, config_file=config_file_record(args.config))
    init_distributed(timeout_minutes=config.dist_timeout)
    # One run per output directory: decided by rank 0 before anything heavy starts or any file is written.
    lock = hold_output_dir(config.output_dir)
    try:
        plan = replace(plan, ds_config=_choose_optimizer(plan.ds_config, world))
        watch = PeerFailureWatch() if world > 1 else None
        topo = Topology(plan.dims)
        if dist.get_rank() == 0:
            _announce(plan, topo)
        torch.manual_seed(config.seed)
        module = build_module(plan.model_config, topo, plan.ds_config, model_dir=config.model, seed=config.seed,
                              pp_partition=config.pp_partition, attention=config.attention,
                              activation_checkpointing=plan.activation_checkpointing,
                              grow_vocab_from=plan.vocab_grown_from, compile_blocks=config.compile,
                              tp_sequence_parallel=plan.tp_sequence_parallel, tiled_mlp=config.tiled_mlp)
        result = train_loop(plan, topo, module)
        if watch is not None:
            watch.stop()        # from here on, rank 0 (the store's host) may leave first
    finally:
        if lock is not None:
            lock.release()
    return result


def _choose_optimizer(ds_config: dict, world: int) -> dict:
    """Build DeepSpeed's FusedAdam now, bounded, before any model loads (witscale/training/optim.py
    ``prepare_optimizer``), once the process group exists. If any rank cannot have it, every rank trains with torch's
    fused AdamW (the ranks must agree: one optimizer for the whole ZeRO group)."""
    import torch.distributed as dist

    from witscale.training.build import training_device
    from witscale.training.distributed import any_rank
    from witscale.training.optim import prepare_optimizer

    chosen, why = prepare_optimizer(ds_config, log)
    if not (any_rank(why is not None, training_device()) if world > 1 else why is not None):
        return chosen
    if why is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0:     # one line per node
        log.warning(f"{why}: training with torch's fused AdamW instead")
    elif why is None and dist.get_rank() == 0:
        log.warning("another node cannot build DeepSpeed's FusedAdam: every rank trains with torch's fused AdamW")
    return {k: v for k, v in ds_config.items() if k != "optimizer"}


def train_loop(plan: Plan, topo, module):
    """Resume if asked, then step until done or preempted; checkpoint, evaluate and log on the way."""
    import torch.distributed as dist

    from witscale.data.loader import PackedLoader
    from witscale.training import checkpoint, preemption, watchdog
    from witscale.training.distributed import long_collectives, record_progress, use_step_timeout
    from witscale.training.faults import first_attempt, injected, slow_save_seconds
    from witscale.training.guard import check_step
    from witscale.training.metrics import MetricsLogger
    from witscale.training.objectives import objective_for
    from witscale.training.trainer import Trainer

    cfg = plan.config
    vocab = plan.model_config.vocab_size
    loader = PackedLoader(plan.dataset, plan.weight_table, micro_batch_size=cfg.micro_batch_size,
                          grad_accum=cfg.grad_accum, dp_size=topo.dp, dp_rank=topo.dp_rank, seed=cfg.seed,
                          shuffle=not cfg.no_shuffle, vocab_size=vocab,
                          sp_size=topo.sp, sp_rank=topo.sp_rank)   # --sp: each rank reads its part of the rows
    eval_loader = None
    if plan.eval_dataset is not None:
        # Evaluation reads every row once; a set smaller than one micro-batch is fine.
        eval_loader = PackedLoader(plan.eval_dataset, plan.weight_table,
                                   micro_batch_size=min(cfg.micro_batch_size, len(plan.eval_dataset)),
                                   grad_accum=1, dp_size=1, dp_rank=0, seed=0, shuffle=False, vocab_size=vocab,
                                   sp_size=topo.sp, sp_rank=topo.sp_rank)
    learner = None
    if cfg.learn_weights:       # checked by plan_run
        from witscale.training.learned_weights import WeightLearner, parse_learn_classes, validation_table
        learner = WeightLearner(parse_learn_classes(cfg.learn_classes), plan.weight_table,
                                validation_table(cfg.weights_objective), eval_loader, every=cfg.weights_every,
                                lr=cfg.weights_lr, bounds=cfg.weights_bounds)
    trainer = Trainer(module=module, ds_config=plan.ds_config, loader=loader, topo=topo,
                      normalization=cfg.normalization, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      betas=cfg.adam_betas, eps=cfg.adam_eps, total_steps=plan.total_steps,
                      warmup_ratio=cfg.warmup_ratio, activation_checkpointing=plan.activation_checkpointing,
                      objective=objective_for(cfg), peak_tflops=cfg.peak_tflops, weight_learner=learner)
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    fingerprints = {"data_fingerprint": checkpoint.data_fingerprint(plan.dataset.manifest),
                    "model_fingerprint": checkpoint.model_fingerprint(plan.model_config)}
    if dist.get_rank() == 0:        # a save killed last time (preemption overran): its partial tag goes
        checkpoint.retire_partial_tags(ckpt_root)
    if cfg.resume:
        where = trainer.resume(cfg.resume, ckpt_root, allow_data_change=cfg.allow_data_change, **fingerprints)
        log.info(f"resumed from {where} at step {trainer.step}" if where
                 else "--resume auto: no checkpoint yet, starting fresh")
        if where:
            check_optimizer_on_resume(plan, trainer, where)
            check_schedule_on_resume(plan, trainer, where)

    save_times = []
    # Under pp an evaluation is one pipeline schedule, beaten once at its end: the watchdog gives it a step timeout
    # per micro-batch of this rank's share (each forward is shorter than a training step).
    eval_budget = None
    if eval_loader is not None and topo.pp > 1:
        eval_budget = cfg.step_timeout * math.ceil(len(plan.eval_dataset) / topo.dp / eval_loader.micro_batch_size)

    def save():
        started = time.monotonic()
        with long_collectives():
            if slow_save_seconds():
                time.sleep(slow_save_seconds())      # test-only (witscale/training/faults.py)
            trainer.save_checkpoint(ckpt_root, cfg.keep_checkpoints, args={k: str(v) for k, v in cfg.as_dict().items()},
                                    schedule=schedule_record(plan), **fingerprints)
        save_times.append(time.monotonic() - started)
        if len(save_times) == 1 and dist.get_rank() == 0:
            _check_signal_lead(save_times[0])

    def evaluate_now(final: bool) -> bool:
        every = cfg.eval_steps and trainer.step % cfg.eval_steps == 0
        return eval_loader is not None and (every if not final else not every)

    sinks = report_sinks(cfg)
    metrics = MetricsLogger(cfg.output_dir, plan.total_steps, enabled=dist.get_rank() == 0,
                            log_every=cfg.log_every, tensorboard="tensorboard" in sinks, start_step=trainer.step,
                            wandb_config=resolved_config(plan) if "wandb" in sinks else None,
                            objective=trainer.objective)
    results, preempted, last_saved = [], False, None
    try:
        while trainer.step < plan.total_steps:
            # The step watchdog (from the second step on) gives each phase --step-timeout: time stamps, no sync.
            watchdog.arm(f"step {trainer.step + 1}: loading its batch")
            if injected("raise_in_step", trainer.step + 1):
                raise RuntimeError(f"injected fault before step {trainer.step + 1} (WITSCALE_FAULT)")
            if injected("stop_in_step", trainer.step + 1) and first_attempt():
                os.kill(os.getpid(), signal.SIGSTOP)       # a hung rank: alive, silent, never joining
            if injected("sleep_in_step", trainer.step + 1) and first_attempt():
                time.sleep(3600)        # a rank stuck outside any collective (a dead filesystem's read)
            batch = loader.next_step()
            watchdog.arm(f"step {trainer.step + 1}: forward/backward/optimizer")
            result = trainer.train_step(batch)
            record_progress(trainer.step)
            if len(results) == 0:       # the first step is done: from now on a hung rank is found in minutes
                use_step_timeout(cfg.step_timeout, cfg.dist_timeout * 60)
            results.append(result)
            metrics.write(result.as_dict())
            # a non-finite step stops here (NonFiniteError) before any save or export, or is skipped
            check_step(result, batch, lambda: loader.global_batch_rows(batch.epoch, batch.step_in_epoch),
                       trainer.skipped_nonfinite, cfg.skip_nonfinite)
            if evaluate_now(final=False):
                watchdog.arm(f"step {trainer.step}: evaluation", eval_budget)       # beaten by each micro-batch
                metrics.write(trainer.evaluate(eval_loader, progress=watchdog.beating(metrics.eval_progress())))
            if cfg.save_steps and trainer.step % cfg.save_steps == 0:
                save()
                last_saved = trainer.step
            # After the step, its evaluation and its save: a signal that came during any of them stops the run
            # here — no further step, and no second save of a step just saved.
            watchdog.arm(f"step {trainer.step}: preemption check")
            if preemption.agreed(device=trainer.device):
                log.warning(f"preemption signal ({preemption.signal_names() or 'on another rank'}): "
                            + (f"checkpointing at step {trainer.step} and exiting" if last_saved != trainer.step
                               else f"step {trainer.step} was just checkpointed; exiting"))
                if last_saved != trainer.step:
                    save()
                preempted = True
                break
        if not preempted:
            if evaluate_now(final=True):
                watchdog.arm("the final evaluation", eval_budget)
                metrics.write(trainer.evaluate(eval_loader, progress=watchdog.beating(metrics.eval_progress())))
            watchdog.disarm()
            if last_saved != trainer.step:
                save()
            if cfg.export_hf:
                from witscale.training.export import export_from_engine
                from witscale.data.template_jinja import training_meta
                # the loader's table: the run's weights, or the learned ones at the end (--learn-weights)
                meta = training_meta(cfg.data, {CLASS_NAMES[i]: float(w) for i, w in enumerate(trainer.loader.table)},
                                     cfg.normalization, cfg.objective)
                if learner is not None:
                    meta["learned_weights"] = learner.metrics()
                with long_collectives():
                    export_from_engine(trainer, plan.model_config, cfg.export_hf,
                                       tokenizer_src=_export_tokenizer(cfg, plan.dataset), dtype=cfg.export_dtype,
                                       meta=meta)
    finally:
        watchdog.stop()
        metrics.close()
    return trainer, results


def _export_tokenizer(cfg: RunConfig, dataset) -> str | None:
    """The tokenizer files --export-hf copies: the data's extended tokenizer when it was packed with
    --add-special-tokens (its ids are the model's), else --tokenizer, else --model's."""
    from witscale.data.loader import data_tokenizer_dir
    return data_tokenizer_dir(cfg.data, dataset.manifest) or cfg.tokenizer or cfg.model


def report_sinks(cfg: RunConfig) -> list[str]:
    """--report-to checked (before start-up): the metric sinks besides metrics.jsonl."""
    from witscale.training.metrics import parse_report_to
    try:
        sinks = parse_report_to(cfg.report_to, no_tensorboard=cfg.no_tensorboard)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if "wandb" in sinks:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("--report-to wandb: wandb is not installed (pip install 'witscale[wandb]')") from None
    return sinks


def resolved_config(plan: Plan) -> dict:
    """What effective_config.json holds: every setting, the weight table (the λ of each class), the total steps,
    the layout, the filled DeepSpeed config and the --config file's path and sha256 (None without one); also
    the run's W&B config."""
    cfg = plan.config
    return {"args": cfg.as_dict(), "ds_config": plan.ds_config,
            "weight_table": {CLASS_NAMES[i]: float(w) for i, w in enumerate(plan.weight_table)},
            "total_steps": plan.total_steps,
            "layout": {"world": plan.dims.world_size, "tp": plan.dims.tp, "pp": plan.dims.pp, "dp": plan.dims.dp,
                       "sp": plan.dims.sp, "tp_sequence_parallel": plan.tp_sequence_parallel},
            "rendezvous": (f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT')}"   # None: one process,
                           if os.environ.get("MASTER_ADDR") else None),                      # an in-memory store
            "config_file": plan.config_file}


def schedule_record(plan: Plan) -> dict:
    """What the learning-rate schedule was built from, saved in each checkpoint's state file."""
    cfg = plan.config
    from witscale.training.optim import warmup_steps_for
    return {"total_steps": plan.total_steps, "warmup_steps": warmup_steps_for(plan.total_steps, cfg.warmup_ratio),
            "warmup_ratio": cfg.warmup_ratio, "max_steps": cfg.max_steps, "epochs": cfg.epochs,
            "global_rows": cfg.micro_batch_size * cfg.grad_accum * plan.dims.dp,
            "steps_per_epoch": plan.steps_per_epoch}


def check_schedule_on_resume(plan: Plan, trainer, where: str) -> None:
    """A resume continues the checkpoint's schedule. One whose flags build another (a longer --max-steps
    would otherwise train a step at the 0 the ended cosine left, then jump onto a curve of another length) is
    refused in one line naming the flag; with --reschedule it continues at the checkpoint's step on the
    schedule of this run's length, and says so."""
    from witscale.training.checkpoint import CheckpointError, read_state
    from witscale.training.optim import restate_schedule
    cfg = plan.config
    saved = read_state(os.path.dirname(where), os.path.basename(where)).get("schedule")
    now = schedule_record(plan)
    if saved is None:
        log.warning(f"{where} records no schedule (written before witscale saved one): resuming without checking "
                    "that --max-steps/--epochs/the global batch are the same")
        if cfg.reschedule:
            restate_schedule(trainer.scheduler)
        return
    same = (saved["total_steps"], saved["warmup_steps"]) == (now["total_steps"], now["warmup_steps"])
    if same:
        return
    for key, flag in (("max_steps", "--max-steps"), ("epochs", "--epochs"), ("warmup_ratio", "--warmup-ratio"),
                      ("global_rows", "the global batch (--micro-batch-size × --grad-accum × ranks)")):
        if saved.get(key) != now[key]:
            cause = f"{flag} {now[key]} (the checkpoint's: {saved.get(key)})"
            break
    else:
        cause = f"--data ({now['steps_per_epoch']} steps per epoch, the checkpoint's: {saved.get('steps_per_epoch')})"
    old = f"{saved['total_steps']} steps with {saved['warmup_steps']} of warm-up"
    new = f"{now['total_steps']} steps with {now['warmup_steps']} of warm-up"
    if not cfg.reschedule:
        raise CheckpointError(f"{where} was trained on a schedule of {old}; {cause} makes it {new}: give the "
                              f"checkpoint's value to continue its schedule, or --reschedule to continue at step "
                              f"{trainer.step} on the schedule of a {now['total_steps']}-step run")
    lr = restate_schedule(trainer.scheduler)
    log.info(f"--reschedule: {where} was on a schedule of {old}; continuing at step {trainer.step} on the warm-up + "
             f"cosine schedule of {new} ({cause}): lr {lr:.3g} at step {trainer.step + 1}")


def check_optimizer_on_resume(plan: Plan, trainer, where: str) -> None:
    """A checkpoint load brings back its peak lr (the scheduler's state), weight decay, betas and eps (the
    optimizer's): a resume whose flags give others would train on the checkpoint's while the user believes
    theirs in effect. Refused in one line naming the flag; with --reschedule this run's are applied, and said."""
    from witscale.training.checkpoint import CheckpointError
    from witscale.training.optim import apply_optimizer_settings, optimizer_settings, restate_schedule
    cfg = plan.config
    saved = optimizer_settings(trainer.scheduler)
    now = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "adam_betas": tuple(cfg.adam_betas),
           "adam_eps": cfg.adam_eps}
    changed = [key for key in now if not _same_setting(now[key], saved[key])]
    if not changed:
        return
    flags = ", ".join(f"--{key.replace('_', '-')} {_setting(now[key])} (the checkpoint's: {_setting(saved[key])})"
                      for key in changed)
    if not cfg.reschedule:
        raise CheckpointError(f"{where} was trained with other optimizer settings; {flags}: a resume keeps the "
                              f"checkpoint's, so give its value, or --reschedule to continue at step {trainer.step} "
                              "with this run's")
    apply_optimizer_settings(trainer.scheduler, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.adam_betas,
                             eps=cfg.adam_eps)
    lr = restate_schedule(trainer.scheduler)
    log.info(f"--reschedule: continuing {where} at step {trainer.step} with {flags}: lr {lr:.3g} at step "
             f"{trainer.step + 1}")


def _same_setting(a, b) -> bool:
    """Equal up to float round-off (a value that went through the checkpoint's JSON/pickle and back)."""
    a, b = (tuple(v) if isinstance(v, (tuple, list)) else (v,) for v in (a, b))
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))


def _setting(value) -> str:
    return " ".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"


def _check_signal_lead(seconds: float) -> None:
    """Log the first checkpoint's duration; warn when it is within 2× of the preemption lead time
    (WITSCALE_SIGNAL_LEAD_S, which the Slurm templates set from their --signal=B:USR1@N): a save started
    by the warning must finish before Slurm's SIGKILL, and Slurm may signal up to 60 s late or early."""
    lead = float(os.environ.get("WITSCALE_SIGNAL_LEAD_S", "0") or 0)
    log.info(f"first checkpoint written in {seconds:.1f} s" + (f" (preemption lead {lead:.0f} s)" if lead else ""))
    if lead and 2 * seconds > lead:
        log.warning(f"a checkpoint takes {seconds:.0f} s, more than half the preemption lead of {lead:.0f} s "
                    "(WITSCALE_SIGNAL_LEAD_S, from #SBATCH --signal): a preempted job may be killed in its save; "
                    "raise --signal=B:USR1@N to at least twice the save time")


def _announce(plan: Plan, topo) -> None:
    cfg = plan.config
    os.makedirs(cfg.output_dir, exist_ok=True)
    _add_file_log(os.path.join(cfg.output_dir, "train.log"))
    log.info(topo.describe())
    from witscale.training.objectives import objective_for
    log.info(objective_for(cfg).startup_line(describe_weight_table(plan.weight_table), cfg.normalization))
    log.info(epoch_summary(plan))
    with open(os.path.join(cfg.output_dir, "model_config.json"), "w", encoding="utf-8") as f:
        json.dump(plan.model_config.to_hf_dict(), f, indent=2)     # read by tools/export_hf.py
    with open(os.path.join(cfg.output_dir, "effective_config.json"), "w", encoding="utf-8") as f:
        json.dump(resolved_config(plan), f, indent=2, default=str)


def epoch_summary(plan: Plan) -> str:
    """Rows, steps per epoch and total steps; PackedLoader skips the remainder of each epoch that does not fill
    a global batch, so that share is said too (it can be large on small data, e.g. DPO's --pairs-per-step)."""
    cfg = plan.config
    global_rows = cfg.micro_batch_size * cfg.grad_accum * plan.dims.dp
    skipped = len(plan.dataset) - plan.steps_per_epoch * global_rows
    remainder = (f" ({skipped} rows of each epoch skipped: they do not fill a global batch of {global_rows})"
                 if skipped else "")
    return (f"{len(plan.dataset)} packed rows of {plan.dataset.seq_len} tokens; {plan.steps_per_epoch} steps per "
            f"epoch{remainder}; training {plan.total_steps} steps")


def _add_file_log(path: str) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)


def main(argv=None) -> int:
    from witscale.training import preemption
    preemption.install()        # first: SLURM's signal can come before start-up is over
    return entry_point(run, build_parser, argv)


def entry_point(run_fn, make_parser, argv=None) -> int:
    """The process around ``run_fn(args)`` (train.py's ``run``; tools/precompute_reference.py's): flags parsed by
    ``make_parser()``, logging (rank-tagged lines; --log-level on rank 0, WARNING elsewhere), each refusal as one
    line and its exit code, never a barrier after an error (``fail_fast``), the process group torn down at the
    end. Install signal handlers before calling it. Returns the exit code."""
    from witscale.training.config_file import ConfigFileError
    try:
        args = make_parser().parse_args(argv)
    except ConfigFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # DeepSpeed logs through the root logger: keep it at WARNING, witscale's own at --log-level.
    from witscale.parallel.topology import teardown
    from witscale.training.distributed import fail_fast, node_name, rank_from_env, said_once, world_size_from_env
    # Every line says where it came from once there are several ranks (one merged Slurm log of 64 ranks).
    where = f" {node_name().replace('%', '%%')} r{rank_from_env()}" if world_size_from_env() > 1 else ""
    logging.basicConfig(level=logging.WARNING, format=f"[witscale{where}] %(message)s", stream=sys.stdout)
    log.setLevel(args.log_level.upper())
    if rank_from_env() != 0:
        log.setLevel(logging.WARNING)
    from witscale.data.output_dir import OutputError
    from witscale.training.checkpoint import CheckpointError
    from witscale.training.guard import NonFiniteError
    from witscale.training.run_lock import OutputDirRefused
    from witscale.training.optim import ExtensionBuildError
    try:
        run_fn(args)
    except UsageError as e:     # before any process group exists
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:    # often every rank meets the same one: the first to meet it says it
        fail_fast(2, said_once(f"error: {e}"))
    except OutputDirRefused as e:
        fail_fast(2, f"error: {e}" if str(e) else "")       # rank 0 alone says it
    except NonFiniteError as e:     # every rank sees the same step: rank 0 says it
        fail_fast(3, f"error: {e}" if rank_from_env() == 0 else "")
    except OutputError as e:    # the export at the end: refused, or an OSError (path and errno named)
        fail_fast(2, f"error: {e}")
    except ExtensionBuildError as e:
        fail_fast(1, f"error: {e}")
    except BaseException:       # noqa: BLE001 - KeyboardInterrupt and SystemExit too
        # Never wait in a barrier for ranks that may be stuck in a collective with this one: print the
        # traceback now and leave; the launcher then ends the other ranks within seconds.
        fail_fast()
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
