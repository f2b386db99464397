"""The machinery every preference-pair objective shares: per-completion sums through the fused, chunked,
vocab-parallel kernel, in two passes inside the LM head's forward (docs/objective.md#dpo,
docs/objective.md#adding-an-objective).

A preference pair is two documents in one packed row: the prompt then the chosen completion, the prompt then
the rejected one (the loader's ``doc_index`` / ``doc_role`` / ``doc_pair`` / ``reference_logps``). A pair
objective's loss L = Σ_pairs L_p depends on whole completions through

    logp_d = Σ_{t∈d} w_t·log p_t = −Σ_{t∈d} w_t·nll_t      (w the class-weight table)

and possibly on per-token terms (ORPO's SFT term). Its gradient is then a per-completion coefficient times the
per-token gradient, plus the per-token term's: dL/dθ = Σ_t (−∂L/∂logp_{d(t)}·w_t + a_t)·∇nll_t, a_t = ∂L/∂nll_t
of the direct term. The coefficients need every token's NLL first, so ``PairHead``:
  1. runs a no-grad pass of the kernel: the per-token NLL (``LossStats.token_nll``);
  2. sums it per completion (``Completions``: log-prob, loss-token count, weight sum) and asks the objective's
     ``pair_terms`` for the pair losses, ∂L/∂logp_d and any a_t — all on the device, no host sync;
  3. runs a second pass with per-token weights w'_t = −∂L/∂logp_{d(t)}·w_t + a_t: its ``weighted_sum`` has
     exactly the objective's gradient (the kernel takes real, also negative, weights and computes the
     gradient in its forward). That value is a surrogate never logged; the loss is ``PairTerms.sums[0]``.
Cost: 4 matmuls of the head instead of SFT's 3 (~1.33× the head); never a [tokens × vocab] block beyond a chunk.
Both passes in the head's forward: ZeRO-3 gathers its weight once. Under tensor parallelism the kernel's NLL is
identical on every TP rank, so the coefficients are too.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple, Optional

import torch
import torch.distributed as dist

from witscale.training.objectives.base import HeadStats, Objective


class Completions(NamedTuple):
    """A micro-batch's completions as the first pass measured them (float64 [D] on the device, D = 2P), and
    the per-token inputs for objectives with a per-token term ([T] flattened positions)."""
    logps: torch.Tensor            # Σ_{t∈d} w_t·log p_t (the policy's)
    tokens: torch.Tensor           # loss tokens of d: targets with w_t ≠ 0 (length normalization, SimPO)
    weight_sums: torch.Tensor      # Σ_{t∈d} w_t
    role: torch.Tensor             # 0 chosen, 1 rejected
    pair: torch.Tensor             # the pair 0..P−1 of each completion (one of each role per pair)
    num_pairs: int
    reference: torch.Tensor        # the reference model's logp_d (NaN where the data has none)
    token_nll: torch.Tensor        # [T] float64, each position's NLL (0 where nothing is predicted)
    weights: torch.Tensor          # [T] float64, w_t
    doc_index: torch.Tensor        # [T] the completion of each position, −1 where none
    sequence_group: object = None  # --sp: the ranks holding the other shards of these rows (None: whole rows)

    def across_sequence(self, per_doc: torch.Tensor) -> torch.Tensor:
        """Per-completion sums over this rank's positions → over the whole rows (added over the sp group)."""
        return add_over_sequence(per_doc, self.sequence_group)

    def per_pair(self, values: torch.Tensor, role: int) -> torch.Tensor:
        """[P]: ``values`` [D] of each pair's chosen (role 0) or rejected (role 1) completion."""
        out = torch.zeros(self.num_pairs, dtype=values.dtype, device=values.device)
        return out.index_add(0, self.pair, torch.where(self.role == role, values, 0.0))


def add_over_sequence(per_doc: torch.Tensor, group) -> torch.Tensor:
    """``per_doc`` summed over the sequence-parallel ``group`` (None: the rows are whole here)."""
    if group is not None:
        per_doc = per_doc.contiguous()       # completion_sums' rows are a strided view: reduce a dense copy
        dist.all_reduce(per_doc, group=group)
    return per_doc


class PairTerms(NamedTuple):
    """What ``PairObjective.pair_terms`` returns (float64, on the device, detached)."""
    dloss_dlogp: torch.Tensor      # [D] ∂L/∂logp_d, L = Σ_p L_p
    sums: torch.Tensor             # [len(objective.sums)]: sums[0] = Σ_p L_p, the rest the objective's metrics
    token_grad: Optional[torch.Tensor] = None    # [T] a_t = ∂L/∂nll_t of a direct per-token term (ORPO), or None


def completion_sums(token_nll: torch.Tensor, weights: torch.Tensor, doc_index: torch.Tensor,
                    num_docs: int) -> torch.Tensor:
    """[3, num_docs] float64: per completion logp_d = −Σ w·nll, its loss tokens (w ≠ 0) and Σ w (positions with
    doc_index −1 add nothing)."""
    idx = doc_index.reshape(-1)
    inside = idx >= 0
    w = weights.reshape(-1).double()
    contrib = torch.stack([-w * token_nll.reshape(-1).double(), (w != 0).double(), w])
    contrib = torch.where(inside, contrib, 0.0)
    # Positions outside any completion go to a spare last slot (also valid when num_docs is 0).
    sums = torch.zeros(3, num_docs + 1, dtype=torch.float64, device=token_nll.device)
    return sums.index_add_(1, torch.where(inside, idx, num_docs), contrib)[:, :num_docs]


