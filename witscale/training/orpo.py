"""ORPO, Odds Ratio Preference Optimization (Hong et al. 2024) on the fused kernel (docs/objective.md#orpo).

No reference model. Each pair's loss is the WIT loss of its chosen completion plus λ times an odds-ratio term:

    L = L_SFT + λ·L_OR
    L_SFT = Σ_{t∈y_w} w_t·nll_t / n_w          (w_t the run's class weights: prompt side λp, response side λr)
    L_OR  = −log σ(log odds(y_w) − log odds(y_l)),   log odds(y) = ā − log(1 − e^ā)

ā the mean response log-prob of the completion (witscale/training/length_normalized.py: log P(y|x) per token,
as the paper and TRL), n_w the run's --normalization counted over the chosen completion's predicted tokens
(nonzero: those with w > 0 — with (λp, λr) = (0, 1) the mean response NLL, the paper's per-sequence SFT loss;
weight_sum: Σ w; tokens: all of them). The objective is Σ_pairs L / P, P the global batch's pair count.

Gradient: L_SFT is linear in the per-token NLL (coefficient w_t/n_w on the chosen completion's tokens), L_OR
depends on ā: ∂L_OR/∂ā_w = −σ(−x)/(1 − e^{ā_w}), ∂L_OR/∂ā_l = σ(−x)/(1 − e^{ā_l}), x the log odds ratio;
both add into one per-token weight of the kernel's second pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from witscale.data.weighting import NORMALIZATIONS
from witscale.training.length_normalized import (PairStats, mean_logp_token_weights, mean_response_logps,
                                                 pair_sum, per_completion, spread, two_pass)

# The per-pair sums a micro-batch reports (float64, summed over the global batch, divided by its pair count);
# TRL's ORPO metric names, flattened: nll_loss (L_SFT), log_odds_ratio (log σ(x)), log_odds_chosen (x),
# logps_* the MEAN response log-probs ā, rewards λ·ā.
ORPO_SUMS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "logps_chosen", "logps_rejected",
             "rewards_chosen", "rewards_rejected", "reward_accuracy", "pairs")


@dataclass(frozen=True)
class ORPOSettings:
    lam: float = 0.1               # λ, the odds-ratio term's weight (the paper's 0.1; TRL's ORPOConfig.beta)
    normalization: str = "nonzero"  # n_w of the SFT term, per chosen completion (the run's --normalization)

    def check(self) -> None:
        """One-line ValueErrors for settings that cannot work."""
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"--orpo-lambda {self.lam} must be a finite number >= 0")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization {self.normalization}: unknown (known: {', '.join(NORMALIZATIONS)})")


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − e^a) for a ≤ 0, accurate at both ends (Mächler 2012): −inf at a = 0 (P = 1, odds infinite)."""
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def sft_denominators(weights: torch.Tensor, doc_index: torch.Tensor, num_docs: int,
                     normalization: str) -> torch.Tensor:
    """n_d [D] float64: ``normalization``'s count over each completion's predicted tokens (doc_index is −1
    where nothing is predicted)."""
    w = weights.reshape(-1).double()
    per_token = {"nonzero": (w > 0).double(), "weight_sum": w, "tokens": torch.ones_like(w)}[normalization]
    return per_completion(per_token, doc_index, num_docs)


