"""Learnable token weights: class weights λ tuned online by a first-order validation hypergradient
(``--learn-weights``; docs/objective.md#learned-weights).

The training loss is L_tr(θ; λ) = Σ_c λ_c S_c(θ) / D (S_c: the summed, explicitly weighted NLL of class-group c
over the global batch; D the normalization's count, independent of λ under ``nonzero`` and ``tokens`` while every
learned λ stays > 0). One step θ⁺ = θ − η ∇L_tr moves the validation loss by

    h_c = ∂L_val(θ⁺)/∂λ_c ≈ −(η / D) · ⟨∇L_val(θ), P ∇S_c(θ)⟩        (P = identity: see below)

Every K steps, before the step: one forward+backward of a validation micro-batch (the same rows on every rank)
for ∇L_val, and one per learned group on this rank's first training micro-batch of the step for ∇S_c^mb, scaled
by the number of micro-batches in the global batch (dp × grad_accum) to estimate the global ∇S_c. The gradients
are taken with ``torch.autograd.grad`` on the module's parameters, outside ``engine.backward``: no ``.grad`` is
written and no DeepSpeed hook runs, so the step's own accumulation is untouched. Dot products are local: TP
shards (``tensor_model_parallel``) summed over the TP group, replicated parameters (identical on every TP rank)
counted once; the scalars are averaged over the data-parallel ranks — no gradient all-reduce. Then
λ_c ← clamp(λ_c · exp(−α ĥ_c)), ĥ = h / RMS(h) (an Adam-like bias-corrected running RMS per group, so α is
scale-free). The new λ goes into the loader's weight table (the table ``row_targets`` applies on the host), so
it weights the next step's batch: no recompilation, no device sync per micro-batch (one host read per K steps).

P is the identity (plain gradient descent): Adam's 1/(√v+ε) is not readable under ZeRO-1/2 (partitioned flat
buffers), and the RMS normalization removes the overall scale anyway. Needs whole parameters on each rank:
ZeRO-0/1/2 (± tp). ZeRO-3 (partitioned parameters) and pp (gradients through the pipeline schedule) are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from witscale.data.classes import CLASS_NAMES, NUM_CLASSES, PROMPT_SIDE, RESPONSE_SIDE, TokenClass, class_from_name
from witscale.data.weighting import parse_class_weights

LEARNABLE_NORMALIZATIONS = ("nonzero", "tokens")     # D independent of λ (weight_sum: D = Σ λ_c n_c)
RMS_DECAY = 0.9


@dataclass(frozen=True)
class WeightGroup:
    name: str
    classes: tuple


def parse_learn_classes(spec: str) -> list[WeightGroup]:
    """'' → one group, the prompt side (the response side is the fixed reference); 'prompt,system' → each class
    its own group (every class not named stays fixed)."""
    if not (spec or "").strip():
        return [WeightGroup("prompt_side", tuple(int(c) for c in PROMPT_SIDE))]
    groups, seen = [], set()
    for name in filter(None, (p.strip() for p in spec.split(","))):
        try:
            cls = class_from_name(name)
        except ValueError as e:
            raise ValueError(f"--learn-classes: {e}") from None
        if cls == TokenClass.PAD or int(cls) in seen:
            raise ValueError(f"--learn-classes: {name!r} " + ("is padding (never predicted)" if cls == TokenClass.PAD
                                                               else "is named twice"))
        seen.add(int(cls))
        groups.append(WeightGroup(CLASS_NAMES[int(cls)], (int(cls),)))
    return groups


def validation_table(spec: str) -> np.ndarray:
    """--weights-objective 'response=1,eot=1' (classes not named: 0); '' → the response side's NLL."""
    table = np.zeros(NUM_CLASSES, dtype=np.float32)
    if not (spec or "").strip():
        table[[int(c) for c in RESPONSE_SIDE]] = 1.0
        return table
    try:
        for cls, w in parse_class_weights(spec).items():
            table[int(cls)] = w
    except ValueError as e:
        raise ValueError(str(e).replace("--class-weights", "--weights-objective")) from None
    if not table.any():
        raise ValueError(f"--weights-objective {spec!r} weights no class")
    return table


def check_layout(zero_stage: int, pp: int, normalization: str, sp: int = 1) -> None:
    """One line naming what is missing, or None."""
    if sp > 1:
        raise ValueError("--learn-weights does not support --sp > 1: the hypergradient's micro-batches are not "
                         "sequence-sharded yet (not implemented)")
    if pp > 1:
        raise ValueError("--learn-weights does not support --pp > 1: the hypergradient's extra backward passes "
                         "would need their own pipeline schedule (not implemented)")
    if zero_stage == 3:
        raise ValueError("--learn-weights does not support ZeRO-3: its local dot products need whole parameters "
                         "on each rank (ZeRO-0/1/2 have them; ZeRO-3 partitions them)")
    if normalization not in LEARNABLE_NORMALIZATIONS:
        raise ValueError(f"--learn-weights needs --normalization {' or '.join(LEARNABLE_NORMALIZATIONS)}: under "
                         f"{normalization} the denominator depends on λ (not modelled)")


