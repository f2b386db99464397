"""SimPO, Simple Preference Optimization (Meng et al. 2024) on the fused kernel (docs/objective.md#simpo).

Reference-free: a completion's implicit reward is its length-normalised log-prob,
r(y) = β·ā(y), ā the mean response log-prob (witscale/training/length_normalized.py), and each pair's loss is

    L = −(1−ε)·log σ(z) − ε·log σ(−z),   z = r(y_w) − r(y_l) − γ

(ε = --label-smoothing, 0: the paper's; TRL's CPO/SimPO smoothing). The objective is Σ_pairs L / P, P the
global batch's pair count (as DPO). ∂L/∂ā_w = β·dL/dz = −∂L/∂ā_l, turned into per-token weights of the
kernel's second pass. No reference model: the data's reference log-probs, if any, are not read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from witscale.training.length_normalized import (PairStats, mean_logp_token_weights, mean_response_logps,
                                                 pair_sum, two_pass)

# The per-pair sums a micro-batch reports (float64, summed over the global batch, divided by its pair count);
# TRL's CPO/SimPO metric names, flattened (logps_* are the MEAN response log-probs ā, rewards β·ā).
SIMPO_SUMS = ("loss", "logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected", "reward_accuracy",
              "pairs")


@dataclass(frozen=True)
class SimPOSettings:
    beta: float = 2.0              # the paper's β (its Llama-3/Mistral base runs: 2.0)
    gamma: float = 0.5             # γ, the target reward margin (TRL's simpo_gamma default)
    label_smoothing: float = 0.0

    def check(self) -> None:
        """One-line ValueErrors for settings that cannot work."""
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"--beta {self.beta} must be a positive number")
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"--simpo-gamma {self.gamma} must be a finite number >= 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing {self.label_smoothing} must lie in [0, 0.5)")


def simpo_pair_terms(mean_logps: torch.Tensor, role: torch.Tensor, pair: torch.Tensor, num_pairs: int,
                     settings: SimPOSettings):
    """Per pair the loss, per completion dL/dā (float64, on the inputs' device, no host sync), and the sums.

    mean_logps [D] float64 (ā of each completion); role [D] (0 chosen, 1 rejected); pair [D] (0..P−1)."""
    f64 = torch.float64
    chosen = role == 0
    sign = torch.where(chosen, 1.0, -1.0).to(f64)
    beta, gamma, eps = settings.beta, settings.gamma, settings.label_smoothing
    reward = beta * mean_logps
    reward_c = pair_sum(pair, num_pairs, torch.where(chosen, reward, 0.0))
    reward_r = pair_sum(pair, num_pairs, torch.where(chosen, 0.0, reward))
    z = reward_c - reward_r - gamma
    loss = (1 - eps) * F.softplus(-z) + eps * F.softplus(z)
    dloss_dz = -(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)
    grad = beta * dloss_dz[pair] * sign            # dL/dā_d: + for chosen, − for rejected (z's signs)
    sums = torch.stack([loss.sum(),
                        pair_sum(pair, num_pairs, torch.where(chosen, mean_logps, 0.0)).sum(),
                        pair_sum(pair, num_pairs, torch.where(chosen, 0.0, mean_logps)).sum(),
                        reward_c.sum(), reward_r.sum(), (reward_c > reward_r).to(f64).sum(),
                        # a fill, not torch.tensor(): a host→device copy would wait for the GPU
                        torch.full((), float(num_pairs), dtype=f64, device=mean_logps.device)])
    return loss, grad, sums


class SimPOLoss:
    """The head's ``objective`` for one micro-batch (``VocabParallelLMHead.forward(..., objective=)``).

    doc_index [B, S], doc_role [D], doc_pair [D]: the loader's preference tensors; a fourth argument (the
    reference log-probs the loader passes for every preference objective) is not read."""

    def __init__(self, settings: SimPOSettings, doc_index, doc_role, doc_pair, *_reference_unused):
        self.settings = settings
        self.doc_index, self.doc_role, self.doc_pair = doc_index, doc_role, doc_pair

    def __call__(self, fused_loss, h, labels, weights, target_classes) -> PairStats:
        num_docs = self.doc_role.shape[0]
        num_pairs = num_docs // 2            # every pair is whole in its row (the packer's contract)

        def terms(token_nll):
            mean, length = mean_response_logps(token_nll, target_classes, self.doc_index, num_docs)
            _, grad, sums = simpo_pair_terms(mean, self.doc_role, self.doc_pair, num_pairs, self.settings)
            return mean_logp_token_weights(grad, length, target_classes, self.doc_index), sums

        return two_pass(fused_loss, h, labels, weights, target_classes, terms)


def describe(settings: SimPOSettings) -> str:
    extra = f", label smoothing {settings.label_smoothing}" if settings.label_smoothing else ""
    return f"SimPO (β {settings.beta}, γ {settings.gamma}{extra}; no reference)"


__all__ = ["SIMPO_SUMS", "SimPOSettings", "SimPOLoss", "simpo_pair_terms", "describe"]
