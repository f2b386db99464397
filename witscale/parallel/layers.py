"""Megatron-style tensor-parallel layers. With ``tp_group=None`` (tp = 1) they are plain layers.

Each weight is this rank's shard of the dense HF tensor, with the same layout as the corresponding slice:
- ``ColumnParallelLinear``: output rows [r·out/tp, (r+1)·out/tp)  (q/k/v, gate/up)
- ``RowParallelLinear``: input columns [r·in/tp, (r+1)·in/tp)      (o, down)
- ``VocabParallelEmbedding`` / ``VocabParallelLMHead``: vocabulary rows, the vocabulary padded to a
  multiple of tp; padded rows are zero in the embedding and masked out of the softmax in the loss.
Every sharded parameter carries ``tp_split_dim`` (the dense dimension it is cut along) and
``tensor_model_parallel = True`` (DeepSpeed's grad-norm then counts it once per TP rank, and replicated
parameters once per model replica); ``shard_dense`` cuts a rank's piece out of a dense tensor with it, and
each layer's ``shard_slice(rank, tp)`` names the slice of the dense HF weight that rank holds (for loading
and export: ``dense[layer.shard_slice(r, tp)]`` is rank r's ``weight``, up to vocabulary padding rows).

The TP gradient rule for replicated parameters — it lives here, in ``sum_grad_over_tp``, and nowhere else.
A parameter replicated on every TP rank (``tp_split_dim`` None) gets, on each rank, the gradient of what
that rank computed with it. Two kinds:
- it sees REPLICATED activations (the input and post-attention norms, the final norm, Gemma's extra norms,
  row-parallel biases added after the all-reduce): every rank computes the same thing and gets the same,
  complete gradient. Nothing to do.
- it sees this rank's SHARD of the work (Qwen3/Gemma-3's per-head ``q_norm``/``k_norm``, applied to the
  rank's own heads; the k/v projections of ``ReplicatedKVHeadLinear`` when there are fewer KV heads than TP
  ranks, each rank using one head): each rank's gradient is partial and the true one is their SUM over the
  TP group. Such a module reads its weight as ``sum_grad_over_tp(self.weight, tp_group)`` in ``forward``:
  identity forward, all-reduce (sum) of the gradient in backward (comm's ``copy_to_tp``). It is part of the
  autograd graph, so it holds unchanged under ZeRO-0..3 (the summed gradient reaches the parameter's
  gradient hooks), pipeline stages and activation checkpointing, with no hook of ours; every TP rank then
  holds the same gradient, the optimizer keeps the replicas identical, and DeepSpeed's norm counts the
  parameter once per model replica like any replicated one. (Its output is a view of the parameter: under
  ZeRO-3 a view saved for backward keeps the gathered storage alive until then — nothing for a [head_dim]
  norm weight; ``ReplicatedKVHeadLinear`` saves a copy of its head's rows instead.)
Under ``--tp-sequence-parallel`` (``sequence_parallel=True``: each TP rank holds 1/tp of the sequence between the
linears) the norms of the residual stream and the row-parallel biases see the rank's SHARD of the tokens too, so
they move to the second kind: read through ``sum_grad_over_tp`` (transformer.py passes the TP group to them).

Sequence-sharded TP regions (``sequence_parallel=True``, Megatron's sequence parallelism): a column-parallel
layer all-gathers its [B, S/tp, H] input along the sequence (backward: reduce-scatter) instead of ``copy_to_tp``;
a row-parallel layer and the vocab-parallel embedding reduce-scatter their partial sums along the sequence
(backward: all-gather) instead of all-reducing them. The weights, their shards and names are the same either
way: checkpoints do not depend on it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from witscale.parallel.cross_entropy import LossStats, fused_weighted_cross_entropy, soft_cap
from witscale.parallel.comm import (copy_to_tp, gather_from_tp_last_dim, gather_sequence_from_tp, reduce_from_tp,
                                    reduce_scatter_sequence_to_tp, scatter_to_tp_last_dim)


def tp_size_rank(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {tp}")
    return n // tp


def pad_vocab_size(vocab: int, tp: int, multiple: int = 1) -> int:
    """The smallest multiple of ``tp × multiple`` that holds ``vocab`` rows (each rank owns an equal range)."""
    if vocab < 1 or tp < 1 or multiple < 1:
        raise ValueError(f"pad_vocab_size needs positive numbers, got vocab={vocab}, tp={tp}, multiple={multiple}")
    step = tp * multiple
    return ((vocab + step - 1) // step) * step


_SKIP_INIT = [False]


class skip_init:
    """Context: layers built inside leave their weights uninitialized (``torch.empty``), for a model whose
    every parameter is filled right after by the load path (witscale/model/weights.py). Building a 70B
    model's random init only to overwrite it costs minutes and, on the host, memory."""

    def __enter__(self):
        self._was = _SKIP_INIT[0]
        _SKIP_INIT[0] = True

    def __exit__(self, *exc):
        _SKIP_INIT[0] = self._was


