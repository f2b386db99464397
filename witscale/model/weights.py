"""Weights in, one path for every layout: a seeded random init or an HF safetensors checkpoint, into a
dense ``CausalLM`` or a pipeline stage, tensor-parallel or not, ZeRO-3-partitioned or not.

One mechanism: ``materialize_parameters(module, value_fn)`` copies ``value_fn(name, param)`` — this rank's
tensor for the parameter, i.e. its tensor-parallel shard of the dense HF tensor — into every parameter;
under ZeRO-3 it is written through ``GatheredParameters`` so that each rank keeps only its partition. The
HF name of each parameter comes from witscale/model/hf_names.py. Because the random init is keyed by the
HF *name* and drawn at the dense shape before sharding, every layout (tp=1 or 2, ZeRO-0 or 3, pp=1 or 2)
starts from bit-identical weights — what the equivalence tests rely on. Loading reads, per rank, only the
slices it keeps (safetensors ``get_slice``), strictly: missing, unexpected and mis-shaped tensors are
errors naming the file and tensor.
"""
from __future__ import annotations

import zlib
from typing import Callable, Optional

import torch

from witscale.model.config import ModelConfig
from witscale.model.family import family_spec
from witscale.model.hf_io import (CheckpointFormatError, SafetensorsSource, SliceFn, tp_slice_fn,
                                  whole_tensor)
from witscale.model.hf_names import checkpoint_to_hf_name, hf_name_fn
from witscale.model.transformer import dense_shapes
from witscale.parallel.layers import shard_dense

ValueFn = Callable[[str, torch.nn.Parameter], torch.Tensor]


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def seeded_dense(name: str, shape, seed: int, std: float, norm_init: float = 1.0) -> torch.Tensor:
    """The dense init of one parameter: N(0, std) matrices, neutral norms, zero biases; seeded by name.
    ``norm_init``: a norm weight's neutral value, the family's (family.py ``norm_init``: 1 for x·w, 0 for
    Gemma's x·(1 + w))."""
    if name.endswith("norm.weight"):
        return torch.full(tuple(shape), float(norm_init))
    if name.endswith(".bias"):
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    return torch.randn(tuple(shape), generator=gen).mul_(std)    # in place: one dense temporary, not two


def materialize_parameters(model: torch.nn.Module, value_fn: ValueFn) -> None:
    """Copy ``value_fn(name, param)`` into every parameter of ``model`` (tied parameters once).

    A ZeRO-3-partitioned parameter is gathered, filled by ONE rank of its data-parallel group — its owner,
    round-robin over the parameters, so that the group shares the reading — and re-partitioned from that
    rank's copy on exit (``modifier_rank``): only the owner reads the tensor from the checkpoint."""
    import torch.distributed as dist

    with torch.no_grad():
        for index, (name, p) in enumerate(model.named_parameters()):
            if is_zero3_param(p):
                import deepspeed    # only here: importing it costs seconds, and plain models never need it

                group = p.ds_process_group
                owner = index % dist.get_world_size(group)
                with deepspeed.zero.GatheredParameters([p], modifier_rank=owner):
                    if dist.get_rank(group) == owner:
                        _copy_checked(name, p, value_fn(name, p))
            else:
                _copy_checked(name, p, value_fn(name, p))


def _copy_checked(name: str, p: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(p.shape) != tuple(value.shape):
        raise ValueError(f"parameter {name}: expected shape {tuple(p.shape)}, the source has {tuple(value.shape)}")
    p.data.copy_(value)      # converts to the parameter's dtype on the fly: no full-size temporary


def init_weights(module: torch.nn.Module, seed: int, tp_rank: int = 0, tp: int = 1) -> None:
    """Seeded random init from the config: N(0, initializer_range) matrices, neutral norms, zero biases.
    Drawn per HF parameter name at the dense shape, then sliced: every layout gets the same dense weights."""
    cfg = module.config
    shapes, to_hf = dense_shapes(cfg), hf_name_fn(module)
    norm_init = family_spec(cfg).norm_init

    def value(name, p):
        hf = to_hf(name)
        return shard_dense(p, seeded_dense(hf, shapes[hf], seed, cfg.initializer_range, norm_init), tp_rank, tp)
    materialize_parameters(module, value)


def _tied_names(module: torch.nn.Module) -> set[str]:
    """Parameter names that alias an earlier parameter (tied embeddings): not read from the file."""
    seen, tied = {}, set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied


def load_hf_weights(module: torch.nn.Module, path: str, slice_fn: Optional[SliceFn] = None) -> None:
    """Fill every parameter of ``module`` (a whole model or one pipeline stage) from the HF safetensors
    checkpoint in ``path`` (one file or shards with an index), strictly: a tensor this module needs but the
    files lack, a tensor that is no parameter of the model, or a wrong shape is a CheckpointFormatError
    naming the file and tensor. ``slice_fn(name, slice)`` returns this rank's tensor from the lazy slice
    (default: all of it). A tied LM head takes the embedding; a stored copy is ignored."""
    cfg = module.config
    source = SafetensorsSource(path, rename=checkpoint_to_hf_name(cfg))
    slice_fn = slice_fn or whole_tensor
    to_hf = hf_name_fn(module)
    needed = {to_hf(n) for n, _ in module.named_parameters()}
    known = set(dense_shapes(cfg)) | {to_hf(n) for n in _tied_names(module)}
    if cfg.tie_word_embeddings:
        known.add("lm_head.weight")
    unexpected = sorted(set(source.names()) - known)
    if unexpected:
        first = unexpected[0]
        raise CheckpointFormatError(f"{source.file_of(first)}: tensor {first} is not a parameter of the model"
                                    + (f" (and {len(unexpected) - 1} more: {', '.join(unexpected[1:4])}…)"
                                       if len(unexpected) > 1 else ""))
    missing = sorted(needed - set(source.names()))
    if missing:
        raise CheckpointFormatError(f"{path}: tensor {missing[0]} is missing from the checkpoint"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def value(name: str, p: torch.Tensor) -> torch.Tensor:
        hf = to_hf(name)
        try:
            t = slice_fn(name, source.slice(hf))
        except ValueError as e:
            if isinstance(e, CheckpointFormatError):
                raise
            raise CheckpointFormatError(f"{source.file_of(hf)}: {hf}: {e}") from None
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointFormatError(
                f"{source.file_of(hf)}: tensor {hf} gives shape {tuple(t.shape)} "
                f"(stored {source.shape(hf)}), the model expects {tuple(p.shape)}")
        return t
    materialize_parameters(module, value)


def load_model_weights(module: torch.nn.Module, config: ModelConfig, *, model_dir: Optional[str], seed: int,
                       topo=None) -> None:
    """Fill a (TP-sharded, ZeRO-3-partitioned, or pipeline-stage) module from HF safetensors or a seeded init."""
    tp, tp_rank = (topo.tp, topo.tp_rank) if topo is not None else (1, 0)
    if model_dir is None:
        init_weights(module, seed, tp_rank, tp)
    else:
        load_hf_weights(module, model_dir, tp_slice_fn(module, tp_rank, tp))
