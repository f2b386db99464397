"""Give every parameter its value from a *named* source: a seeded random init or an HF checkpoint.

One mechanism for every layout: ``value_fn(name, param)`` returns this rank's tensor for the parameter
(its tensor-parallel shard of the dense HF tensor); under ZeRO-3 it is written through
``GatheredParameters`` so that each rank keeps only its partition. Because the random init is keyed by
parameter *name* and drawn at the dense shape before sharding, tp=1, tp=2, ZeRO-0 and ZeRO-3 start from
bit-identical weights — what the equivalence tests rely on.
"""
from __future__ import annotations

import zlib
from typing import Callable

import torch

ValueFn = Callable[[str, torch.nn.Parameter], torch.Tensor]


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def seeded_dense(name: str, shape, seed: int, std: float) -> torch.Tensor:
    """The dense init of one parameter: N(0, std) matrices, unit norms, zero biases; seeded by name."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    return torch.randn(tuple(shape), generator=gen) * std


def materialize_parameters(model: torch.nn.Module, value_fn: ValueFn) -> None:
    """Copy ``value_fn(name, param)`` into every parameter of ``model`` (tied parameters once)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_zero3_param(p):
                import deepspeed    # only here: importing it costs seconds, and plain models never need it

                # modifier_rank=0: rank 0's value is broadcast and re-partitioned on exit; every rank
                # computes the same value anyway, so the copy is right on all of them.
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    _copy_checked(name, p, value_fn(name, p))
            else:
                _copy_checked(name, p, value_fn(name, p))


def _copy_checked(name: str, p: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(p.shape) != tuple(value.shape):
        raise ValueError(f"parameter {name}: expected shape {tuple(p.shape)}, the source has {tuple(value.shape)}")
    p.data.copy_(value.to(dtype=p.dtype))
