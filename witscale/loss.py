"""The weighted token loss: a fused, chunked, vocab-parallel cross-entropy with real-valued weights.

For every predicted token t (target id y_t, weight w_t ≥ 0)

    nll_t = logsumexp(h_t · Wᵀ) − h_t · W[y_t]          weighted_sum = Σ_t w_t · nll_t

computed on this rank's vocabulary shard W[v0:v0+V_local] with Megatron's three all-reduces over the
tensor-parallel group (row max, target logit, Σ exp), in fp32 whatever the input dtype, chunk by chunk
over tokens: at most one [chunk × V_local] block of logits is alive at any time, in forward and in
backward — the full [T × V] logits are never materialized.

Gradients are computed during the forward pass. The output is linear in its (scalar) upstream gradient,
so backward only multiplies the stored dL/dh and dL/dW by it. This costs the same three matmuls per chunk
as the naive path (logits, dh, dW) instead of four for a recompute-in-backward design, and the stored
dL/dW has the size of the weight's own gradient. Under ``torch.no_grad`` (evaluation) no gradient buffer
is created. dL/dh is summed over the vocab shards inside (one all-reduce), so the caller passes the
replicated hidden states directly (no ``copy_to_tp`` in front).

Normalizations (the trainer divides ``weighted_sum`` by a *global-batch* denominator, DESIGN.md §1):
- ``nonzero`` (default, the paper, Chatterjee et al. 2025): number of predicted tokens with w > 0;
- ``weight_sum``: Σ w over predicted tokens;
- ``tokens``: number of predicted tokens, whatever their weight.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

IGNORE_INDEX = -100
NORMALIZATIONS = ("nonzero", "weight_sum", "tokens")


class LossStats(NamedTuple):
    """A NamedTuple (not a dataclass) so DeepSpeed ZeRO-3 finds its tensors and re-gathers the LM head
    weight for backward."""
    weighted_sum: torch.Tensor    # scalar, differentiable: Σ_t w_t · nll_t over this micro-batch
    class_nll_sum: torch.Tensor   # [num_classes] float64, detached: Σ nll of predicted tokens of each class
    class_count: torch.Tensor     # [num_classes] float64, detached: predicted tokens of each class


def normalization_counts(targets: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three denominators for a set of targets (the trainer sums them over the global batch)."""
    predicted = targets != IGNORE_INDEX
    w = weights.double() * predicted
    return {"nonzero": (w > 0).sum().double(), "weight_sum": w.sum(), "tokens": predicted.sum().double()}


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


class _FusedLinearWeightedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, group, vocab_start, true_vocab_size, chunk_size,
                need_grad):
        tokens, _ = hidden.shape
        v_local = weight.shape[0]
        nll = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        # Padded vocabulary rows (ids ≥ true_vocab_size, present when vocab % tp != 0) never win the softmax.
        n_pad = max(0, vocab_start + v_local - true_vocab_size)
        valid = targets != IGNORE_INDEX
        local_t = targets - vocab_start
        in_shard = valid & (local_t >= 0) & (local_t < v_local)
        local_t = torch.where(in_shard, local_t, torch.zeros_like(local_t))
        w_all = torch.where(valid, weights.float(), torch.zeros_like(weights, dtype=torch.float32))

        for s in range(0, tokens, chunk_size):
            e = min(s + chunk_size, tokens)
            h = hidden[s:e]
            logits = (h @ weight.t()).float()                              # [c, V_local], the only big block
            if n_pad:
                logits[:, v_local - n_pad:] = float("-inf")
            row_max = _all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX, group)
            logits -= row_max[:, None]
            rows = torch.arange(e - s, device=logits.device)
            shard_mask = in_shard[s:e]
            target_logit = torch.where(shard_mask, logits[rows, local_t[s:e]], torch.zeros((), device=logits.device))
            _all_reduce(target_logit, dist.ReduceOp.SUM, group)
            probs = logits.exp_()                                           # in place: logits are no longer needed
            sum_exp = _all_reduce(probs.sum(dim=1), dist.ReduceOp.SUM, group)
            nll[s:e] = torch.where(valid[s:e], sum_exp.log() - target_logit, torch.zeros((), device=nll.device))
            if need_grad:
                # d(Σ w·nll)/dlogits = w · (softmax − onehot(target))
                probs /= sum_exp[:, None]
                probs[rows[shard_mask], local_t[s:e][shard_mask]] -= 1.0
                probs *= w_all[s:e, None]
                g = probs.to(weight.dtype)
                grad_h[s:e] = (g @ weight).float()
                grad_w += (g.t() @ h).float()
            del logits, probs
        if need_grad:
            _all_reduce(grad_h, dist.ReduceOp.SUM, group)   # dL/dh is a sum over the vocabulary shards
            ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(nll)
        return (nll * w_all).sum(), nll

    @staticmethod
    def backward(ctx, grad_sum, _grad_nll):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return ((grad_h * grad_sum).to(h_dtype), (grad_w * grad_sum).to(w_dtype),
                None, None, None, None, None, None, None)


def fused_weighted_cross_entropy(hidden: torch.Tensor, lm_weight: torch.Tensor, targets: torch.Tensor,
                                 weights: torch.Tensor, target_classes: Optional[torch.Tensor] = None, *,
                                 num_classes: int = 6, tp_group=None, vocab_start: int = 0,
                                 true_vocab_size: Optional[int] = None, chunk_size: int = 4096) -> LossStats:
    """Weighted NLL of ``targets`` under logits ``hidden @ lm_weightᵀ`` without materializing the logits.

    hidden [T, H] (replicated over the TP group); lm_weight [V_local, H], this rank's vocab shard starting
    at global id ``vocab_start``; targets [T] global ids, IGNORE_INDEX (-100) where nothing is predicted;
    weights [T] ≥ 0, the weight of each predicted token; target_classes [T] the class of each predicted
    token (for per-class NLL logging). ``true_vocab_size``: ids at or above it are padding rows.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weights.shape != targets.shape:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)}, "
                         f"weights {tuple(weights.shape)}")
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    if true_vocab_size is None:
        true_vocab_size = vocab_start + lm_weight.shape[0] if group is None else 1 << 62
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_weight.requires_grad)
    weighted_sum, nll = _FusedLinearWeightedCE.apply(hidden, lm_weight, targets, weights, group, vocab_start,
                                                     true_vocab_size, max(1, int(chunk_size)), need_grad)
    predicted = targets != IGNORE_INDEX
    classes = (target_classes if target_classes is not None else torch.zeros_like(targets)).long()
    cls = classes[predicted]
    class_nll = torch.zeros(num_classes, dtype=torch.float64, device=hidden.device)
    class_nll.index_add_(0, cls, nll[predicted].double())
    class_count = torch.bincount(cls, minlength=num_classes).double()[:num_classes]
    return LossStats(weighted_sum, class_nll, class_count)
