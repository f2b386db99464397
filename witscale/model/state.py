"""Weights out, one path for every layout: the dense, HF-named state of the whole model.

For each parameter of this rank's module: gather its ZeRO-3 partitions (one parameter at a time), then its
tensor-parallel shards, trim the vocabulary padding, move it to the host in fp32 and name it by HF's name
(witscale/model/hf_names.py); under pipeline parallelism the stages then exchange what they hold. The
result — the same on every rank — is what an HF checkpoint of the model holds (witscale/training/export.py
writes it; the tests compare it across layouts).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from witscale.model.hf_names import hf_name_fn
from witscale.parallel.layers import gather_dense


def _zero3_gathered(p: torch.Tensor):
    if not hasattr(p, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters([p], modifier_rank=None)


def dense_state_dict(module: torch.nn.Module, topo) -> dict[str, torch.Tensor]:
    """Dense HF-named fp32 host tensors of the WHOLE model, on every rank (collective over all ranks)."""
    cfg = module.config
    to_hf = hf_name_fn(module)
    group = topo.get_tensor_model_parallel_group() if topo.tp > 1 else None
    mine = {}
    for name, p in module.named_parameters():
        with _zero3_gathered(p):
            full = gather_dense(p, p.detach().float(), group,
                                cfg.vocab_size if getattr(p, "padded_dense_rows", None) else None)
            mine[to_hf(name)] = full.cpu()
    if topo.pp == 1:
        return mine
    stages = [None] * topo.pp
    dist.all_gather_object(stages, mine, group=topo.get_pipeline_model_parallel_group())
    return {name: t for part in stages for name, t in part.items()}
