"""Direct Preference Optimization on the fused, chunked, vocab-parallel loss (docs/objective.md#dpo).

A preference pair is two documents in one packed row: the prompt then the chosen completion, the prompt
then the rejected one. A completion's log-prob is logp_d = −Σ_{t∈d} w_t·nll_t over its loss tokens (w the
class-weight table: by default prompt side 0, response side 1). With Δ_d = logp_d − ref_d (the reference
model's, precomputed: tools/precompute_reference.py) and z = β·(Δ_chosen − Δ_rejected), each pair's loss is

    sigmoid  L = −(1−ε)·log σ(z) − ε·log σ(−z)          (ε = --label-smoothing; 0: the DPO paper's)
    ipo      L = (Δ_chosen − Δ_rejected − 1/(2β))²       (IPO, Azar et al. 2023, on summed log-probs)

and the objective is Σ_pairs L / P, P the number of pairs in the GLOBAL batch (like SFT's N, known before
the forward pass: ``StepBatch.denominators["pairs"]``).

Why two passes of the fused kernel, inside the LM head's forward (``DPOLoss`` is the head's ``objective``):
L depends on the whole completion's log-prob, so its gradient is a per-completion coefficient times the
per-token gradient: dL/dθ = Σ_d (dL/dlogp_d)·∇logp_d = Σ_t (−dL/dlogp_{d(t)}·w_t)·∇nll_t. The coefficients
need every token's NLL first, so
  1. a no-grad pass gives the per-token NLL (``LossStats.token_nll``; the logits matmul only);
  2. per-completion log-probs by ``index_add_`` over ``doc_index``, the pair losses and the coefficients
     (detached), all on the device — no host sync;
  3. a second pass with per-token weights −dL/dlogp_{d(t)}·w_t: its ``weighted_sum`` has exactly the DPO
     gradient (the kernel takes real-valued, here also negative, weights and computes the gradient in its
     forward). That sum's *value* is a surrogate the trainer never logs; the real loss comes from step 2.
Cost: the head's matmuls are 4 instead of SFT's 3 (~1.33× the head), never a [tokens × vocab] block beyond
one chunk. Running both passes inside the head's forward means ZeRO-3 gathers its weight once. Under tensor
parallelism the kernel's NLL is identical on every TP rank, so the coefficients are too.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

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
        import math
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"--beta {self.beta} must be a positive number")
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"--dpo-loss {self.loss}: unknown (known: {', '.join(DPO_LOSSES)})")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing {self.label_smoothing} must lie in [0, 0.5)")
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("--label-smoothing applies to --dpo-loss sigmoid only")


class DPOStats(NamedTuple):
    """What the head returns under DPO. A NamedTuple (as ``LossStats``): ZeRO-3 must see ``weighted_sum``
    among the module's outputs to re-gather the head's weight for backward."""
    weighted_sum: torch.Tensor     # the surrogate: its gradient is the DPO gradient; its value means nothing
    class_nll_sum: torch.Tensor    # [C] float64, as LossStats (the policy's NLL of both completions)
    class_count: torch.Tensor      # [C] float64
    dpo_sums: torch.Tensor         # [len(DPO_SUMS)] float64, detached


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


def completion_logps(token_nll: torch.Tensor, weights: torch.Tensor, doc_index: torch.Tensor,
                     num_docs: int) -> torch.Tensor:
    """logp_d = −Σ_{t: doc_index_t = d} w_t·nll_t, float64 [num_docs] (positions with doc_index −1 add 0)."""
    idx = doc_index.reshape(-1)
    inside = idx >= 0
    contrib = torch.where(inside, weights.reshape(-1).double() * token_nll.reshape(-1).double(), 0.0)
    # Positions outside any completion go to a spare last slot (also valid when num_docs is 0).
    sums = torch.zeros(num_docs + 1, dtype=torch.float64, device=token_nll.device)
    return sums.index_add_(0, torch.where(inside, idx, num_docs), -contrib)[:num_docs]


class DPOLoss:
    """The head's ``objective`` for one micro-batch (``VocabParallelLMHead.forward(..., objective=)``).

    doc_index [B, S] (completion of each target position, −1 where none), doc_role [D], doc_pair [D],
    reference_logps [D] float64: the loader's preference tensors (witscale/data/loader.py)."""

    def __init__(self, settings: DPOSettings, doc_index, doc_role, doc_pair, reference_logps):
        self.settings = settings
        self.doc_index, self.doc_role, self.doc_pair = doc_index, doc_role, doc_pair
        self.reference_logps = reference_logps

    def __call__(self, fused_loss, h, labels, weights, target_classes) -> DPOStats:
        num_docs = self.doc_role.shape[0]
        num_pairs = num_docs // 2            # every pair is whole in its row (the packer's contract)
        with torch.no_grad():
            first = fused_loss(h, labels, weights, target_classes)
            logps = completion_logps(first.token_nll, weights, self.doc_index, num_docs)
            _, grad, sums = pair_terms(logps, self.reference_logps.double(), self.doc_role, self.doc_pair,
                                       num_pairs, self.settings)
            idx = self.doc_index.reshape(-1)
            # w'_t = −dL/dlogp_{d(t)}·w_t: then ∇Σ w'·nll = Σ_d dL/dlogp_d·∇logp_d (logp_d = −Σ w·nll).
            # Positions outside any completion read a spare trailing 0 (also valid when there are none).
            coefficient = torch.cat([-grad, grad.new_zeros(1)])[torch.where(idx >= 0, idx, num_docs)]
            token_weights = coefficient * weights.double()
        if not torch.is_grad_enabled():      # evaluation: no gradient, so no second pass
            return DPOStats(torch.zeros((), dtype=h.dtype, device=h.device), first.class_nll_sum,
                            first.class_count, sums)
        second = fused_loss(h, labels, token_weights.to(weights.dtype), target_classes)
        return DPOStats(second.weighted_sum, second.class_nll_sum, second.class_count, sums)


