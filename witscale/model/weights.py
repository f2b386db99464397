"""Weights in, one path for every layout: a seeded random init or an HF safetensors checkpoint, into a
dense ``CausalLM`` or a pipeline stage, tensor-parallel or not, ZeRO-3-partitioned or not.

One mechanism: ``materialize_parameters(module, value_fn)`` copies ``value_fn(name, param, rows)`` — rows
``rows`` (a slice of dim 0; None: all) of this rank's tensor for the parameter, i.e. of its tensor-parallel
shard of the dense HF tensor — into every parameter. Under ZeRO-3 a parameter is never gathered: each rank
asks for the rows that cover its partition (the range [rank·n, (rank+1)·n) of the flattened parameter,
``p.ds_tensor``) and writes that range straight into ``p.ds_tensor``, so every slice of a checkpoint is
read by exactly one rank of the data-parallel group and no rank ever holds a whole parameter of the file.
The HF name of each parameter comes from witscale/model/hf_names.py. Because the random init is keyed by
the HF *name* and drawn at the dense shape before sharding, every layout (tp=1 or 2, ZeRO-0 or 3, pp=1 or
2) starts from bit-identical weights — what the equivalence tests rely on (under ZeRO-3 each rank draws the
dense tensor of one parameter at a time and keeps its range). Loading reads, per rank, only the slices it
keeps (safetensors ``get_slice``), strictly: missing, unexpected and mis-shaped tensors are errors naming
the file and tensor.
"""
from __future__ import annotations

import dataclasses
import zlib
import math
from typing import Callable, Optional

import torch

from witscale.model.config import ModelConfig
from witscale.model.family import family_spec
from witscale.model.hf_io import (CheckpointFormatError, SafetensorsSource, SliceFn, tp_slice_fn,
                                  whole_tensor)
from witscale.model.hf_names import checkpoint_to_hf_name, hf_name_fn
from witscale.model.transformer import dense_shapes
from witscale.parallel.layers import shard_dense

