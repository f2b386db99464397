"""Megatron-style tensor-parallel layers. With ``tp_group=None`` (tp = 1) they are plain layers.

Each weight is this rank's shard of the dense HF tensor, with the same layout as the corresponding slice:
- ``ColumnParallelLinear``: output rows [r·out/tp, (r+1)·out/tp)  (q/k/v, gate/up)
- ``RowParallelLinear``: input columns [r·in/tp, (r+1)·in/tp)      (o, down)
- ``VocabParallelEmbedding`` / ``VocabParallelLMHead``: vocabulary rows, the vocabulary padded to a
  multiple of tp; padded rows are zero in the embedding and masked out of the softmax in the loss.
Every sharded parameter carries ``tp_split_dim`` (the dense dimension it is cut along) and
``tensor_model_parallel = True`` (DeepSpeed's grad-norm then counts it once per TP rank, and replicated
parameters once per model replica); ``shard_dense`` cuts a rank's piece out of a dense tensor with it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from witscale.loss import LossStats, fused_weighted_cross_entropy
from witscale.parallel.comm import copy_to_tp, gather_from_tp_last_dim, reduce_from_tp


def tp_size_rank(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {tp}")
    return n // tp


def pad_vocab_size(vocab: int, tp: int, multiple: int = 1) -> int:
    step = tp * multiple
    return ((vocab + step - 1) // step) * step


def _mark(p: nn.Parameter, dim: Optional[int], tp: int) -> nn.Parameter:
    p.tp_split_dim = dim
    if dim is not None and tp > 1:
        p.tensor_model_parallel = True
    return p


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


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_group=None):
        super().__init__()
        self.tp_group = tp_group
        tp, _ = tp_size_rank(tp_group)
        self.in_features, self.out_features = in_features, out_features
        local = divide(out_features, tp, "output size")
        self.weight = _mark(nn.Parameter(torch.empty(local, in_features)), 0, tp)
        self.bias = _mark(nn.Parameter(torch.zeros(local)), 0, tp) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.tp_group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_group=None):
        super().__init__()
        self.tp_group = tp_group
        tp, _ = tp_size_rank(tp_group)
        self.in_features, self.out_features = in_features, out_features
        local = divide(in_features, tp, "input size")
        self.weight = _mark(nn.Parameter(torch.empty(out_features, local)), 1, tp)
        self.bias = _mark(nn.Parameter(torch.zeros(out_features)), None, tp) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x_local, self.weight), self.tp_group)
        return y + self.bias if self.bias is not None else y   # bias added once, after the reduce


class VocabParallelEmbedding(nn.Module):
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
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(out, self.tp_group)


class VocabParallelLMHead(nn.Module):
    """The output projection, fused with the weighted loss; ``forward`` runs inside the module so that
    ZeRO-3 gathers ``weight`` for it (a parameter read outside its module's forward is not gathered)."""

    def __init__(self, vocab_size: int, dim: int, tp_group=None, chunk_size: int = 4096):
        super().__init__()
        self.tp_group = tp_group
        tp, rank = tp_size_rank(tp_group)
        self.vocab_size = vocab_size
        self.padded_vocab_size = pad_vocab_size(vocab_size, tp)
        local = self.padded_vocab_size // tp
        self.vocab_start = rank * local
        self.chunk_size = chunk_size
        self.weight = _mark(nn.Parameter(torch.empty(local, dim)), 0, tp)
        self.weight.padded_dense_rows = self.padded_vocab_size
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None,
                weights: Optional[torch.Tensor] = None, target_classes: Optional[torch.Tensor] = None):
        """Logits [..., vocab] (gathered, unpadded) without labels; the weighted-loss stats with them."""
        if labels is None:
            logits = gather_from_tp_last_dim(F.linear(copy_to_tp(hidden, self.tp_group), self.weight),
                                             self.tp_group)
            return logits[..., :self.vocab_size]
        h = hidden.reshape(-1, hidden.shape[-1])
        return fused_weighted_cross_entropy(
            h, self.weight, labels.reshape(-1), weights.reshape(-1),
            None if target_classes is None else target_classes.reshape(-1),
            tp_group=self.tp_group, vocab_start=self.vocab_start, true_vocab_size=self.vocab_size,
            chunk_size=self.chunk_size)


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "VocabParallelLMHead",
           "LossStats", "gather_dense", "pad_vocab_size", "shard_dense", "tp_size_rank"]
