"""ORPO, Odds Ratio Preference Optimization (``--objective orpo``; Hong et al. 2024; docs/objective.md#orpo): a
reference-free pair objective (objectives/pairs.py) whose SFT term carries the WIT class weights.

    L = L_SFT + λ·L_OR                                            (per pair; λ = --orpo-lambda)
    L_SFT = Σ_{t∈y_w} w_t·nll_t / n_w                             (w_t the run's class weights: λp, λr, …)
    L_OR  = −log σ(x),  x = log odds(y_w) − log odds(y_l),  log odds(y) = ā − log(1 − e^ā)

ā the completion's mean response log-prob (objectives/length_normalized.py: log P(y|x) per token, as the paper
and TRL), n_w the run's --normalization counted over the chosen completion's predicted tokens (nonzero: those
with w > 0 — at (λp, λr) = (0, 1) the mean response NLL, the paper's per-sequence SFT loss; weight_sum: Σ w;
tokens: all of them). The objective is Σ_pairs L / P, P the global batch's pair count.

Gradient: L_SFT is linear in the per-token NLL (w_t/n_w on the chosen completion's tokens); L_OR depends on
ā: ∂L_OR/∂ā_w = −σ(−x)/(1 − e^{ā_w}), ∂L_OR/∂ā_l = σ(−x)/(1 − e^{ā_l}). Both are per-token terms of the
kernel's second pass (``PairTerms.token_grad``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from witscale.data.weighting import NORMALIZATIONS
from witscale.training.objectives import register
from witscale.training.objectives.dpo import DPO
from witscale.training.objectives.length_normalized import (ResponseMeanObjective, ResponseMeans, per_completion,
                                                            spread)
from witscale.training.objectives.pairs import Completions, PairTerms

# The per-pair sums a micro-batch reports (float64, summed over the global batch, divided by its pair count);
# TRL's ORPO metric names, flattened: sft_loss (L_SFT; TRL's nll_loss — witscale's nll_<name> keys are per-class
# NLLs), log_odds_ratio (log σ(x)), log_odds_chosen (x),
# logps_* the MEAN response log-probs ā, rewards λ·ā.
ORPO_SUMS = ("loss", "sft_loss", "log_odds_ratio", "log_odds_chosen", "logps_chosen", "logps_rejected",
             "rewards_chosen", "rewards_rejected", "reward_accuracy", "pairs")


@dataclass(frozen=True)
class ORPOSettings:
    lam: float = 0.1                # λ, the odds-ratio term's weight (the paper's 0.1; TRL's ORPOConfig.beta)
    normalization: str = "nonzero"  # n_w of the SFT term, per chosen completion (the run's --normalization)

    def check(self) -> None:
        """One-line ValueErrors for settings that cannot work."""
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"--orpo-lambda {self.lam} must be a finite number >= 0")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization {self.normalization}: unknown (known: {', '.join(NORMALIZATIONS)})")


# ā is clamped to at most this in the odds: a completion whose every response token the fp32 kernel predicts with
# probability exactly 1 (nll 0: a confident model rounds to it) has ā = 0 and infinite odds — a NaN loss and
# gradient (TRL's too). At the clamp its log odds are ≈ 16.1 and the step stays finite.
MAX_ODDS_MEAN_LOGP = -1e-7


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − e^a) for a ≤ 0, accurate at both ends (Mächler 2012); −inf at a = 0 (P = 1: infinite odds)."""
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def sft_denominators(c: Completions, normalization: str) -> torch.Tensor:
    """n_d [D] float64: ``normalization``'s count over each completion's predicted tokens."""
    if normalization == "nonzero":
        return c.tokens                # w ≠ 0 (weights are ≥ 0)
    if normalization == "weight_sum":
        return c.weight_sums
    return c.across_sequence(per_completion(torch.ones_like(c.token_nll), c.doc_index, c.role.shape[0]))


