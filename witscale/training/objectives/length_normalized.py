"""What the reference-free pair objectives share (SimPO: objectives/simpo.py, ORPO: objectives/orpo.py;
docs/objective.md#simpo, #orpo): each completion's length-normalised log-prob and its gradient as per-token
weights of ``PairHead``'s second pass.

A completion's **mean response log-prob** is

    ā_d = Σ_{t∈d} m_t·log p(x_{t+1} | x_{≤t}) / |y_d|,   |y_d| = Σ_{t∈d} m_t

m_t = 1 where the predicted token is of a response-side class (``RESPONSE_SIDE``: response, eot, reasoning,
tool_call), else 0: the papers' (1/|y|)·log π(y|x) over the completion y, whatever the class weights (λp,
λr) — the preference terms compare completions; the prompt (the same in both) never enters them.

Gradient: ā_d = −Σ m_t·nll_t / |y_d|, so a loss L(ā) has ∇L = Σ_t (−∂L/∂ā_{d(t)}·m_t/|y_{d(t)}|)·∇nll_t — a
per-token term (``PairTerms.token_grad``), not a multiple of the class weight w_t (``dloss_dlogp`` is zero).
"""
from __future__ import annotations

import torch

from witscale.data.classes import RESPONSE_SIDE
from witscale.training.objectives.pairs import Completions, PairHead, PairObjective, PairTerms


def per_completion(values: torch.Tensor, doc_index: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Σ_{t: doc_index_t = d} values_t, float64 [num_docs]; positions with doc_index −1 add nothing (they go
    to a spare last slot, also valid when num_docs is 0)."""
    idx = doc_index.reshape(-1)
    sums = torch.zeros(num_docs + 1, dtype=torch.float64, device=values.device)
    return sums.index_add_(0, torch.where(idx >= 0, idx, num_docs), values.reshape(-1).double())[:num_docs]


def spread(per_doc: torch.Tensor, doc_index: torch.Tensor) -> torch.Tensor:
    """[T] float64: per_doc[d(t)] at each position, 0 outside any completion."""
    idx = doc_index.reshape(-1)
    num_docs = per_doc.shape[0]
    return torch.cat([per_doc, per_doc.new_zeros(1)])[torch.where(idx >= 0, idx, num_docs)]


def response_mask(target_classes: torch.Tensor) -> torch.Tensor:
    """[T] float64: 1 where the predicted token is response-side (positions predicting nothing are class pad)."""
    # Comparisons with Python ints, not isin(torch.tensor(...)): a host→device copy would wait for the GPU.
    classes = target_classes.reshape(-1)
    mask = torch.zeros_like(classes, dtype=torch.bool)
    for c in RESPONSE_SIDE:
        mask |= classes == int(c)
    return mask.double()


class ResponseMeans:
    """ā [D] and |y| [D] (float64) of a micro-batch's completions, and the per-token weights of a loss's
    gradient through ā. A completion without response tokens has ā = 0 and gets no gradient (the packer
    refuses empty completions)."""

    def __init__(self, c: Completions, response: torch.Tensor):
        self.response, self.doc_index = response, c.doc_index
        num_docs = c.role.shape[0]
        both = c.across_sequence(torch.stack([per_completion(response, c.doc_index, num_docs),
                                              per_completion(-response * c.token_nll, c.doc_index, num_docs)]))
        self.length = both[0]
        self.mean = both[1] / self.length.clamp(min=1.0)

    def token_grad(self, dloss_dmean: torch.Tensor) -> torch.Tensor:
        """[T] a_t = −∂L/∂ā_{d(t)}·m_t/|y_{d(t)}|: then ∇Σ a·nll = Σ_d ∂L/∂ā_d·∇ā_d."""
        return spread(-dloss_dmean / self.length.clamp(min=1.0), self.doc_index) * self.response


class ResponseMeanHead(PairHead):
    """``PairHead`` whose terms also see the positions' response mask (from the kernel's target classes):
    ``terms(completions, means: ResponseMeans) -> PairTerms``."""

    def __init__(self, terms, *inputs, stats_type, sequence_group=None):
        super().__init__(lambda c: terms(c, ResponseMeans(c, self._response)), *inputs, stats_type=stats_type,
                         sequence_group=sequence_group)
        self._response = None

    def __call__(self, fused_loss, h, labels, weights, target_classes):
        self._response = response_mask(target_classes)
        return super().__call__(fused_loss, h, labels, weights, target_classes)


class ResponseMeanObjective(PairObjective):
    """Base of the pair objectives on mean response log-probs (SimPO, ORPO): a subclass writes
    ``response_terms(completions, means) -> PairTerms``; its sums hold TRL's rewards_*, logps_* and pairs."""

    def response_terms(self, c: Completions, means: ResponseMeans) -> PairTerms:
        raise NotImplementedError

    def head(self, *inputs) -> ResponseMeanHead:
        return ResponseMeanHead(self.response_terms, *inputs, stats_type=self.stats_type,
                                sequence_group=self.sequence_group)

    def metrics(self, sums: dict, prefix: str = "") -> dict:
        return pair_means(sums, prefix)


def pair_means(sums: dict, prefix: str = "") -> dict:
    """metrics.jsonl entries: every sum but the loss as a per-pair mean, the reward margin, the pair count."""
    pairs = sums["pairs"]
    out = {k: (v / pairs if pairs > 0 else float("nan")) for k, v in sums.items() if k not in ("loss", "pairs")}
    out.update(reward_margin=out["rewards_chosen"] - out["rewards_rejected"], pairs=pairs)
    return {prefix + k: v for k, v in out.items()}


__all__ = ["per_completion", "spread", "response_mask", "ResponseMeans", "ResponseMeanHead", "ResponseMeanObjective",
           "pair_means"]