class CompletionLogps(NamedTuple):
    """``ReferenceLogps``'s output: ``weighted_sum`` (a zero, for the pipeline's loss slot) and the log-probs."""
    weighted_sum: torch.Tensor
    logps: torch.Tensor            # [D] float64


class ReferenceLogps:
    """The head's ``objective`` for the reference pass (tools/precompute_reference.py): one no-grad pass of the
    same fused kernel, each completion's Σ w·log p — exactly what ``DPOLoss`` subtracts them from."""

    def __init__(self, doc_index, doc_role, *_ignored):
        self.doc_index, self.num_docs = doc_index, doc_role.shape[0]

    def __call__(self, fused_loss, h, labels, weights, target_classes) -> CompletionLogps:
        with torch.no_grad():
            stats = fused_loss(h, labels, weights, target_classes)
            logps = completion_logps(stats.token_nll, weights, self.doc_index, self.num_docs)
        return CompletionLogps(torch.zeros((), dtype=h.dtype, device=h.device), logps)


def preference_inputs(mb) -> Optional[tuple]:
    """(doc_index, doc_role, doc_pair, reference_logps) of a preference micro-batch, else None."""
    if getattr(mb, "doc_index", None) is None:
        return None
    return mb.doc_index, mb.doc_role, mb.doc_pair, mb.reference_logps


# --- the reference model's fingerprint -----------------------------------------------------------------
FINGERPRINT_SAMPLES = 16         # data blocks read per safetensors file
FINGERPRINT_BLOCK = 4096


def reference_fingerprint(model_dir: str) -> str:
    """sha256 identifying an HF directory's weights without reading them all: config.json, the safetensors
    index, and for every .safetensors file its name, size, header (names, dtypes, shapes, offsets) and
    FINGERPRINT_SAMPLES blocks of its data at evenly spaced offsets. Headers alone would not do: a retrained
    model of the same shape has the same headers. Cheap at 70B (a few MB read); it tells models apart, it
    is not a guarantee against a file crafted to collide."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    shards = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not shards:
        raise ValueError(f"{model_dir}: no .safetensors files")
    for name in shards:
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (0,)
            digest.update(f.read(min(n, 100 * 2 ** 20)))
            data_start = 8 + n
            span = max(0, size - data_start - FINGERPRINT_BLOCK)
            for k in range(FINGERPRINT_SAMPLES):
                f.seek(data_start + span * k // max(1, FINGERPRINT_SAMPLES - 1))
                digest.update(f.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


def weight_table_record(table) -> list[float]:
    """The class-weight table as stored with the reference log-probs (they are sums under it)."""
    return [float(x) for x in table]


def _table_text(table) -> str:
    """A weight table for a message: float32 weights as written (0.1, not 0.10000000149011612)."""
    return "[" + ", ".join(f"{float(x):.7g}" for x in table) + "]"


def check_reference(manifest: dict, data_path: str, table, reference_model: Optional[str],
                    policy_model: Optional[str] = None) -> None:
    """Refuse (ValueError, one line) preference data whose reference log-probs cannot serve this run: they
    must come from ``reference_model`` when given, else from ``policy_model`` (DPO's usual start: the SFT
    model is both the initial policy and the reference), checked by fingerprint."""
    if manifest.get("task") != "preference":
        task = manifest.get("task", "sft")
        kind = "an SFT" if task == "sft" else f"a {task!r}"
        raise ValueError(f"{data_path} is {kind} dataset, but --objective dpo needs a preference dataset "
                         f"(tools/pack_dataset.py --task preference)")
    ref = manifest.get("reference")
    if not ref:
        raise ValueError(f"{data_path} has no reference log-probs: run tools/precompute_reference.py --data "
                         f"{data_path} --model REFERENCE_HF_DIR first")
    stored = ref.get("weight_table")
    if stored is not None and [round(float(x), 9) for x in stored] != [round(float(x), 9) for x in table]:
        raise ValueError(f"{data_path}: its reference log-probs were summed under class weights "
                         f"{_table_text(stored)}, this run's are {_table_text(table)}: recompute them with the "
                         f"same weights")
    expected, flag = (reference_model, "--reference-model") if reference_model else (policy_model, "--model")
    if expected:
        mine = reference_fingerprint(expected)
        if ref.get("fingerprint") != mine:
            hint = "" if reference_model else " (a reference other than the starting model: pass --reference-model DIR)"
            raise ValueError(f"{data_path}: its reference log-probs come from {ref.get('model', 'another model')} "
                             f"(fingerprint {str(ref.get('fingerprint'))[:12]}), not {flag} "
                             f"{expected} ({mine[:12]}){hint}")


def describe(settings: DPOSettings) -> str:
    extra = f", label smoothing {settings.label_smoothing}" if settings.label_smoothing else ""
    return f"DPO ({settings.loss}, β {settings.beta}{extra})"


__all__ = ["DPO_LOSSES", "DPO_SUMS", "DPOSettings", "DPOStats", "DPOLoss", "ReferenceLogps", "CompletionLogps",
           "pair_terms", "completion_logps",
           "preference_inputs", "reference_fingerprint", "check_reference", "weight_table_record", "describe"]