def orpo_terms(settings: ORPOSettings, c: Completions, means: ResponseMeans) -> PairTerms:
    """The pair losses' sums and gradient (float64, on the device, no host sync)."""
    f64 = torch.float64
    chosen = c.role == 0
    lam = settings.lam
    # L_SFT of each pair: its chosen completion's Σ w·nll (= −logps) over n_w; 0 when n_w = 0 (nothing to learn).
    n = sft_denominators(c, settings.normalization)
    sft_coefficient = torch.where(chosen & (n > 0), 1.0 / n.clamp(min=1e-300), 0.0)
    sft = c.per_pair(-c.logps * sft_coefficient, 0)
    mean = means.mean.clamp(max=MAX_ODDS_MEAN_LOGP)
    log_odds = mean - log1mexp(mean)
    x = c.per_pair(log_odds, 0) - c.per_pair(log_odds, 1)
    odds_loss = F.softplus(-x)                               # −log σ(x)
    loss = sft + lam * odds_loss
    # ∂(λ·L_OR)/∂ā_d = −λ·σ(−x)·(±1)·d(log odds)/dā, d(log odds)/dā = 1/(1 − e^ā) = −1/expm1(ā)
    dloss_dmean = lam * -torch.sigmoid(-x)[c.pair] * torch.where(chosen, 1.0, -1.0).to(f64) / -torch.expm1(mean)
    logp_c, logp_r = c.per_pair(means.mean, 0), c.per_pair(means.mean, 1)
    sums = torch.stack([loss.sum(), sft.sum(), -odds_loss.sum(), x.sum(), logp_c.sum(), logp_r.sum(),
                        lam * logp_c.sum(), lam * logp_r.sum(), (logp_c > logp_r).to(f64).sum(),
                        # a fill, not torch.tensor(): a host→device copy would wait for the GPU
                        torch.full((), float(c.num_pairs), dtype=f64, device=loss.device)])
    # ∂L/∂nll_t: the SFT part w_t/n_w on the chosen completion's tokens, plus the odds-ratio part through ā.
    token_grad = spread(sft_coefficient, c.doc_index) * c.weights + means.token_grad(dloss_dmean)
    return PairTerms(torch.zeros_like(c.logps), sums, token_grad)


@register
class ORPO(ResponseMeanObjective):
    name = "orpo"
    default_lr = 8e-6                  # TRL's ORPO example (ORPO starts from a base model, not an SFT one)
    defaults = {"orpo_lambda": 0.1}
    flags = {**ResponseMeanObjective.flags, "orpo_lambda": "--orpo-lambda"}
    sums = ORPO_SUMS
    metric_tags: ClassVar[dict] = {**DPO.metric_tags, "sft_loss": "sft_loss", "log_odds_ratio": "log_odds_ratio",
                                   "log_odds_chosen": "log_odds_chosen"}     # TRL's names

    def __init__(self, settings: ORPOSettings = ORPOSettings()):
        self.settings = settings

    @classmethod
    def from_config(cls, cfg) -> "ORPO":
        return cls(ORPOSettings(lam=cfg.orpo_lambda, normalization=cfg.normalization))

    def check(self) -> None:
        self.settings.check()

    def response_terms(self, c: Completions, means: ResponseMeans) -> PairTerms:
        return orpo_terms(self.settings, c, means)

    def describe(self) -> str:
        return f"ORPO (λ {self.settings.lam}; no reference)"

    def startup_line(self, weights: str, normalization: str) -> str:
        return (f"objective: {self.describe()}, divided by the pairs of each global batch; SFT term on the chosen "
                f"completion under class weights {weights}, normalised per completion by {normalization}")

    def console(self, record: dict) -> str:
        return (f"sft {record['sft_loss']:.4f} log_odds_ratio {record['log_odds_ratio']:.4f} "
                f"accuracy {record['reward_accuracy']:.3f} ")


__all__ = ["ORPO", "ORPO_SUMS", "ORPOSettings", "orpo_terms", "sft_denominators", "log1mexp"]
