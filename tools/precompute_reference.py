#!/usr/bin/env python3
"""Reference log-probs for DPO, computed once and stored in the packed preference dataset.

    torchrun --nproc_per_node 8 tools/precompute_reference.py --data packed/prefs-4k --model runs/sft/hf \\
        --ds_config ds_configs/zero3.json [--tp 2] [--pp 2] [--sp 2]
    python tools/precompute_reference.py --data packed/prefs-4k --model runs/sft/hf     (one process)

A no-grad pass of the reference (SFT) model over every packed row — each data-parallel rank its share of
the rows, every layout training has (ZeRO-0..3, tp, pp, sp; the model built and loaded by the trainer's own
path, witscale/training/build.py, and run through the same DeepSpeed engine) — gives each completion's
summed log-prob of its loss tokens, Σ_t w_t·log p(y_t), from the same fused vocab-parallel kernel that DPO
training uses (witscale/training/objectives/reference.py: ``ReferencePass``, run by ``Trainer.forward_only``
over the rows ``Trainer.rank_micro_batches`` gives each rank — evaluation's row loop). Rank 0 gathers them and writes them once,
atomically, through ``format.write_reference_logps``, with a fingerprint of the reference model (config,
safetensors index and headers, sizes) and the class-weight table the sums were taken under: training
refuses a dataset whose table differs from its own, or whose fingerprint differs from --reference-model, or
whose arrays changed since (``format.content_digest``). Concurrent passes over one dataset take turns.
Training then holds one model in memory. The weights default to DPO's (prompt side 0, response side 1).

Memory: the pass runs in the trainer's DeepSpeed engine built without an optimizer (Trainer(optimizer_state=
False)): the model's weights as training lays them out (ZeRO-3 partitioned, gathered layer by layer), but no fp32
master copy, gradient partitions or Adam moments; activations are those of a no-grad forward.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from witscale.train import entry_point  # noqa: E402 - one line per refusal, as train.py's
from witscale.training.config import RunConfig  # noqa: E402
from witscale.training.flags import UsageError, add_flags, check_values  # noqa: E402

log = logging.getLogger("witscale")


SHARED_WITH_TRAIN = ("tp", "pp", "sp", "micro_batch_size", "prompt_weight", "response_weight", "class_weights",
                     "attention", "allow_tokenizer_mismatch", "dist_timeout", "log_level")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="packed preference dataset (pack_dataset.py --task preference)")
    p.add_argument("--model", required=True, help="the reference model: an HF directory (config.json + safetensors)")
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", default=None,
                   help="DeepSpeed JSON of the layout (default ds_configs/zero0.json; zero3.json partitions the model)")
    # the settings it shares with witscale/train.py: the same declarations (RunConfig's fields), help and checks
    add_flags(p, RunConfig, SHARED_WITH_TRAIN, grouped=False, help={
        "micro_batch_size": "packed rows per forward per rank",
        "prompt_weight": "λp of the loss tokens (DPO: 0)", "response_weight": "λr of the loss tokens (DPO: 1)",
        "allow_tokenizer_mismatch": "write the log-probs although the data's tokenizer digest differs from "
                                    "--model's tokenizer files (logged); without it that is refused",
        "dist_timeout": "collective timeout (NCCL/gloo) in minutes (default 30)"})
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def plan(args, world_size: int):
    """Everything checked before a process group exists: (dataset, model config, table, ds config, dims)."""
    from witscale.data.format import PackedDataset
    from witscale.data.loader import check_model_compat, check_tokenizer_identity
    from witscale.data.weighting import build_weight_table, parse_class_weights
    from witscale.model import ModelConfig
    from witscale.model.attention import check_backend_request
    from witscale.parallel.topology import LayoutError, ParallelDims
    from witscale.training.distributed import rank_from_env, validation_shard
    from witscale.training.ds_config import DSConfigError, fill_ds_config, load_ds_config, zero_stage

    try:
        table = build_weight_table(args.prompt_weight, args.response_weight, parse_class_weights(args.class_weights))
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_values(RunConfig, vars(args), SHARED_WITH_TRAIN)     # the ranges train.py checks, one line each
    if not os.path.exists(args.data):
        raise UsageError(f"--data {args.data}: no such file or directory")
    try:
        # damaged or stale old values get replaced; each rank validates its share of the rows
        dataset = PackedDataset(args.data, load_reference=False, shard=validation_shard(world_size))
    except (OSError, ValueError) as e:
        raise UsageError(f"--data {e}") from None
    if dataset.manifest.get("task") != "preference":
        raise UsageError(f"--data {args.data} is not a preference dataset (tools/pack_dataset.py --task preference)")
    config_path = os.path.join(args.model, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"--model {args.model}: no config.json (an HF directory with safetensors is needed)")
    try:
        model_config = ModelConfig.from_json_file(config_path)
        check_model_compat(dataset.manifest, model_config, args.data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    try:
        note = check_tokenizer_identity(dataset.manifest, args.model, f"--data {args.data}",
                                        allow_mismatch=args.allow_tokenizer_mismatch)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if note and rank_from_env() == 0:
        log.warning(note)           # once, not once per rank
    try:
        check_backend_request(args.attention, model_config.attn_logit_softcapping)
    except ValueError as e:
        raise UsageError(f"--attention {args.attention} with --model {args.model}: {e}") from None
    ds_path = args.ds_config or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             "ds_configs", "zero0.json")
    if not os.path.isfile(ds_path):
        raise UsageError(f"--ds_config {ds_path}: no such file")
    try:
        raw = load_ds_config(ds_path)
        dims = ParallelDims(world_size, args.tp, args.pp, zero_stage(raw), model_config, sp=args.sp,
                            gpus_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None)    # as train.py
        import torch
        ds_config = fill_ds_config(raw, micro_batch_size=args.micro_batch_size, grad_accum=1, dp_size=dims.dp,
                                   clip_grad=None, lr=1e-6, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                                   hidden_size=model_config.hidden_size, use_cuda=torch.cuda.is_available(),
                                   path=ds_path)
    except (DSConfigError, LayoutError) as e:
        raise UsageError(str(e)) from None
    if dataset.seq_len % dims.sp:     # each sp rank takes a contiguous 1/sp of every row, as in training
        raise UsageError(f"--data {args.data}: rows of {dataset.seq_len} tokens cannot be cut into --sp {dims.sp} "
                         "equal parts; repack with a --seq-len divisible by it")
    return dataset, model_config, table, ds_config, dims


def reference_pass(trainer, loader, dataset):
    """This rank's (global document ids, log-probs): the trainer's row loop (``Trainer.rank_micro_batches``:
    contiguous shares over the data-parallel ranks, as many forwards on every rank; sp peers take the same
    rows), each micro-batch through ``ReferencePass``, whose per-completion sums are added over the sp group
    (every sp rank returns the whole rows'). Under pp only the last stage returns values."""
    import numpy as np

    from witscale.training.objectives.reference import ReferencePass

    ids, values = [], []
    for chunk, mb in trainer.rank_micro_batches(loader):
        (out,) = trainer.forward_only([mb], ReferencePass(trainer.topo.sp_group))
        logps = None if out is None else out.logps
        if logps is not None and len(chunk):
            # the micro-batch's completions are its rows' documents, row by row (the loader's order)
            docs = np.concatenate([np.arange(*dataset.doc_range(int(r))) for r in chunk])
            if len(docs) != logps.shape[0]:
                raise RuntimeError(f"rows {chunk.tolist()}: {logps.shape[0]} completions scored, the dataset "
                                   f"has {len(docs)} documents there")
            ids.append(docs)
            values.append(logps.double().cpu().numpy())    # once per micro-batch: a tool, not the hot path
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(ids), np.concatenate(values)


def replacement_notice(manifest: dict, fingerprint: str) -> str | None:
    """A warning when the dataset already holds another model's reference log-probs (a dataset holds one: a
    DPO run against that model would now be refused or, without --reference-model, use these ones)."""
    old = manifest.get("reference") or {}
    if not old or old.get("fingerprint") == fingerprint:
        return None
    return (f"replacing the reference log-probs of {old.get('model', 'another model')} (fingerprint "
            f"{str(old.get('fingerprint'))[:12]}) in this dataset: each reference model needs its own copy of "
            f"the data")


def run(args) -> str:
    import numpy as np
    import torch
    import torch.distributed as dist

    from witscale.data.format import write_reference_logps
    from witscale.data.loader import PackedLoader
    from witscale.parallel.topology import Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed, world_size_from_env
    from witscale.training.objectives.reference import reference_fingerprint, weight_table_record
    from witscale.training.trainer import Trainer

    world = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    dataset, model_config, table, ds_config, dims = plan(args, world)
    from witscale.data.loader import grow_model_config       # data packed with --add-special-tokens: the same
    model_config, grown_from = grow_model_config(dataset.manifest, model_config)   # grown model as training's
    try:
        fingerprint = reference_fingerprint(args.model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    t0 = time.perf_counter()
    init_distributed(timeout_minutes=args.dist_timeout)
    topo = Topology(dims)
    torch.manual_seed(0)
    module = build_module(model_config, topo, ds_config, model_dir=args.model, seed=0,
                          attention=args.attention, grow_vocab_from=grown_from)
    # Read in order, every row once (as evaluation's loader; the trainer's row loop shares the rows over dp).
    loader = PackedLoader(dataset, table, micro_batch_size=min(args.micro_batch_size, len(dataset)), grad_accum=1,
                          dp_size=1, dp_rank=0, shuffle=False, vocab_size=model_config.vocab_size)
    # The trainer's engine (no step is ever taken): the same layouts, ZeRO-3 gathering and pipeline schedule.
    trainer = Trainer(module=module, ds_config=ds_config, loader=loader, topo=topo, normalization="nonzero",
                      lr=1e-6, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, total_steps=1, warmup_ratio=0.0,
                      optimizer_state=False)
    ids, values = reference_pass(trainer, loader, dataset)
    from witscale.training.faults import slow_reference_seconds
    time.sleep(slow_reference_seconds())         # tests: a long pass, for a preemption warning to land in
    # Only one rank per (dp replica) contributes: the last stage's tp and sp rank 0 (their peers hold the same numbers).
    contributes = topo.pp_rank == topo.pp - 1 and topo.tp_rank == 0 and topo.sp_rank == 0
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((ids, values) if contributes else None, gathered, dst=0)
    where = ""
    if dist.get_rank() == 0:
        num_docs = int(dataset.manifest["num_documents"])
        full = np.full(num_docs, np.nan)
        for part in gathered:
            if part is not None:
                full[part[0]] = part[1]
        missing = np.flatnonzero(~np.isfinite(full))
        if len(missing):
            raise RuntimeError(f"{len(missing)} of {num_docs} completions got no finite reference log-prob "
                               f"(first: document {int(missing[0])})")
        meta = {"model": os.path.abspath(args.model), "fingerprint": fingerprint,
                "weight_table": weight_table_record(table),
                "layout": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp, "sp": dims.sp},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        notice = replacement_notice(dataset.manifest, fingerprint)
        if notice:
            log.warning(notice)
        write_reference_logps(args.data, full, meta)
        where = args.data
        log.info(f"reference log-probs of {num_docs} completions written to {args.data} "
                 f"({time.perf_counter() - t0:.1f} s; fingerprint {fingerprint[:12]})")
    dist.barrier()
    return where


def stop_on_signals() -> None:
    """TERM or USR1 (a preemption warning: slurm/dpo_common.sh forwards it) ends the pass at once, exit 128+N:
    it has no checkpoint, and nothing half-written is left (the write is atomic). Needed because the Slurm
    launch (slurm/launch_task.sh) starts the ranks with both signals ignored, for train.py to install its own."""
    import signal

    def stop(signum, frame):
        print(f"[witscale] reference pass stopped by {signal.Signals(signum).name}: nothing written",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)      # no barrier, no teardown: the peers get the same signal
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, stop)


def main(argv=None) -> int:
    stop_on_signals()
    # train.py's process: refusals in one line, a failed write (OutputError: a full disk …) in one line with the
    # dataset left as it was, never a barrier after an error, teardown.
    return entry_point(run, build_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