class WeightLearner:
    """λ per learned group, its running RMS, and the update every ``every`` steps."""

    def __init__(self, groups: list[WeightGroup], table: np.ndarray, val_table: np.ndarray, val_loader, *,
                 every: int = 10, lr: float = 0.1, bounds: tuple = (1e-3, 10.0)):
        self.groups, self.every, self.lr = groups, int(every), float(lr)
        self.low, self.high = float(bounds[0]), float(bounds[1])
        if not (0 < self.low <= self.high and math.isfinite(self.high)):
            raise ValueError(f"--weights-bounds {self.low:g} {self.high:g}: need 0 < low <= high < inf")
        start = []
        for g in groups:
            values = {float(table[c]) for c in g.classes}
            if len(values) > 1:
                raise ValueError(f"--learn-weights: the classes of group {g.name} start at different weights "
                                 f"({sorted(values)}); give them one weight")
            start.append(min(max(values.pop(), self.low), self.high))   # 0 → the lower bound: log-space needs > 0
        self.lam = np.array(start, dtype=np.float64)
        self.rms_sq = np.zeros(len(groups), dtype=np.float64)
        self.updates = 0
        self.last_h: Optional[np.ndarray] = None
        self.val_table = np.asarray(val_table, dtype=np.float32)
        self.val_loader = val_loader

    # --- the table the loader applies -------------------------------------------------------------
    def apply(self, table: np.ndarray) -> np.ndarray:
        out = np.array(table, dtype=np.float32)
        for g, lam in zip(self.groups, self.lam):
            out[list(g.classes)] = lam
        return out

    def due(self, step: int) -> bool:
        """Is the (1-based) step about to run one that measures the hypergradient?"""
        return (step - 1) % self.every == 0

    def metrics(self) -> dict:
        return {f"lambda_{g.name}": float(lam) for g, lam in zip(self.groups, self.lam)}

    # --- the hypergradient --------------------------------------------------------------------------
    def val_micro_batch(self):
        """The validation rows of this update: the same on every rank, cycling through the eval set."""
        ld = self.val_loader
        n, m = len(ld.dataset), ld.micro_batch_size
        rows = [(self.updates * m + i) % n for i in range(m)]
        return ld.make_micro_batch(rows)

    def hypergradient(self, module, train_mb, val_mb, *, eta: float, denominator: float, per_step: int,
                      topo) -> np.ndarray:
        """h_c for each learned group (host float64 [G]); train_mb/val_mb on the module's device, train_mb
        weighted with the current λ. Collective over the TP and data-parallel groups."""
        params = [p for p in module.parameters() if p.requires_grad]
        sharded = [bool(getattr(p, "tensor_model_parallel", False)) for p in params]
        device = train_mb.labels.device
        val_w = torch.as_tensor(self.val_table, device=device)[val_mb.target_classes]
        val_w = torch.where(val_mb.labels == -100, torch.zeros_like(val_w), val_w)
        g_val = _grads(module, val_mb, val_w, params)
        count = (val_w > 0).sum().clamp_min(1).to(torch.float64)       # the val loss is a mean over its tokens
        dots = torch.zeros(2, len(self.groups), dtype=torch.float64, device=device)   # [sharded, replicated]
        for i, (g, lam) in enumerate(zip(self.groups, self.lam)):
            member = torch.zeros(NUM_CLASSES, dtype=torch.bool, device=device)
            member[list(g.classes)] = True
            # the batch's weights are λ_c × explicit: S_c's are the explicit weights of the group's tokens
            w = torch.where(member[train_mb.target_classes], train_mb.weights / float(lam),
                            torch.zeros_like(train_mb.weights))
            for gv, gs, sh in zip(g_val, _grads(module, train_mb, w, params), sharded):
                if gv is not None and gs is not None:
                    dots[0 if sh else 1, i] += (gv.double() * gs.double()).sum()
        tp_group = topo.tp_group_or_none()
        if tp_group is not None:
            dist.all_reduce(dots[0], group=tp_group)
        total = (dots[0] + dots[1]) / count
        if topo.dp > 1:
            dist.all_reduce(total, group=topo.get_data_parallel_group())
            total /= topo.dp
        total = total.cpu().numpy()          # the one host read, once per K steps
        return -(eta / denominator) * per_step * total if denominator > 0 else np.zeros_like(total)

    def update(self, h: np.ndarray) -> None:
        """λ ← clamp(λ · exp(−α ĥ)), ĥ = h / its bias-corrected running RMS. A non-finite h is skipped, and so
        is an all-zero one (η = 0 at the warm-up's start, or no learned token in the micro-batch): it says nothing
        and would only dilute the RMS."""
        h = np.asarray(h, dtype=np.float64)
        self.last_h = h
        if not np.isfinite(h).all() or not h.any():
            return
        self.updates += 1
        self.rms_sq = RMS_DECAY * self.rms_sq + (1 - RMS_DECAY) * h * h
        rms = np.sqrt(self.rms_sq / (1 - RMS_DECAY ** self.updates))
        h_hat = np.divide(h, rms, out=np.zeros_like(h), where=rms > 0)
        self.lam = np.clip(self.lam * np.exp(-self.lr * h_hat), self.low, self.high)

    # --- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # floats through JSON round-trip exactly (repr): resume is bit-exact
        return {"groups": [g.name for g in self.groups], "lambda": [float(x) for x in self.lam],
                "rms_sq": [float(x) for x in self.rms_sq], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        names = [g.name for g in self.groups]
        if state.get("groups") != names:
            raise ValueError(f"the checkpoint learned weights of {state.get('groups')}, this run learns {names} "
                             "(--learn-classes)")
        self.lam = np.array(state["lambda"], dtype=np.float64)
        self.rms_sq = np.array(state["rms_sq"], dtype=np.float64)
        self.updates = int(state["updates"])


def _grads(module, mb, weights: torch.Tensor, params: list) -> tuple:
    """∇_θ Σ weights·nll of one micro-batch by ``torch.autograd.grad``: nothing written to ``.grad``."""
    stats = module(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.labels, weights,
                   mb.target_classes)
    return torch.autograd.grad(stats.weighted_sum, params, allow_unused=True)
