"""Give every parameter its value from a *dense, named* source: a seeded random init or an HF checkpoint.

One mechanism for every layout: for each parameter name the source yields the full dense tensor (as HF
stores it); ``slice_fn`` cuts this rank's tensor-parallel piece out of it; under ZeRO-3 the value is
written through ``GatheredParameters`` so that each rank keeps only its partition. Because the random
init is keyed by parameter *name* (not by creation order), tp=1, tp=2, ZeRO-0 and ZeRO-3 start from
bit-identical weights — what the equivalence tests rely on.
"""
from __future__ import annotations

import zlib
from typing import Callable, Optional

import torch

DenseFn = Callable[[str], torch.Tensor]
SliceFn = Callable[[str, torch.nn.Parameter, torch.Tensor], torch.Tensor]


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def seeded_init(config, seed: int) -> DenseFn:
    """Dense tensors for a fresh model: N(0, initializer_range) matrices, unit norms, zero biases."""
    std = float(getattr(config, "initializer_range", 0.02))

    def make(name: str, shape: torch.Size) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
        return torch.randn(shape, generator=gen) * std

    return make


def materialize_parameters(model: torch.nn.Module, dense_fn, *, shapes: Optional[dict] = None,
                           slice_fn: Optional[SliceFn] = None) -> None:
    """Copy ``dense_fn(name[, shape])`` (sliced by ``slice_fn``) into every parameter of ``model``.

    ``shapes`` maps parameter names to their dense (unsharded) shapes; needed for the random init, where
    the dense shape cannot be read off a tensor-parallel shard.
    """
    import deepspeed

    with torch.no_grad():
        for name, p in model.named_parameters():
            full = dense_fn(name, shapes[name]) if shapes is not None else dense_fn(name)
            local = slice_fn(name, p, full) if slice_fn is not None else full
            if is_zero3_param(p):
                # modifier_rank=0: rank 0's value is broadcast and re-partitioned on exit; every rank computes
                # the same dense value anyway, so the copy below is correct on all of them.
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    _copy_checked(name, p, local)
            else:
                _copy_checked(name, p, local)


def _copy_checked(name: str, p: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(p.shape) != tuple(value.shape):
        raise ValueError(f"parameter {name}: expected shape {tuple(p.shape)}, the source has {tuple(value.shape)}")
    p.data.copy_(value.to(dtype=p.dtype))