ValueFn = Callable[[str, torch.nn.Parameter, Optional[slice]], torch.Tensor]


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
    """Copy ``value_fn(name, param, rows)`` into every parameter of ``model`` (tied parameters once).

    A plain parameter gets all its rows (``rows=None``). A ZeRO-3-partitioned one gets only the rows that
    cover this rank's partition, and the partition's range of them is written into ``p.ds_tensor``
    (DeepSpeed's padding after the last element is zeroed): nothing is gathered or broadcast."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_zero3_param(p):
                _fill_partition(name, p, value_fn)
            else:
                _copy_checked(name, p, value_fn(name, p, None))


def partition_range(p: torch.Tensor) -> tuple[int, int]:
    """[start, end) of this rank's ZeRO-3 partition in the flattened parameter (end clipped to its size:
    the last partitions hold padding, or nothing but padding)."""
    import torch.distributed as dist

    size = p.ds_tensor.numel()
    start = min(dist.get_rank(p.ds_process_group) * size, p.ds_numel)
    return start, min(start + size, p.ds_numel)


def _fill_partition(name: str, p: torch.Tensor, value_fn: ValueFn) -> None:
    start, end = partition_range(p)
    shape = tuple(p.ds_shape)
    row = math.prod(shape[1:])                      # elements per dim-0 row (1 for a vector)
    part = p.ds_tensor
    if end > start:
        first, last = start // row, -(-end // row)
        value = value_fn(name, p, slice(first, last))
        expected = (last - first,) + shape[1:]
        if tuple(value.shape) != expected:
            raise ValueError(f"parameter {name}: rows {first}:{last} of {shape} should have shape {expected}, "
                             f"the source gives {tuple(value.shape)}")
        offset = start - first * row
        part.narrow(0, 0, end - start).copy_(value.reshape(-1).narrow(0, offset, end - start))
    part.narrow(0, end - start, part.numel() - (end - start)).zero_()


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

    def value(name, p, rows):
        hf = to_hf(name)
        shard = shard_dense(p, seeded_dense(hf, shapes[hf], seed, cfg.initializer_range, norm_init), tp_rank, tp)
        return shard if rows is None else shard[rows]
    materialize_parameters(module, value)


def _tied_names(module: torch.nn.Module) -> set[str]:
    """Parameter names that alias an earlier parameter (tied embeddings): not read from the file."""
    seen, tied = {}, set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied


def load_hf_weights(module: torch.nn.Module, path: str, slice_fn: Optional[SliceFn] = None, *,
                    tp_rank: int = 0, tp: int = 1, file_vocab: Optional[int] = None) -> None:
    """Fill every parameter of ``module`` (a whole model or one pipeline stage) from the HF safetensors
    checkpoint in ``path`` (one file or shards with an index), strictly: a tensor this module needs but the
    files lack, a tensor that is no parameter of the model, or a wrong shape is a CheckpointFormatError
    naming the file and tensor. ``slice_fn(name, slice)`` returns this rank's tensor from the lazy slice
    (default: all of it). A tied LM head takes the embedding; a stored copy is ignored. A ZeRO-3 parameter
    reads only the rows of its (``tp_rank``-of-``tp``) shard that cover this rank's partition.
    ``file_vocab``: the files hold this many vocabulary rows, fewer than the model's (a grown vocabulary,
    witscale/model/grow.py): the rows past them load as zeros, like vocabulary padding."""
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

    shapes = dense_shapes(dataclasses.replace(cfg, vocab_size=file_vocab) if file_vocab else cfg)

    def value(name: str, p: torch.Tensor, rows: Optional[slice]) -> torch.Tensor:
        hf = to_hf(name)
        if file_vocab and source.shape(hf) != tuple(shapes[hf]):
            raise CheckpointFormatError(f"{source.file_of(hf)}: tensor {hf} has shape {source.shape(hf)}, "
                                        f"the model's {file_vocab}-token vocabulary expects {tuple(shapes[hf])}")
        if rows is not None:        # a ZeRO-3 partition: p.shape is empty, the file's shape is checked here
            if source.shape(hf) != tuple(shapes[hf]):
                raise CheckpointFormatError(f"{source.file_of(hf)}: tensor {hf} has shape {source.shape(hf)}, "
                                            f"the model expects {tuple(shapes[hf])}")
            try:
                return shard_rows_of_slice(source.slice(hf), getattr(p, "tp_split_dim", None), tp_rank, tp,
                                           getattr(p, "padded_dense_rows", None), rows)
            except ValueError as e:
                raise CheckpointFormatError(f"{source.file_of(hf)}: {hf}: {e}") from None
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
                       topo=None, grow_from: Optional[int] = None) -> None:
    """Fill a (TP-sharded, ZeRO-3-partitioned, or pipeline-stage) module from HF safetensors or a seeded init.
    ``grow_from``: ``model_dir``'s vocabulary size, smaller than ``config``'s (the data's, after
    --add-special-tokens): the new rows are set to the mean of the loaded ones (witscale/model/grow.py)."""
    tp, tp_rank = (topo.tp, topo.tp_rank) if topo is not None else (1, 0)
    if model_dir is None:
        init_weights(module, seed, tp_rank, tp)
    else:
        load_hf_weights(module, model_dir, tp_slice_fn(module, tp_rank, tp), tp_rank=tp_rank, tp=tp,
                        file_vocab=grow_from)
        if grow_from:
            from witscale.model.grow import mean_init_new_rows
            mean_init_new_rows(module, grow_from)


def shard_rows_of_slice(sl, dim: Optional[int], rank: int, tp: int, padded_rows: Optional[int],
                        rows: slice) -> torch.Tensor:
    """Rows ``rows`` of rank ``rank``'s tensor-parallel piece of a lazy safetensors slice — the piece
    ``hf_io.shard_of_slice`` returns (cut along ``dim``; vocabulary rows past the file's are zeros) —
    reading only those rows."""
    shape = tuple(sl.get_shape())
    first, last = rows.start, rows.stop
    if dim == 1:
        if shape[1] % tp:
            raise ValueError(f"dimension 1 ({shape[1]}) is not divisible by tp {tp}")
        per = shape[1] // tp
        return sl[first:last, rank * per:(rank + 1) * per]
    offset, total = 0, shape[0]
    if dim == 0:
        total = padded_rows if padded_rows else shape[0]
        if total % tp:
            raise ValueError(f"dimension 0 ({total}) is not divisible by tp {tp}")
        offset = rank * (total // tp)
    start, stop = offset + first, min(offset + last, shape[0])
    if stop - start == last - first:
        return sl[start:stop]
    # The rows reach into vocabulary padding: zeros after the file's last row.
    part = sl[start:stop] if stop > start else None
    out = torch.zeros((last - first,) + shape[1:], dtype=part.dtype if part is not None else torch.float32)
    if part is not None:
        out[:stop - start] = part
    return out
