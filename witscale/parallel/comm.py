"""Tensor-parallel communication as tiny autograd functions (Megatron's four), so every collective in
the model is visible where it happens and testable on its own. ``group=None`` means tp = 1: identity.

    copy_to_tp              forward: identity            backward: all-reduce (sum) the gradient
    reduce_from_tp          forward: all-reduce (sum)    backward: identity
    scatter_to_tp_last_dim  forward: keep own chunk      backward: all-gather the gradient
    gather_from_tp_last_dim forward: all-gather          backward: keep own chunk of the gradient
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _own_chunk(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[-1] % n:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the tensor-parallel size {n}")
    return x.chunk(n, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_chunk(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_last(g, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _own_chunk(g, ctx.group), None


def copy_to_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """Forward: identity (x is replicated on the TP ranks). Backward: all-reduce (sum) of the gradient, since
    every rank used x for its own shard. Put in front of a column-parallel layer."""
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """Forward: all-reduce (sum) of the per-rank partial results. Backward: identity (the sum's gradient
    reaches every rank's partial unchanged). After a row-parallel layer or a vocab-parallel embedding."""
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_last_dim(x: torch.Tensor, group=None) -> torch.Tensor:
    """Forward: this rank's contiguous chunk of the last dimension (which must divide by tp). Backward:
    all-gather of the ranks' gradient chunks along the last dimension."""
    return x if _size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp_last_dim(x: torch.Tensor, group=None) -> torch.Tensor:
    """Forward: all-gather of the ranks' chunks, concatenated along the last dimension. Backward: this rank's
    chunk of the gradient."""
    return x if _size(group) == 1 else _GatherFromTP.apply(x, group)