def orpo_pair_terms(sft_sums: torch.Tensor, sft_denominators: torch.Tensor, mean_logps: torch.Tensor,
                    role: torch.Tensor, pair: torch.Tensor, num_pairs: int, settings: ORPOSettings):
    """Per pair the loss; per completion ∂L/∂(Σ w·nll) (the SFT coefficient: 1/n_w on the chosen, 0 on the
    rejected) and ∂L/∂ā; and the sums (float64, on the inputs' device, no host sync).

    sft_sums [D] = Σ_{t∈d} w_t·nll_t; sft_denominators [D] = n_d; mean_logps [D] = ā_d; role [D] (0 chosen,
    1 rejected); pair [D] (0..P−1)."""
    f64 = torch.float64
    chosen = role == 0
    lam = settings.lam
    # L_SFT per pair: the chosen completion's weighted NLL over its n_w (0 when n_w = 0: nothing to learn).
    sft_coefficient = torch.where(chosen & (sft_denominators > 0), 1.0 / sft_denominators.clamp(min=1e-300), 0.0)
    sft = pair_sum(pair, num_pairs, sft_coefficient * sft_sums)
    log_odds = mean_logps - log1mexp(mean_logps)
    sign = torch.where(chosen, 1.0, -1.0).to(f64)
    x = pair_sum(pair, num_pairs, sign * log_odds)            # log odds(y_w) − log odds(y_l)
    odds_term = F.softplus(-x)                                # −log σ(x)
    loss = sft + lam * odds_term
    # ∂(−log σ(x))/∂ā_d = −σ(−x)·sign_d·d(log odds)/dā, d(log odds)/dā = 1/(1 − e^ā) = −1/expm1(ā)
    dmean = lam * (-torch.sigmoid(-x))[pair] * sign / (-torch.expm1(mean_logps))
    logp_c = pair_sum(pair, num_pairs, torch.where(chosen, mean_logps, 0.0))
    logp_r = pair_sum(pair, num_pairs, torch.where(chosen, 0.0, mean_logps))
    sums = torch.stack([loss.sum(), sft.sum(), (-odds_term).sum(), x.sum(), logp_c.sum(), logp_r.sum(),
                        lam * logp_c.sum(), lam * logp_r.sum(), (logp_c > logp_r).to(f64).sum(),
                        # a fill, not torch.tensor(): a host→device copy would wait for the GPU
                        torch.full((), float(num_pairs), dtype=f64, device=mean_logps.device)])
    return loss, sft_coefficient, dmean, sums


class ORPOLoss:
    """The head's ``objective`` for one micro-batch (``VocabParallelLMHead.forward(..., objective=)``).

    doc_index [B, S], doc_role [D], doc_pair [D]: the loader's preference tensors; a fourth argument (the
    reference log-probs the loader passes for every preference objective) is not read."""

    def __init__(self, settings: ORPOSettings, doc_index, doc_role, doc_pair, *_reference_unused):
        self.settings = settings
        self.doc_index, self.doc_role, self.doc_pair = doc_index, doc_role, doc_pair

    def __call__(self, fused_loss, h, labels, weights, target_classes) -> PairStats:
        num_docs = self.doc_role.shape[0]
        num_pairs = num_docs // 2            # every pair is whole in its row (the packer's contract)
        doc_index = self.doc_index

        def terms(token_nll):
            w = weights.reshape(-1).double()
            sft_sums = per_completion(w * token_nll.reshape(-1).double(), doc_index, num_docs)
            n = sft_denominators(weights, doc_index, num_docs, self.settings.normalization)
            mean, length = mean_response_logps(token_nll, target_classes, doc_index, num_docs)
            _, sft_coefficient, dmean, sums = orpo_pair_terms(sft_sums, n, mean, self.doc_role, self.doc_pair,
                                                              num_pairs, self.settings)
            # ∂L/∂nll_t: the SFT part w_t/n_w on the chosen completion, plus the odds-ratio part through ā.
            token_weights = (spread(sft_coefficient, doc_index) * w
                             + mean_logp_token_weights(dmean, length, target_classes, doc_index))
            return token_weights, sums

        return two_pass(fused_loss, h, labels, weights, target_classes, terms)


def describe(settings: ORPOSettings) -> str:
    return (f"ORPO (λ {settings.lam}; SFT term normalised per chosen completion by {settings.normalization}; "
            f"no reference)")


__all__ = ["ORPO_SUMS", "ORPOSettings", "ORPOLoss", "orpo_pair_terms", "sft_denominators", "log1mexp",
           "describe"]
