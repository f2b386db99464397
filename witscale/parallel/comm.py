"""Tensor-parallel communication as tiny autograd functions (Megatron's four), so every collective in
the model is visible where it happens and testable on its own. ``group=None`` means tp = 1: identity.

    copy_to_tp              forward: identity            backward: all-reduce (sum) the gradient
    reduce_from_tp          forward: all-reduce (sum)    backward: identity
    scatter_to_tp_last_dim  forward: keep own chunk      backward: all-gather the gradient
    gather_from_tp_last_dim forward: all-gather          backward: keep own chunk of the gradient

and, for sequence-sharded TP regions (``--tp-sequence-parallel``: each TP rank holds a contiguous 1/tp of the
sequence, dimension 1 of [B, S, H]; docs/parallel-layout.md#tp-sequence-parallelism), Megatron's sequence pair:

    gather_sequence_from_tp         forward: all-gather (sequence)   backward: reduce-scatter (sequence)
    reduce_scatter_sequence_to_tp   forward: reduce-scatter          backward: all-gather
    gather_sequence_replicated_grad forward: all-gather              backward: keep own chunk of the gradient

The first goes before column-parallel linears (each rank's input gradient is a partial sum), the second
replaces the all-reduce after row-parallel linears and the vocab-parallel embedding, the third goes before a
consumer that returns the same, complete gradient on every TP rank (the fused loss all-reduces dL/dh itself).
gloo in torch 2.13 has ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` (checked on this CPU), so the
CPU tests run the same collectives as NCCL.
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


def _conjugate(name: str, forward_op, backward_op) -> type:
    """An autograd Function whose forward is one collective over ``group`` and whose backward is its conjugate
    (gather ↔ scatter, reduce-scatter ↔ all-gather) on the gradient."""
    def forward(ctx, x, group):
        ctx.group = group
        return forward_op(x, group)

    def backward(ctx, g):
        return backward_op(g, ctx.group), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_ScatterToTP = _conjugate("_ScatterToTP", _own_chunk, _gather_last)


_GatherFromTP = _conjugate("_GatherFromTP", _gather_last, _own_chunk)


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


# --- sequence-sharded TP regions ---------------------------------------------------------------------------
def _check_sequence(x: torch.Tensor, n: int) -> int:
    if x.dim() != 3 or x.shape[1] % n:
        raise ValueError(f"--tp-sequence-parallel: {x.shape[1] if x.dim() == 3 else tuple(x.shape)} tokens per row "
                         f"cannot be cut into --tp {n} equal parts (rows [batch, seq, hidden] with seq divisible "
                         "by tp)")
    return x.shape[1] // n


def _gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[B, s, H] per rank → [B, n·s, H], the ranks' parts in rank order along the sequence."""
    n = _size(group)
    if n == 1:
        return x
    b, s, h = x.shape
    # Flat [tokens, H] buffers: gloo checks the first dimensions (output = n × input), NCCL only the sizes.
    out = torch.empty((n * b * s, h), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.reshape(b * s, h).contiguous(), group=group)
    # [n, B, s, H] → [B, n·s, H]: a view at B = 1 (the usual packed micro-batch), one copy otherwise.
    return out.view(n, b, s, h).transpose(0, 1).reshape(b, n * s, h)


def _reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[B, S, H] partial sums per rank → this rank's [B, S/n, H] part of their sum."""
    n = _size(group)
    if n == 1:
        return x
    b, _, h = x.shape
    s = _check_sequence(x, n)
    parts = x.reshape(b, n, s, h).transpose(0, 1).reshape(n * b * s, h)       # no copy at B = 1
    out = torch.empty((b * s, h), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, parts.contiguous(), group=group)
    return out.view(b, s, h)


def _own_sequence_chunk(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    s = _check_sequence(x, n)
    r = dist.get_rank(group)
    return x[:, r * s:(r + 1) * s].contiguous()


_GatherSequence = _conjugate("_GatherSequence", _gather_sequence, _reduce_scatter_sequence)


_ReduceScatterSequence = _conjugate("_ReduceScatterSequence", _reduce_scatter_sequence, _gather_sequence)


_GatherSequenceReplicatedGrad = _conjugate("_GatherSequenceReplicatedGrad", _gather_sequence, _own_sequence_chunk)


def gather_sequence_from_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """[B, S/tp, H] → [B, S, H] (all-gather along the sequence). Backward: reduce-scatter of the gradient —
    every rank's column-parallel shard contributed a partial dL/dx for every token. Replaces ``copy_to_tp``
    in front of q/k/v and gate/up under --tp-sequence-parallel."""
    return x if _size(group) == 1 else _GatherSequence.apply(x, group)


def reduce_scatter_sequence_to_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """[B, S, H] partial sums → this rank's [B, S/tp, H] of their sum. Backward: all-gather. Replaces
    ``reduce_from_tp`` after o/down and the vocab-parallel embedding under --tp-sequence-parallel."""
    return x if _size(group) == 1 else _ReduceScatterSequence.apply(x, group)


def gather_sequence_replicated_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """[B, S/tp, H] → [B, S, H] (all-gather) for a consumer whose gradient is already complete and the same on
    every TP rank (the fused vocab-parallel loss all-reduces dL/dh itself): backward keeps this rank's chunk."""
    return x if _size(group) == 1 else _GatherSequenceReplicatedGrad.apply(x, group)
