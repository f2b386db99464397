"""What the reference-free preference losses share (SimPO: witscale/training/simpo.py, ORPO: orpo.py;
docs/objective.md#simpo, #orpo): each completion's length-normalised log-prob, and the head's two passes
that turn per-completion loss derivatives into per-token weights of the fused kernel.

A completion's **mean response log-prob** is

    ā_d = Σ_{t∈d} m_t·log p(x_{t+1} | x_{≤t}) / |y_d|,   |y_d| = Σ_{t∈d} m_t

m_t = 1 where the predicted token is of a response-side class (``RESPONSE_SIDE``: response, eot, reasoning,
tool_call), else 0 — the papers' (1/|y|)·log π(y|x) over the completion y, whatever the class weights (λp,
λr): the preference terms compare completions, the prompt (the same in both) never enters them.

Gradient (as DPO's, witscale/training/dpo.py): ā_d = −Σ m_t·nll_t / |y_d|, so a loss L(ā) has
∇L = Σ_t (−∂L/∂ā_{d(t)}·m_t/|y_{d(t)}|)·∇nll_t — a real per-token weight for the kernel's second pass.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from witscale.data.classes import RESPONSE_SIDE


class PairStats(NamedTuple):
    """What the head returns under a pair objective. A NamedTuple (as ``LossStats``): ZeRO-3 must see
    ``weighted_sum`` among the module's outputs to re-gather the head's weight for backward."""
    weighted_sum: torch.Tensor     # the surrogate: its gradient is the objective's; its value means nothing
    class_nll_sum: torch.Tensor    # [C] float64, as LossStats (the policy's NLL of both completions)
    class_count: torch.Tensor      # [C] float64
    dpo_sums: torch.Tensor         # [len(<objective>_SUMS)] float64, detached (the trainer's DPO slot)


def per_completion(values: torch.Tensor, doc_index: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Σ_{t: doc_index_t = d} values_t, float64 [num_docs]; positions with doc_index −1 add nothing (they go
    to a spare last slot, also valid when num_docs is 0)."""
    idx = doc_index.reshape(-1)
    inside = idx >= 0
    sums = torch.zeros(num_docs + 1, dtype=torch.float64, device=values.device)
    return sums.index_add_(0, torch.where(inside, idx, num_docs), values.reshape(-1).double())[:num_docs]


def response_mask(target_classes: torch.Tensor) -> torch.Tensor:
    """[T] float64: 1 where the predicted token is response-side (non-predicted positions are class pad)."""
    side = torch.tensor([int(c) for c in RESPONSE_SIDE], device=target_classes.device)
    return torch.isin(target_classes.reshape(-1), side).double()


def mean_response_logps(token_nll, target_classes, doc_index, num_docs: int):
    """(ā [D], |y| [D]) float64: each completion's mean response log-prob and its response-token count
    (ā = 0 for a completion without response tokens, which then gets no gradient either)."""
    mask = response_mask(target_classes)
    length = per_completion(mask, doc_index, num_docs)
    total = per_completion(-mask * token_nll.reshape(-1).double(), doc_index, num_docs)
    return total / length.clamp(min=1.0), length


def spread(per_doc: torch.Tensor, doc_index: torch.Tensor) -> torch.Tensor:
    """[T] float64: per_doc[d(t)] at each position, 0 outside any completion."""
    idx = doc_index.reshape(-1)
    num_docs = per_doc.shape[0]
    return torch.cat([per_doc, per_doc.new_zeros(1)])[torch.where(idx >= 0, idx, num_docs)]


def mean_logp_token_weights(dloss_dmean, length, target_classes, doc_index) -> torch.Tensor:
    """[T] float64 w'_t = −∂L/∂ā_{d(t)}·m_t/|y_{d(t)}|: then ∇Σ w'·nll = Σ_d ∂L/∂ā_d·∇ā_d."""
    coefficient = spread(-dloss_dmean / length.clamp(min=1.0), doc_index)
    return coefficient * response_mask(target_classes)


def two_pass(fused_loss, h, labels, weights, target_classes,
             terms: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> PairStats:
    """The head's two passes (docs/objective.md#dpo, "Gradient through the kernel"): a no-grad pass for the
    per-token NLL; ``terms(token_nll)`` → (per-token weights w' [T] float64, the objective's sums), computed
    on the device without a host sync; then, when a gradient is wanted, a pass with w' whose ``weighted_sum``
    has exactly the objective's gradient (its value is a surrogate the trainer never logs)."""
    with torch.no_grad():
        first = fused_loss(h, labels, weights, target_classes)
        token_weights, sums = terms(first.token_nll)
    if not torch.is_grad_enabled():      # evaluation: no gradient, so no second pass
        return PairStats(torch.zeros((), dtype=h.dtype, device=h.device), first.class_nll_sum,
                         first.class_count, sums)
    second = fused_loss(h, labels, token_weights.to(weights.dtype), target_classes)
    return PairStats(second.weighted_sum, second.class_nll_sum, second.class_count, sums)


def pair_sum(pair: torch.Tensor, num_pairs: int, values: torch.Tensor) -> torch.Tensor:
    """[P] float64: Σ of values [D] over each pair's completions."""
    return torch.zeros(num_pairs, dtype=torch.float64, device=values.device).index_add_(0, pair, values)


__all__ = ["PairStats", "per_completion", "response_mask", "mean_response_logps", "spread",
           "mean_logp_token_weights", "two_pass", "pair_sum"]