def _init_normal(weight: nn.Parameter) -> None:
    if not _SKIP_INIT[0]:
        nn.init.normal_(weight, std=0.02)


def _mark(p: nn.Parameter, dim: Optional[int], tp: int) -> nn.Parameter:
    p.tp_split_dim = dim
    if dim is not None and tp > 1:
        p.tensor_model_parallel = True
    return p


def _resolve(group, rank: Optional[int], tp: Optional[int]) -> tuple[int, int]:
    g_tp, g_rank = tp_size_rank(group)
    return (g_rank if rank is None else rank), (g_tp if tp is None else tp)


def _block(n: int, rank: int, tp: int, what: str) -> slice:
    per = divide(n, tp, what)
    return slice(rank * per, (rank + 1) * per)


def shard_dense(p: torch.Tensor, dense: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's piece of ``dense`` for parameter ``p`` (padding vocabulary rows with zeros)."""
    dim = getattr(p, "tp_split_dim", None)
    if dim is None or tp == 1:
        return dense
    rows = getattr(p, "padded_dense_rows", None)
    if rows is not None and dense.shape[0] < rows:      # vocabulary padding
        pad = torch.zeros((rows - dense.shape[0],) + tuple(dense.shape[1:]), dtype=dense.dtype)
        dense = torch.cat([dense, pad], dim=0)
    return dense.chunk(tp, dim=dim)[tp_rank]


def gather_dense(p: torch.Tensor, local: torch.Tensor, group, dense_rows: Optional[int] = None) -> torch.Tensor:
    """Inverse of ``shard_dense`` (collective over the TP group): the dense tensor from every rank's piece.
    ``dense_rows`` trims vocabulary padding."""
    dim = getattr(p, "tp_split_dim", None)
    tp, _ = tp_size_rank(group)
    if dim is None or tp == 1:
        full = local
    else:
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        full = torch.cat(parts, dim=dim)
    if dense_rows is not None and dim == 0:
        full = full[:dense_rows]
    return full


def sum_grad_over_tp(weight: torch.Tensor, tp_group) -> torch.Tensor:
    """``weight`` for a forward that uses it on this rank's shard of the work (per-head norms, replicated KV
    heads): identity forward, the gradient summed over the TP group in backward (the rule in the module
    docstring). Call it on the parameter inside the owning module's ``forward`` (under ZeRO-3 the parameter is
    gathered there). A no-op at tp = 1."""
    return copy_to_tp(weight, tp_group)


def kv_heads_replicated(num_kv_heads: int, tp: int) -> bool:
    """True when a layout has fewer key/value heads than TP ranks, so each KV head is replicated on
    ``tp / num_kv_heads`` ranks (``ReplicatedKVHeadLinear``) instead of split. ``tp`` must then be a
    multiple of ``num_kv_heads`` (``ParallelDims`` says so up front)."""
    if num_kv_heads < tp and tp % num_kv_heads:
        raise ValueError(f"the tensor-parallel size {tp} is not a multiple of the {num_kv_heads} key/value heads")
    return num_kv_heads < tp


class ReplicatedKVHeadLinear(nn.Module):
    """The k or v projection when there are fewer key/value heads than TP ranks (tp a multiple of them).

    The weight [kv_heads·head_dim, in] (and bias) is the whole HF tensor on every TP rank (``tp_split_dim``
    None): loading, the seeded init, export, the universal checkpoint and ZeRO treat it as any replicated
    parameter. Each rank computes only the head its query heads use — query heads [r·H/tp, (r+1)·H/tp) all
    belong to KV head ``r·kv_heads/tp`` (HF's GQA grouping: query head j uses KV head j // (H/kv_heads)) —
    so ``tp / kv_heads`` ranks share a head, each giving a partial gradient to that head's rows (zero to the
    others); the weight is read through ``sum_grad_over_tp``, whose sum over the TP group is the full
    gradient of every head, on every rank. The input passes through ``copy_to_tp`` as in a column-parallel
    layer (its gradient is partial per rank too).

    Why the whole [kv·hd, in] rather than only the head used: a tensor both split and duplicated would need
    its own rules in loading, export, the universal checkpoint, DeepSpeed's gradient norm (which would count
    each duplicate) and sub-group all-reduces; replicated, all of those hold as they are. The cost is
    (kv_heads − 1)·head_dim·in more weights per projection per rank, and a weight-sized all-reduce in
    backward: Gemma-2-2B at tp 8 holds 13.9 M parameters per layer per rank instead of 10.3 M (+35 %).
    Models with 8+ KV heads at tp ≤ 8 (Llama-3 8B/70B, Qwen3 ≥ 0.6B) never replicate."""

    def __init__(self, in_features: int, num_kv_heads: int, head_dim: int, bias: bool = False, tp_group=None):
        super().__init__()
        self.tp_group = tp_group
        tp, rank = tp_size_rank(tp_group)
        kv_heads_replicated(num_kv_heads, tp)          # checks tp % num_kv_heads
        self.in_features, self.out_features = in_features, num_kv_heads * head_dim
        self.head_dim = head_dim
        self.head = rank * num_kv_heads // tp if tp > num_kv_heads else 0
        self.local_heads = 1 if tp > num_kv_heads else num_kv_heads
        self.weight = _mark(nn.Parameter(torch.empty(self.out_features, in_features)), None, tp)
        self.bias = _mark(nn.Parameter(torch.zeros(self.out_features)), None, tp) if bias else None
        _init_normal(self.weight)

    def shard_slice(self, rank: Optional[int] = None, tp: Optional[int] = None) -> tuple[slice, slice]:
        """Every rank holds the whole dense weight."""
        return slice(None), slice(None)

    def forward(self, x: torch.Tensor, *, input_copied: bool = False) -> torch.Tensor:
        """``input_copied``: the caller already passed ``x`` through ``copy_to_tp`` (ColumnParallelLinear)."""
        start, n = self.head * self.head_dim, self.local_heads * self.head_dim
        # clone(): autograd then saves only this head's rows for backward, not a view of the whole weight,
        # whose storage ZeRO-3 could then not free between forward and backward (a view keeps it alive).
        weight = sum_grad_over_tp(self.weight, self.tp_group).narrow(0, start, n).clone()
        bias = None if self.bias is None else sum_grad_over_tp(self.bias, self.tp_group).narrow(0, start, n)
        return F.linear(x if input_copied else copy_to_tp(x, self.tp_group), weight, bias)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's output rows split over the TP ranks. Input replicated (``copy_to_tp``: its
    gradient is all-reduced); output this rank's slice of the features, or all of them with
    ``gather_output=True`` (all-gather)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_group=None,
                 gather_output: bool = False, sequence_parallel: bool = False):
        super().__init__()
        self.tp_group = tp_group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel      # input [B, S/tp, H]: all-gathered along the sequence
        tp, _ = tp_size_rank(tp_group)
        self.in_features, self.out_features = in_features, out_features
        local = divide(out_features, tp, "output size")
        self.weight = _mark(nn.Parameter(torch.empty(local, in_features)), 0, tp)
        self.bias = _mark(nn.Parameter(torch.zeros(local)), 0, tp) if bias else None
        _init_normal(self.weight)

    def shard_slice(self, rank: Optional[int] = None, tp: Optional[int] = None) -> tuple[slice, slice]:
        """Rank ``rank``'s slice of the dense [out, in] weight (the bias takes the first element)."""
        rank, tp = _resolve(self.tp_group, rank, tp)
        return _block(self.out_features, rank, tp, "output size"), slice(None)

    def forward(self, x: torch.Tensor, *, input_copied: bool = False) -> torch.Tensor:
        """``input_copied``: the caller already passed ``x`` through ``copy_to_tp`` (or, sequence-parallel,
        ``gather_sequence_from_tp``) — layers that share one input (q/k/v, gate/up) copy it once, so backward sums
        their input gradients locally and all-reduces once per block instead of once per projection."""
        if not input_copied:
            x = gather_sequence_from_tp(x, self.tp_group) if self.sequence_parallel else copy_to_tp(x, self.tp_group)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp_last_dim(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's input columns split over the TP ranks: each rank multiplies its slice of the
    features, the partial products are all-reduced (``reduce_from_tp``), the bias is added once after.
    With ``input_is_parallel=False`` the full input is taken and this rank's slice cut out first.
    ``sequence_parallel``: the partial products are reduce-scattered along the sequence instead (output
    [B, S/tp, H]); the bias, added to the rank's tokens only, then has its gradient summed over tp."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_group=None,
                 input_is_parallel: bool = True, sequence_parallel: bool = False):
        super().__init__()
        self.tp_group = tp_group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        tp, _ = tp_size_rank(tp_group)
        self.in_features, self.out_features = in_features, out_features
        local = divide(in_features, tp, "input size")
        self.weight = _mark(nn.Parameter(torch.empty(out_features, local)), 1, tp)
        self.bias = _mark(nn.Parameter(torch.zeros(out_features)), None, tp) if bias else None
        _init_normal(self.weight)

    def shard_slice(self, rank: Optional[int] = None, tp: Optional[int] = None) -> tuple[slice, slice]:
        """Rank ``rank``'s slice of the dense [out, in] weight (the bias is replicated, not sliced)."""
        rank, tp = _resolve(self.tp_group, rank, tp)
        return slice(None), _block(self.in_features, rank, tp, "input size")

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x_local = scatter_to_tp_last_dim(x_local, self.tp_group)
        y = F.linear(x_local, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_sequence_to_tp(y, self.tp_group)
            return y + sum_grad_over_tp(self.bias, self.tp_group) if self.bias is not None else y
        y = reduce_from_tp(y, self.tp_group)
        return y + self.bias if self.bias is not None else y   # bias added once, after the reduce


class _VocabShard(nn.Module):
    """A [vocab/tp, dim] shard of a vocabulary matrix: the vocabulary padded to a multiple of tp, each rank
    owning one contiguous range of (padded) ids."""

    def __init__(self, vocab_size: int, dim: int, tp_group=None):
        super().__init__()
        self.tp_group = tp_group
        tp, rank = tp_size_rank(tp_group)
        self.vocab_size = vocab_size
        self.padded_vocab_size = pad_vocab_size(vocab_size, tp)
        local = self.padded_vocab_size // tp
        self.vocab_start = rank * local
        self.weight = _mark(nn.Parameter(torch.empty(local, dim)), 0, tp)
        self.weight.padded_dense_rows = self.padded_vocab_size
        _init_normal(self.weight)

    def vocab_range(self, rank: Optional[int] = None, tp: Optional[int] = None) -> tuple[int, int]:
        """[start, end) of the global (padded) vocabulary ids rank ``rank`` owns."""
        rank, tp = _resolve(self.tp_group, rank, tp)
        per = pad_vocab_size(self.vocab_size, tp) // tp
        return rank * per, (rank + 1) * per

    def shard_slice(self, rank: Optional[int] = None, tp: Optional[int] = None) -> tuple[slice, slice]:
        """Rows of the dense [vocab, dim] HF weight rank ``rank`` holds; its shard has zero padding rows
        after them up to ``padded_vocab_size // tp`` (the last ranks may hold fewer real rows, or none)."""
        start, end = self.vocab_range(rank, tp)
        return slice(min(start, self.vocab_size), min(end, self.vocab_size)), slice(None)


class VocabParallelEmbedding(_VocabShard):
    """Embedding with the vocabulary rows split over the TP ranks (vocabulary padded to a multiple of tp):
    each rank looks up the ids in its range, zeroes the others, and the partial embeddings are summed
    (``reduce_from_tp``). Padding rows are zero and never looked up. ``sequence_parallel``: the partial
    embeddings are reduce-scattered along the sequence instead (output [B, S/tp, H]: the rank's part of it)."""

    def __init__(self, vocab_size: int, dim: int, tp_group=None, sequence_parallel: bool = False):
        super().__init__(vocab_size, dim, tp_group)
        self.sequence_parallel = sequence_parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence_to_tp(out, self.tp_group)
        return reduce_from_tp(out, self.tp_group)


class VocabParallelLMHead(_VocabShard):
    """The output projection, fused with the weighted loss; ``forward`` runs inside the module so that
    ZeRO-3 gathers ``weight`` for it (a parameter read outside its module's forward is not gathered)."""

    def __init__(self, vocab_size: int, dim: int, tp_group=None, chunk_size: int = 4096,
                 logit_softcap: Optional[float] = None):
        super().__init__(vocab_size, dim, tp_group)
        self.chunk_size = chunk_size
        self.logit_softcap = logit_softcap      # Gemma-2's final_logit_softcapping: both paths apply it

    def forward(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None,
                weights: Optional[torch.Tensor] = None, target_classes: Optional[torch.Tensor] = None,
                objective=None):
        """Logits [..., vocab] (gathered, unpadded) without labels; the weighted-loss stats with them.
        ``objective`` (an objective's hook, witscale/training/objectives: e.g. a pair objective's ``PairHead``): a callable given ``self.fused_loss`` and
        the flattened inputs, run here so that ZeRO-3 gathers ``weight`` once for all its passes."""
        if labels is None:
            local = soft_cap(F.linear(copy_to_tp(hidden, self.tp_group), self.weight), self.logit_softcap)
            logits = gather_from_tp_last_dim(local, self.tp_group)
            return logits[..., :self.vocab_size]
        h = hidden.reshape(-1, hidden.shape[-1])
        classes = None if target_classes is None else target_classes.reshape(-1)
        if objective is not None:
            return objective(self.fused_loss, h, labels.reshape(-1), weights.reshape(-1), classes)
        return self.fused_loss(h, labels.reshape(-1), weights.reshape(-1), classes)

    def fused_loss(self, h: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                   target_classes: Optional[torch.Tensor] = None) -> LossStats:
        """The fused weighted loss of flattened hidden states [T, H] under this head; call only inside
        ``forward`` (under ZeRO-3 ``weight`` is gathered only there)."""
        return fused_weighted_cross_entropy(
            h, self.weight, labels, weights, target_classes,
            tp_group=self.tp_group, vocab_start=self.vocab_start, true_vocab_size=self.vocab_size,
            chunk_size=self.chunk_size, logit_softcap=self.logit_softcap)


LMHead = VocabParallelLMHead

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "ReplicatedKVHeadLinear", "VocabParallelEmbedding",
           "VocabParallelLMHead", "LMHead", "LossStats", "divide", "gather_dense", "kv_heads_replicated",
           "pad_vocab_size", "shard_dense", "sum_grad_over_tp", "tp_size_rank"]
