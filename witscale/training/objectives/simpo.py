"""SimPO, Simple Preference Optimization (``--objective simpo``; Meng et al. 2024; docs/objective.md#simpo): a
reference-free pair objective (objectives/pairs.py) on length-normalised log-probs
(objectives/length_normalized.py).

A completion's implicit reward is r(y) = β·ā(y), ā its mean response log-prob, and each pair's loss is

    L = −(1−ε)·log σ(z) − ε·log σ(−z),   z = r(y_w) − r(y_l) − γ

(β = --simpo-beta, γ = --simpo-gamma, ε = --simpo-label-smoothing: 0 is the paper's; TRL's CPO/SimPO
smoothing). The
objective is Σ_pairs L / P, P the global batch's pair count (as DPO). ∂L/∂ā_w = β·dL/dz = −∂L/∂ā_l, turned
into per-token weights of the kernel's second pass. No reference model: the data's reference log-probs, if
any, are not read, and --reference-model is refused (DPO's flag).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from witscale.training.objectives import register
from witscale.training.objectives.dpo import DPO
from witscale.training.objectives.length_normalized import ResponseMeanObjective, ResponseMeans
from witscale.training.objectives.pairs import Completions, PairTerms

# The per-pair sums a micro-batch reports (float64, summed over the global batch, divided by its pair count);
# TRL's CPO/SimPO metric names, flattened (logps_* are the MEAN response log-probs ā, rewards β·ā).
SIMPO_SUMS = ("loss", "logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected", "reward_accuracy",
              "pairs")


@dataclass(frozen=True)
class SimPOSettings:
    beta: float = 2.0              # the paper's β (its Mistral and Llama-3 base runs)
    gamma: float = 0.5             # γ, the target reward margin (TRL's simpo_gamma default)
    label_smoothing: float = 0.0

    def check(self) -> None:
        """One-line ValueErrors for settings that cannot work."""
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"--simpo-beta {self.beta} must be a positive number")
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"--simpo-gamma {self.gamma} must be a finite number >= 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--simpo-label-smoothing {self.label_smoothing} must lie in [0, 0.5)")


def simpo_terms(settings: SimPOSettings, c: Completions, means: ResponseMeans) -> PairTerms:
    """The pair losses' sums and gradient (float64, on the device, no host sync)."""
    f64 = torch.float64
    chosen = c.role == 0
    beta, gamma, eps = settings.beta, settings.gamma, settings.label_smoothing
    logp_c, logp_r = c.per_pair(means.mean, 0), c.per_pair(means.mean, 1)
    z = beta * (logp_c - logp_r) - gamma
    loss = (1 - eps) * F.softplus(-z) + eps * F.softplus(z)
    dloss_dz = -(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)
    dloss_dmean = beta * dloss_dz[c.pair] * torch.where(chosen, 1.0, -1.0).to(f64)
    sums = torch.stack([loss.sum(), logp_c.sum(), logp_r.sum(), beta * logp_c.sum(), beta * logp_r.sum(),
                        (logp_c > logp_r).to(f64).sum(),
                        # a fill, not torch.tensor(): a host→device copy would wait for the GPU
                        torch.full((), float(c.num_pairs), dtype=f64, device=loss.device)])
    return PairTerms(torch.zeros_like(means.mean), sums, means.token_grad(dloss_dmean))


@register
class SimPO(ResponseMeanObjective):
    name = "simpo"
    default_lr = 5e-7                  # within the paper's tuned range (3e-7 … 1e-6)
    # Flags of its own (DPO's --beta means another β, with another default): SimPO's β scales a mean log-prob.
    defaults = {"simpo_beta": 2.0, "simpo_gamma": 0.5, "simpo_label_smoothing": 0.0}
    flags = {**ResponseMeanObjective.flags, "simpo_beta": "--simpo-beta", "simpo_gamma": "--simpo-gamma",
             "simpo_label_smoothing": "--simpo-label-smoothing"}
    sums = SIMPO_SUMS
    metric_tags: ClassVar[dict] = DPO.metric_tags      # TRL's rewards/… and logps/… (here of ā)

    def __init__(self, settings: SimPOSettings = SimPOSettings()):
        self.settings = settings

    @classmethod
    def from_config(cls, cfg) -> "SimPO":
        return cls(SimPOSettings(beta=cfg.simpo_beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.simpo_label_smoothing))

    def check(self) -> None:
        self.settings.check()

    def response_terms(self, c: Completions, means: ResponseMeans) -> PairTerms:
        return simpo_terms(self.settings, c, means)

    def describe(self) -> str:
        s = self.settings
        extra = f", label smoothing {s.label_smoothing}" if s.label_smoothing else ""
        return f"SimPO (β {s.beta}, γ {s.gamma}{extra}; no reference)"

    def startup_line(self, weights: str, normalization: str) -> str:
        return (f"objective: {self.describe()}, divided by the pairs of each global batch; rewards from the mean "
                f"log-prob of each completion's response tokens (the class weights do not enter)")

    def console(self, record: dict) -> str:
        return f"margin {record['reward_margin']:.4f} accuracy {record['reward_accuracy']:.3f} "


__all__ = ["SimPO", "SIMPO_SUMS", "SimPOSettings", "simpo_terms"]