def completion_logps(token_nll: torch.Tensor, weights: torch.Tensor, doc_index: torch.Tensor,
                     num_docs: int) -> torch.Tensor:
    """logp_d = −Σ_{t: doc_index_t = d} w_t·nll_t, float64 [num_docs]."""
    return completion_sums(token_nll, weights, doc_index, num_docs)[0]


def pair_inputs(mb) -> tuple:
    """(doc_index, doc_role, doc_pair, reference_logps) of a preference micro-batch (the loader's)."""
    if getattr(mb, "doc_index", None) is None:
        raise ValueError(f"rows {getattr(mb, 'rows', '?')}: not preference data (no completions)")
    return mb.doc_index, mb.doc_role, mb.doc_pair, mb.reference_logps


def check_preference_data(manifest: dict, path: str, objective: str) -> None:
    if manifest.get("task") != "preference":
        task = manifest.get("task", "sft")
        kind = "an SFT" if task == "sft" else f"a {task!r}"
        raise ValueError(f"{path} is {kind} dataset, but --objective {objective} needs a preference dataset "
                         f"(tools/pack_dataset.py --task preference)")


class PairHead:
    """The LM head's objective hook of a pair objective for one micro-batch (see the module docstring).
    ``terms(completions) -> PairTerms``; ``stats_type`` the HeadStats (sub)class it returns."""

    def __init__(self, terms, doc_index, doc_role, doc_pair, reference_logps, stats_type=HeadStats,
                 sequence_group=None):
        self.terms, self.stats_type, self.sequence_group = terms, stats_type, sequence_group
        self.doc_index, self.doc_role, self.doc_pair = doc_index, doc_role, doc_pair
        self.reference_logps = reference_logps

    def __call__(self, fused_loss, h, labels, weights, target_classes):
        num_docs = self.doc_role.shape[0]
        idx = self.doc_index.reshape(-1)
        with torch.no_grad():
            first = fused_loss(h, labels, weights, target_classes)
            # --sp: this rank holds a shard of each row; a completion's sums are its shards' added (one
            # all-reduce of [3, D]). The pair terms are then the same on every sp rank: counted on rank 0 only.
            sums = add_over_sequence(completion_sums(first.token_nll, weights, self.doc_index, num_docs),
                                     self.sequence_group)
            done = Completions(*sums, self.doc_role, self.doc_pair,
                               num_docs // 2,      # every pair is whole in its row (the packer's contract)
                               self.reference_logps.double(), first.token_nll.reshape(-1).double(),
                               weights.reshape(-1).double(), idx, self.sequence_group)
            terms = self.terms(done)
            if self.sequence_group is not None and dist.get_rank(self.sequence_group) > 0:
                terms = terms._replace(sums=torch.zeros_like(terms.sums))
            # w'_t = −∂L/∂logp_{d(t)}·w_t (+ a_t): then ∇Σ w'·nll = Σ_d ∂L/∂logp_d·∇logp_d (+ Σ a_t·∇nll_t).
            # Positions outside any completion read a spare trailing 0 (also valid when there are none).
            grad = terms.dloss_dlogp
            coefficient = torch.cat([-grad, grad.new_zeros(1)])[torch.where(idx >= 0, idx, num_docs)]
            token_weights = coefficient * done.weights
            if terms.token_grad is not None:
                token_weights = token_weights + terms.token_grad
        if not torch.is_grad_enabled():      # evaluation: no gradient, so no second pass
            return self.stats_type(torch.zeros((), dtype=h.dtype, device=h.device), first.class_nll_sum,
                                   first.class_count, terms.sums)
        second = fused_loss(h, labels, token_weights.to(weights.dtype), target_classes)
        return self.stats_type(second.weighted_sum, second.class_nll_sum, second.class_count, terms.sums)


class PairObjective(Objective):
    """Base of the preference-pair objectives: preference data, divided by the global batch's pair count
    (``StepBatch.denominators["pairs"]``, counted by the loader before the forward pass), the head hook
    ``PairHead``. A subclass sets ``name``, ``sums`` (sums[0] the loss, and a "pairs" count among them is
    what evaluation divides by) and writes ``pair_terms``; ``uses_reference`` when it needs the precomputed
    reference log-probs (objectives/reference.py)."""

    data_task = "preference"
    flags: ClassVar[dict] = {"pairs_per_step": "--pairs-per-step"}
    uses_reference: ClassVar[bool] = False
    stats_type: ClassVar[type] = HeadStats
    sequence_group = None      # set by the Trainer under --sp (the group its completions' sums are added over)

    def pair_terms(self, completions: Completions) -> PairTerms:
        raise NotImplementedError

    def check_data(self, manifest: dict, path: str, table, cfg, flag: str = "--data") -> None:
        check_preference_data(manifest, f"{flag} {path}", self.name)

    def denominator(self, normalization: str) -> str:
        return "pairs"

    def inputs(self, mb) -> tuple:
        return pair_inputs(mb)

    def head(self, *inputs) -> PairHead:
        return PairHead(self.pair_terms, *inputs, stats_type=self.stats_type, sequence_group=self.sequence_group)

    def console(self, record: dict) -> str:
        return ""

    def startup_line(self, weights: str, normalization: str) -> str:
        return (f"objective: {self.describe()}, divided by the pairs of each global batch; completion log-probs "
                f"under class weights {weights}")


__all__ = ["Completions", "PairTerms", "PairHead", "PairObjective", "completion_sums", "completion_logps",
           "pair_inputs", "check_preference_data"]
