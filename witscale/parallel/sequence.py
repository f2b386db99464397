"""Ulysses sequence parallelism (``--sp``): each rank of a sequence-parallel group holds a contiguous 1/sp of
every packed row; attention alone needs the whole row, and gets it by an all-to-all over heads.

    [B, S/sp, H, D] per rank  --all-to-all-->  [B, S, H/sp, D]  --packed attention over the whole row's
    cu_seqlens-->  [B, S, H/sp, D]  --all-to-all-->  [B, S/sp, H, D]

Everything else in the decoder (embeddings, norms, MLP, LM head and loss) works on the rank's tokens alone.
So a document crossing a shard cut attends exactly as unsharded, and RoPE gets the per-document positions
computed on the whole row (the loader's) and sliced.

The all-to-all is DeepSpeed's (``deepspeed.sequence.layer.DistributedAttention``, batch-first: scatter the
heads, gather the sequence). It fits the packed path as it is: the gathered sequence is the whole row in
order, the rank order of the group, so the row's ``cu_seqlens`` and ``max_seqlen`` (over B × S) apply
unchanged, and its even split hands each rank a contiguous block of query heads with the block of KV heads
they use (GQA groups stay whole). What it does not do is fewer KV heads than sp ranks (it asserts): those are
replicated to sp here first (``repeat_interleave``: rank j then receives KV head j·kv/sp, the one its query
heads use; the backward sums the copies' gradients), as TP replicates KV heads.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def sp_size_rank(group) -> tuple[int, int]:
    return (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))


def sequence_shard(t: torch.Tensor, sp: int, sp_rank: int) -> torch.Tensor:
    """This rank's contiguous 1/sp of dimension 1 (the row) of a [B, S, …] tensor."""
    if sp == 1:
        return t
    s = t.shape[1]
    if s % sp:
        raise ValueError(f"row length {s} is not divisible by --sp {sp}")
    n = s // sp
    return t[:, sp_rank * n:(sp_rank + 1) * n]


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, attend) -> torch.Tensor:
    """q [B, S/sp, Hq, D], k/v [B, S/sp, Hkv, D] (this rank's part of the rows) → [B, S/sp, Hq, D], with
    ``attend(q, k, v)`` run on [B, S, heads/sp, D]: the whole rows, this rank's share of the heads."""
    from deepspeed.sequence.layer import DistributedAttention

    sp, _ = sp_size_rank(group)
    if sp == 1:
        return attend(q, k, v)
    hkv = k.shape[2]
    if hkv % sp:                      # fewer KV heads than sp ranks (ParallelDims checked sp % hkv == 0)
        k, v = k.repeat_interleave(sp // hkv, dim=2), v.repeat_interleave(sp // hkv, dim=2)
    # No parameters, nothing to register: built per call (cheap) so the layer's state dict is unchanged.
    return DistributedAttention(attend, group, scatter_idx=2, gather_idx=1)(q, k, v, 0)
