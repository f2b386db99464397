"""Precomputed reference log-probs for pair objectives that need them (DPO): the reference pass's head hook, the
reference model's fingerprint, and the check that a dataset's log-probs can serve a run
(docs/objective.md#dpo; tools/precompute_reference.py computes them, ``Trainer.forward_only`` runs the pass).

A reference log-prob is logp_d = Σ_{t∈d} w_t·log p_t of the reference model, from the same fused kernel and
class weights as the policy's (objectives/pairs.py), stored with the packed data.
"""
from __future__ import annotations

import hashlib
import os
import struct
from typing import NamedTuple, Optional

import torch

from witscale.training.objectives.pairs import (add_over_sequence, check_preference_data, completion_logps,
                                               pair_inputs)


class CompletionLogps(NamedTuple):
    """``ReferenceLogps``'s output: ``weighted_sum`` (a zero, for the pipeline's loss slot) and the log-probs."""
    weighted_sum: torch.Tensor
    logps: torch.Tensor            # [D] float64


class ReferenceLogps:
    """The head's hook for the reference pass: one no-grad pass of the same fused kernel, each completion's
    Σ w·log p — exactly what a pair objective subtracts them from. Under --sp this rank holds a shard of each
    row: its per-completion sums are added over ``sequence_group`` (the training hook's ``add_over_sequence``),
    so every sp rank returns the whole rows' log-probs."""

    def __init__(self, doc_index, doc_role, *_ignored, sequence_group=None):
        self.doc_index, self.num_docs = doc_index, doc_role.shape[0]
        self.sequence_group = sequence_group

    def __call__(self, fused_loss, h, labels, weights, target_classes) -> CompletionLogps:
        with torch.no_grad():
            stats = fused_loss(h, labels, weights, target_classes)
            logps = completion_logps(stats.token_nll, weights, self.doc_index, self.num_docs)
            logps = add_over_sequence(logps, self.sequence_group)
        return CompletionLogps(torch.zeros((), dtype=h.dtype, device=h.device), logps)


class ReferencePass:
    """What ``Trainer.forward_only`` runs for tools/precompute_reference.py: the preference tensors of each
    micro-batch into ``ReferenceLogps`` (an objective's ``inputs``/``head`` pair, without a loss).
    ``sequence_group``: the run's sp group (``Topology.sp_group``; None at sp 1), as a pair objective's."""

    def __init__(self, sequence_group=None):
        self.sequence_group = sequence_group

    @staticmethod
    def inputs(mb) -> tuple:
        return pair_inputs(mb)

    def head(self, *inputs) -> ReferenceLogps:
        return ReferenceLogps(*inputs, sequence_group=self.sequence_group)


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
                    policy_model: Optional[str] = None, objective: str = "dpo") -> None:
    """Refuse (ValueError, one line) preference data whose reference log-probs cannot serve this run: they
    must come from ``reference_model`` when given, else from ``policy_model`` (DPO's usual start: the SFT
    model is both the initial policy and the reference), checked by fingerprint."""
    check_preference_data(manifest, data_path, objective)
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


__all__ = ["CompletionLogps", "ReferenceLogps", "ReferencePass", "reference_fingerprint", "weight_table_record",
           "check_reference"]
