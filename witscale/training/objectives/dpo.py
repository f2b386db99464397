"""Direct Preference Optimization (``--objective dpo``) on the fused, chunked, vocab-parallel loss
(docs/objective.md#dpo): a pair objective (objectives/pairs.py) with precomputed reference log-probs
(objectives/reference.py).

A preference pair is two documents in one packed row: the prompt then the chosen completion, the prompt
then the rejected one. A completion's log-prob is logp_d = −Σ_{t∈d} w_t·nll_t over its loss tokens (w the
class-weight table: by default prompt side 0, response side 1). With Δ_d = logp_d − ref_d (the reference
model's, precomputed: tools/precompute_reference.py) and z = β·(Δ_chosen − Δ_rejected), each pair's loss is

    sigmoid  L = −(1−ε)·log σ(z) − ε·log σ(−z)          (ε = --label-smoothing; 0: the DPO paper's)
    ipo      L = (Δ_chosen − Δ_rejected − 1/(2β))²       (IPO, Azar et al. 2023, on summed log-probs)

and the objective is Σ_pairs L / P, P the number of pairs in the GLOBAL batch (like SFT's N, known before
the forward pass: ``StepBatch.denominators["pairs"]``).

The two passes of the kernel that give the gradient of a per-completion loss are objectives/pairs.py's
(``PairHead``); this module writes the per-pair terms (``pair_terms``) and the metrics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from witscale.training.objectives import register
from witscale.training.objectives.base import HeadStats
from witscale.training.objectives.pairs import Completions, PairHead, PairObjective, PairTerms
# The reference log-probs DPO subtracts (re-exported: the names DPO's users know).
from witscale.training.objectives.reference import (CompletionLogps, ReferenceLogps, check_reference,  # noqa: F401
                                                    reference_fingerprint, weight_table_record)

DPO_LOSSES = ("sigmoid", "ipo")
# The per-pair sums a micro-batch reports (float64, summed over the global batch, divided by its pair count):
DPO_SUMS = ("loss", "logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected", "reward_accuracy",
            "pairs")


@dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0

    def check(self) -> None:
        """One-line ValueErrors for settings that cannot work."""
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"--beta {self.beta} must be a positive number")
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"--dpo-loss {self.loss}: unknown (known: {', '.join(DPO_LOSSES)})")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing {self.label_smoothing} must lie in [0, 0.5)")
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("--label-smoothing applies to --dpo-loss sigmoid only")


class DPOStats(HeadStats):
    """``HeadStats`` whose ``sums`` are DPO_SUMS (also as ``dpo_sums``)."""
    __slots__ = ()

    @property
    def dpo_sums(self) -> torch.Tensor:
        return self.sums


def pair_terms(logps: torch.Tensor, reference: torch.Tensor, role: torch.Tensor, pair: torch.Tensor,
               num_pairs: int, settings: DPOSettings):
    """Per pair: the loss, and per completion: dL/dlogp (float64, on the inputs' device, no host sync).

    logps, reference [D] float64 (policy and reference log-probs of each completion); role [D] (0 chosen,
    1 rejected); pair [D] the pair of each completion (0..num_pairs−1). Returns (loss [P], grad [D], sums
    [len(DPO_SUMS)])."""
    f64 = torch.float64
    chosen = role == 0
    sign = torch.where(chosen, 1.0, -1.0).to(f64)
    delta = logps - reference
    # Δ_chosen − Δ_rejected per pair, by a signed scatter (each pair has one completion of each role).
    margin = torch.zeros(num_pairs, dtype=f64, device=logps.device).index_add_(0, pair, sign * delta)
    beta = settings.beta
    if settings.loss == "sigmoid":
        z = beta * margin
        eps = settings.label_smoothing
        loss = (1 - eps) * F.softplus(-z) + eps * F.softplus(z)
        dloss_dmargin = beta * (-(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z))
    else:
        gap = margin - 1.0 / (2 * beta)
        loss = gap * gap
        dloss_dmargin = 2 * gap
    grad = dloss_dmargin[pair] * sign                 # dL/dlogp_d: + for chosen, − for rejected
    zeros = torch.zeros(num_pairs, dtype=f64, device=logps.device)
    logp_c = zeros.index_add(0, pair, torch.where(chosen, logps, 0.0))
    logp_r = zeros.index_add(0, pair, torch.where(chosen, 0.0, logps))
    reward_c = beta * zeros.index_add(0, pair, torch.where(chosen, delta, 0.0))
    reward_r = beta * zeros.index_add(0, pair, torch.where(chosen, 0.0, delta))
    sums = torch.stack([loss.sum(), logp_c.sum(), logp_r.sum(), reward_c.sum(), reward_r.sum(),
                        (reward_c > reward_r).to(f64).sum(),
                        # a fill, not torch.tensor(): a host→device copy would wait for the GPU
                        torch.full((), float(num_pairs), dtype=f64, device=logps.device)])
    return loss, grad, sums


def _terms(settings: DPOSettings, c: Completions) -> PairTerms:
    _, grad, sums = pair_terms(c.logps, c.reference, c.role, c.pair, c.num_pairs, settings)
    return PairTerms(grad, sums)


class DPOLoss(PairHead):
    """The head's ``objective`` hook for one micro-batch (``VocabParallelLMHead.forward(..., objective=)``).

    doc_index [B, S] (completion of each target position, −1 where none), doc_role [D], doc_pair [D],
    reference_logps [D] float64: the loader's preference tensors (witscale/data/loader.py)."""

    def __init__(self, settings: DPOSettings, doc_index, doc_role, doc_pair, reference_logps):
        self.settings = settings
        super().__init__(lambda c: _terms(settings, c), doc_index, doc_role, doc_pair, reference_logps,
                         stats_type=DPOStats)


@register
class DPO(PairObjective):
    name = "dpo"
    default_lr = 5e-7                  # the paper's DPO stage (Chatterjee et al. 2025, §4.2)
    defaults = {"beta": 0.1, "dpo_loss": "sigmoid", "label_smoothing": 0.0}     # TRL's
    flags = {**PairObjective.flags, "beta": "--beta", "dpo_loss": "--dpo-loss",
             "label_smoothing": "--label-smoothing", "reference_model": "--reference-model"}
    sums = DPO_SUMS
    uses_reference = True
    stats_type = DPOStats
    # per-pair means, train and eval (TRL's names) → TensorBoard train_<tag> / eval_<tag>
    metric_tags: ClassVar[dict] = {
        "rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
        "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies",
        "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected"}
    # Measured on the preference data: they compare DPO cells with each other, never with SFT.
    sweep_metrics: ClassVar[dict] = {"reward_accuracy": True, "reward_margin": True}

    def __init__(self, settings: DPOSettings = DPOSettings(), reference_model=None, policy_model=None):
        self.settings, self.reference_model, self.policy_model = settings, reference_model, policy_model

    @classmethod
    def from_config(cls, cfg) -> "DPO":
        return cls(DPOSettings(beta=cfg.beta, loss=cfg.dpo_loss, label_smoothing=cfg.label_smoothing),
                   reference_model=cfg.reference_model, policy_model=cfg.model)

    def check(self) -> None:
        self.settings.check()

    def check_data(self, manifest: dict, path: str, table, cfg=None, flag: str = "--data") -> None:
        """Refuses SFT data, data without reference log-probs, reference log-probs of another
        --reference-model (else --model) or of other class weights; and a run with neither model."""
        try:
            check_reference(manifest, path, table, self.reference_model, policy_model=self.policy_model)
        except (OSError, ValueError) as e:
            raise ValueError(f"{flag} {e}") from None
        if not self.policy_model and not self.reference_model:
            # nothing to check the dataset's reference log-probs against: they could be any model's
            raise ValueError("--objective dpo starts from a trained model: pass --model SFT_HF_DIR (the policy's "
                             "start and, by default, the reference), or --reference-model naming the model whose "
                             f"log-probs {flag} {path} holds")

    def pair_terms(self, completions: Completions) -> PairTerms:
        return _terms(self.settings, completions)

    def describe(self) -> str:
        return describe(self.settings)

    def metrics(self, sums: dict, prefix: str = "") -> dict:
        """Per-pair means of the DPO sums (TRL's names, flattened): log-probs, rewards β·(logp − ref), the
        reward margin and the accuracy (fraction of pairs whose chosen reward is the larger)."""
        pairs = sums["pairs"]
        mean = {k: (v / pairs if pairs > 0 else float("nan")) for k, v in sums.items() if k not in ("loss", "pairs")}
        mean["reward_margin"] = mean["rewards_chosen"] - mean["rewards_rejected"]
        mean["pairs"] = pairs
        return {prefix + k: v for k, v in mean.items()}

    def console(self, record: dict) -> str:
        return f"margin {record['reward_margin']:.4f} accuracy {record['reward_accuracy']:.3f} "


def describe(settings: DPOSettings) -> str:
    extra = f", label smoothing {settings.label_smoothing}" if settings.label_smoothing else ""
    return f"DPO ({settings.loss}, β {settings.beta}{extra})"


__all__ = ["DPO", "DPO_LOSSES", "DPO_SUMS", "DPOSettings", "DPOStats", "DPOLoss", "pair_terms", "describe",
           "ReferenceLogps", "CompletionLogps", "reference_fingerprint", "check_reference", "weight_table_record"]
