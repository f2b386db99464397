"""One optimizer step on a DeepSpeed engine, with the global-batch loss normalization; evaluation.

``Trainer`` serves every layout. It wraps the (already built, under ZeRO-3 already partitioned) module in
a DeepSpeed engine with AdamW and the warm-up + cosine schedule, and talks to it through one of two small
adapters that know how that engine runs a step:
- ``_DenseEngine``: ZeRO 0–3 (± tensor parallelism): forward, backward and step per micro-batch;
- ``_PipelineEngine``: DeepSpeed's PipelineEngine (--pp > 1): one ``train_batch`` per optimizer step
  through its 1F1B schedule; the loss statistics exist on the last stage and are broadcast to the others.
The loop (checkpoints, preemption, metrics) is ``witscale.train.train_loop``.

Normalization. The objective is Σ_{global batch} w·nll / N, N the global batch's denominator for the
chosen normalization (docs/objective.md#normalizations). DeepSpeed *averages* gradients over the
data-parallel ranks (dp × sp under --sp: each sp rank's loss covers its 1/sp of the rows), so the dense
engine's micro-batch loss is ``weighted_sum × dp × sp / N`` and ``backward`` is called with
``scale_wrt_gas=False`` (DeepSpeed would otherwise divide by grad_accum as well); the pipeline engine
always divides by grad_accum, so its loss is ``weighted_sum × dp × grad_accum / N``. The result is the same
gradient whatever dp, grad_accum, pp or ZeRO stage — tested as equivalences.

Devices. The engine decides the device (``engine.device``: the local GPU, or the CPU). Micro-batches are
moved there (pinned memory, non_blocking), every tensor handed to a collective lives there (NCCL takes
device tensors, gloo host tensors — the engine's device is right for both), and the step's statistics
stay there until they cross to the host once per optimizer step.

The objective (``objective=``, witscale/training/objectives, docs/objective.md#adding-an-objective) is asked,
never named: each micro-batch's forward gets ``objective.head(*objective.inputs(mb))`` as the LM head's hook
(under pp its inputs travel with the labels), the step divides by the global count
``objective.denominator(normalization)`` names, and the step's vector carries the objective's ``sums`` beside
the per-class NLL — still one host transfer per step.

Gradient norm and clipping come from DeepSpeed (ZeRO-1/2/3 and its bf16 optimizer, pipeline-aware); in
fp32 ZeRO-0, where DeepSpeed measures none, from ``witscale.training.optim.GlobalNormClipping``. Each of them
skips an update whose norm is not finite; ``train_step`` reports such a step (``StepResult.nonfinite``,
``update_skipped``) from the values that cross to the host anyway, and ``witscale/training/guard.py`` decides
what the run does (docs/checkpoints.md#non-finite-steps). A checkpoint is written only of finite weights.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from witscale.data.classes import CLASS_NAMES, NUM_CLASSES, PROMPT_SIDE, RESPONSE_SIDE
from witscale.data.loader import MicroBatch, PackedLoader, ShardCounts, StepBatch
from witscale.data.weighting import NORMALIZATIONS, denominators_of
from witscale.training import checkpoint
from witscale.training.ds_config import zero_stage
from witscale.training.objectives import Objective, default_objective
from witscale.training.faults import nonfinite_weight
from witscale.training.guard import NonFiniteError
from witscale.training.optim import GlobalNormClipping, cosine_with_warmup, param_groups
from witscale.training.peak_flops import device_peak_flops
from witscale.model.shape import ModelShape
from witscale.model.state import dense_state_dict

log = logging.getLogger("witscale")


@dataclass
class StepResult:
    step: int
    loss: float
    prompt_nll: float
    response_nll: float
    lr: float
    grad_norm: Optional[float]
    tokens: int
    tokens_per_s: float
    packing_efficiency: float
    denominator: float
    epoch: int
    mfu: Optional[float] = None
    peak_memory_gib: Optional[float] = None     # this rank's peak GPU memory so far (CUDA only)
    class_nll: dict = field(default_factory=dict)   # mean NLL per token class present in the batch
    objective_metrics: dict = field(default_factory=dict)   # the objective's metrics (Objective.metrics)
    # The non-finite guard (witscale/training/guard.py): a NaN/inf loss or gradient norm, and whether the
    # optimizer skipped the update (DeepSpeed's overflow; GlobalNormClipping in fp32 ZeRO-0).
    nonfinite: bool = False
    update_skipped: bool = False
    raw_grad_norm: Optional[float] = None           # as measured (``grad_norm`` hides a NaN)
    learned_weights: dict = field(default_factory=dict)   # --learn-weights: λ per learned group (lambda_<name>)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()
               if k not in ("class_nll", "objective_metrics", "raw_grad_norm", "nonfinite", "update_skipped",
                            "learned_weights")}
        if self.nonfinite:
            out.update(nonfinite=True, update_skipped=self.update_skipped)
        out.update({f"nll_{name}": v for name, v in self.class_nll.items()})
        out.update(self.objective_metrics)
        out.update(self.learned_weights)
        return out


# --- the step's statistics: one float64 vector, summed on the device -----------------------------------
# [loss numerator, class_nll_sum[0..C), class_count[0..C)] (+ the objective's other sums, sums[1:]);
# evaluation appends the three denominators. The numerator is the objective's sums[0] (e.g. Σ_pairs L), or
# the kernel's Σ w·nll for an objective without sums: loss = it / the step's denominator.
STATS_SIZE = 1 + 2 * NUM_CLASSES


def stats_size(sums: tuple) -> int:
    """The step vector's length for an objective with these ``sums``."""
    return STATS_SIZE + max(0, len(sums) - 1)


def stats_vector(stats) -> torch.Tensor:
    """One micro-batch's ``LossStats`` or ``HeadStats`` as the float64 vector the step sums (on the stats'
    device). With ``sums`` the first entry is sums[0], not the (possibly surrogate) value backpropagated."""
    sums = getattr(stats, "sums", None)
    first = stats.weighted_sum.detach().double().reshape(1) if sums is None or not len(sums) else sums[:1].double()
    parts = [first, stats.class_nll_sum.double(), stats.class_count.double()]
    if sums is not None and len(sums) > 1:
        parts.append(sums[1:].double())
    return torch.cat(parts)


@dataclass
class StepSums:
    """The global batch's sums, on the host: from the vector [loss numerator, class_nll_sum[C], class_count[C]]
    (+ the objective's other sums, + the denominators of NORMALIZATIONS for evaluation) that the engines sum on
    the device."""
    weighted_sum: float                  # the loss numerator
    class_nll_sum: np.ndarray
    class_count: np.ndarray
    denominators: Optional[dict] = None
    objective_sums: dict = field(default_factory=dict)      # the objective's ``sums`` → global sum

    @classmethod
    def from_vector(cls, totals: torch.Tensor, sums: tuple = ()) -> "StepSums":
        t = totals.double().cpu().numpy()          # the step's one device→host crossing
        extra = t[STATS_SIZE:]
        own = max(0, len(sums) - 1)
        objective_sums = dict(zip(sums, map(float, [t[0], *extra[:own]]))) if sums else {}
        extra = extra[own:]
        return cls(float(t[0]), t[1:1 + NUM_CLASSES], t[1 + NUM_CLASSES:STATS_SIZE],
                   dict(zip(NORMALIZATIONS, map(float, extra))) if len(extra) else None, objective_sums)

    def per_class(self) -> dict[str, float]:
        """Mean NLL of each class that has predicted tokens, by class name."""
        return {CLASS_NAMES[c]: float(self.class_nll_sum[c] / self.class_count[c])
                for c in range(NUM_CLASSES) if self.class_count[c] > 0}

    def mean_nll(self, classes) -> float:
        idx = [int(c) for c in classes]
        n = float(self.class_count[idx].sum())
        return float(self.class_nll_sum[idx].sum()) / n if n > 0 else float("nan")


def sequence_shard_micro_batch(mb: MicroBatch, topo) -> MicroBatch:
    """Under --sp: this rank's contiguous 1/sp of every row of ``mb``. The per-token targets, weights and
    positions were computed on the whole rows (the loader's), so labels are shifted before the cut — the token
    after a cut is predicted by the rank before it — and positions are per document; ``cu_seqlens`` and
    ``max_seqlen`` stay the whole rows' (attention runs on whole rows: witscale/parallel/sequence.py)."""
    sp = getattr(topo, "sp", 1)
    if mb.sequence_shard is not None:       # read already cut by the loader (PackedLoader(sp_size=…))
        if mb.sequence_shard != (getattr(topo, "sp_rank", 0), sp):
            raise ValueError(f"a micro-batch cut for sp rank {mb.sequence_shard[0]} of {mb.sequence_shard[1]} on "
                             f"sp rank {getattr(topo, 'sp_rank', 0)} of {sp}")
        return mb
    if sp == 1:
        return mb
    from dataclasses import replace

    from witscale.parallel.sequence import sequence_shard
    # doc_index is per position too (a pair objective's completions: its hook adds their sums over sp).
    names = ("input_ids", "labels", "weights", "target_classes", "position_ids") + (
        ("doc_index",) if mb.doc_index is not None else ())
    cut = {name: sequence_shard(getattr(mb, name), sp, topo.sp_rank) for name in names}
    return replace(mb, **cut)


# --- the two engines ---------------------------------------------------------------------------------
class _DenseEngine:
    """ZeRO 0–3 (± TP): DeepSpeed's engine runs forward, backward and step per micro-batch."""

    def __init__(self, engine, topo, objective: Objective):
        self.engine, self.topo, self.objective = engine, topo, objective
        self.size = stats_size(objective.sums)

    def loss_scale(self, denominator: float, grad_accum: int) -> float:
        # DeepSpeed averages over dp × sp (the sp ranks' partial gradients: parallel/topology.py says why).
        return self.topo.dp * getattr(self.topo, "sp", 1) / denominator if denominator > 0 else 0.0

    def _forward(self, mb: MicroBatch, objective=None):
        objective = objective or self.objective
        mb = sequence_shard_micro_batch(mb, self.topo)
        return self.engine(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.labels, mb.weights,
                           mb.target_classes, objective=objective.head(*objective.inputs(mb)))

    def train(self, micro_batches: list[MicroBatch], scale: float, device) -> torch.Tensor:
        totals = torch.zeros(self.size, dtype=torch.float64, device=device)
        for mb in micro_batches:
            stats = self._forward(mb)
            self.engine.backward(stats.weighted_sum * scale, scale_wrt_gas=False)
            self.engine.step()
            totals += stats_vector(stats)
        return self._sum_over_dp(totals)

    def score(self, micro_batches: list[MicroBatch], extra: torch.Tensor, progress=None) -> torch.Tensor:
        totals = torch.zeros(self.size, dtype=torch.float64, device=extra.device)
        for i, mb in enumerate(micro_batches):
            totals += stats_vector(self._forward(mb))
            if progress is not None:
                progress(i + 1, len(micro_batches))     # a count only: no host sync
        if getattr(self.topo, "sp_rank", 0):
            extra = torch.zeros_like(extra)             # the sp peers counted the same whole rows: once
        return self._sum_over_dp(torch.cat([totals, extra]))

    def forward_only(self, micro_batches: list[MicroBatch], probe) -> list:
        return [self._forward(mb, probe) for mb in micro_batches]

    def _sum_over_dp(self, totals: torch.Tensor) -> torch.Tensor:
        # Summed over the data-parallel replicas and the sp ranks (each holds its shard's sums: dp × sp is the
        # dp group at sp = 1); TP peers hold identical numbers.
        dist.all_reduce(totals, group=self.topo.get_sequence_data_parallel_group())
        return totals


class _PipelineEngine:
    """DeepSpeed's PipelineEngine: one ``train_batch`` (1F1B) per optimizer step."""

    def __init__(self, engine, topo, loss_fn, objective: Objective):
        self.engine, self.topo, self.loss_fn = engine, topo, loss_fn
        self.size = stats_size(objective.sums)
        self.objective = objective
        loss_fn.make_objective = objective.head        # on the last stage, from the inputs in the labels tuple

    def loss_scale(self, denominator: float, grad_accum: int) -> float:
        return self.topo.dp * grad_accum / denominator if denominator > 0 else 0.0

    def _item(self, mb: MicroBatch, scale: float, objective=None):
        from witscale.model.pipeline import pipe_inputs
        labels = (mb.labels, mb.weights, mb.target_classes,
                  torch.tensor(scale, dtype=torch.float64, device=mb.labels.device))
        labels += tuple((objective or self.objective).inputs(mb))    # straight to the last stage, with the labels
        return pipe_inputs(mb), labels

    def train(self, micro_batches: list[MicroBatch], scale: float, device) -> torch.Tensor:
        self.loss_fn.records = []
        self.engine.train_batch(iter([self._item(mb, scale) for mb in micro_batches]))
        return self._stage_totals(self.loss_fn.pop_stats(), torch.zeros(0, dtype=torch.float64, device=device))

    def score(self, micro_batches: list[MicroBatch], extra: torch.Tensor, progress=None) -> torch.Tensor:
        self.loss_fn.records = []
        self.engine.eval_batch(iter([self._item(mb, 1.0) for mb in micro_batches]), compute_loss=True,
                               reduce_output=None, bcast_loss=False, num_micro_batches=len(micro_batches))
        if progress is not None:        # one pipeline schedule: done at once
            progress(len(micro_batches), len(micro_batches))
        records = self.loss_fn.pop_stats() if self.engine.is_last_stage() else []
        # The denominators are known on every stage; only the last stage's count is kept (no double sum).
        return self._stage_totals(records, extra if self.engine.is_last_stage() else torch.zeros_like(extra))

    def forward_only(self, micro_batches: list[MicroBatch], probe) -> list:
        """The last stage's per-micro-batch hook outputs (the other stages: None each)."""
        saved, self.loss_fn.make_objective = self.loss_fn.make_objective, probe.head
        try:
            self.loss_fn.records = []
            self.engine.eval_batch(iter([self._item(mb, 1.0, probe) for mb in micro_batches]),
                                   compute_loss=True, reduce_output=None, bcast_loss=False,
                                   num_micro_batches=len(micro_batches))
            records = self.loss_fn.pop_stats() if self.engine.is_last_stage() else []
        finally:
            self.loss_fn.make_objective = saved
        return records if records else [None] * len(micro_batches)

    def _stage_totals(self, records, extra: torch.Tensor) -> torch.Tensor:
        """The global batch's sums on every rank: the last stage sums its micro-batches and its dp
        replicas; the other stages receive that by a broadcast over the pipeline group."""
        totals = torch.zeros(self.size, dtype=torch.float64, device=extra.device)
        for stats in records:
            totals += stats_vector(stats)
        totals = torch.cat([totals, extra])
        if self.engine.is_last_stage():
            dist.all_reduce(totals, group=self.topo.get_data_parallel_group())
        last = self.topo.dims.rank_of(self.topo.pp - 1, self.topo.dp_rank, self.topo.tp_rank)
        dist.broadcast(totals, src=last, group=self.topo.get_pipeline_model_parallel_group())
        return totals


def check_sequence_parallel_objective(objective: Objective, sp: int, sequence_group=None) -> None:
    """--sp shards rows: an objective with a head hook (``sums``) sees a shard of each row. The pair objectives
    (objectives/pairs.py) add their per-completion sums over ``sequence_group``; any other is refused."""
    if sp > 1 and objective.sums:
        if not hasattr(objective, "sequence_group"):
            raise ValueError(f"--sp {sp} cannot train --objective {objective.name}: its head's sums would need "
                             "adding across the sequence-parallel ranks first (not built); use --sp 1")
        objective.sequence_group = sequence_group


# --- the trainer ---------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, *, module: torch.nn.Module, ds_config: dict, loader: PackedLoader, topo,
                 normalization: str, lr: float, weight_decay: float, betas, eps: float,
                 total_steps: int, warmup_ratio: float, activation_checkpointing: bool = False,
                 objective: Optional[Objective] = None, optimizer_state: bool = True,
                 peak_tflops: Optional[float] = None, weight_learner=None):
        """objective: the run's (witscale/training/objectives; default: ``default_objective()``).
        peak_tflops: the GPU's dense bf16 peak for MFU (default: witscale/training/peak_flops.py's table).
        optimizer_state=False: an engine for forward passes only (tools/precompute_reference.py) — no
        optimizer, so ZeRO allocates no fp32 master copy, gradient partitions or Adam moments (at 70B under
        ZeRO-3 on 64 GPUs ≈14 GiB per GPU the pass does not need); ``train_step`` is then refused.
        weight_learner: a ``learned_weights.WeightLearner`` (--learn-weights): the class weights the loader applies
        are tuned every K steps by a validation hypergradient (docs/objective.md#learned-weights)."""
        import deepspeed

        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r} (known: {', '.join(NORMALIZATIONS)})")
        self.topo = topo
        self.loader = loader
        self.peak_flops = device_peak_flops(peak_tflops)     # None: no MFU (CPU, or a card not in the table)
        self.normalization = normalization
        self.objective = objective if objective is not None else default_objective()
        self.objective.check()
        check_sequence_parallel_objective(self.objective, getattr(topo, "sp", 1), getattr(topo, "sp_group", None))
        self.total_steps = total_steps
        pipelined = topo.pp > 1
        config = dict(ds_config)
        if pipelined:
            from witscale.model.pipeline import pipeline_ds_config
            config = pipeline_ds_config(ds_config, activation_checkpointing)
        self.grad_accum = int(config["gradient_accumulation_steps"])
        self.zero_stage = zero_stage(config)
        self.weight_learner = weight_learner
        if weight_learner is not None:
            from witscale.training.learned_weights import check_layout
            check_layout(self.zero_stage, topo.pp, normalization)
            loader.table = weight_learner.apply(loader.table)
        bf16 = bool((config.get("bf16") or {}).get("enabled"))

        self.trains = optimizer_state
        if not optimizer_state:
            config = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler", "gradient_clipping")}
            # ZeRO-1/2 partition only optimizer state and gradients (DeepSpeed refuses them without an
            # optimizer): the same forward as ZeRO-0. ZeRO-3 without an optimizer: DeepSpeed's parameter
            # coordinator alone, which gathers each layer for the forward as in training.
            if self.zero_stage in (1, 2):
                config["zero_optimization"] = dict(config.get("zero_optimization") or {}, stage=0)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=module, config=config, mpu=None if pipelined else topo)
            self._finish_init(module, topo, pipelined)
            return
        groups = param_groups(module, weight_decay)
        optimizer = None
        if "optimizer" not in config:
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps,
                                          fused=True if torch.cuda.is_available() else None)
        if self.zero_stage == 0 and not bf16:
            # fp32 ZeRO-0: DeepSpeed measures no norm, and clips wrongly under pp (GlobalNormClipping says why).
            if optimizer is None:
                optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps,
                                              fused=True if torch.cuda.is_available() else None)
                config.pop("optimizer")
                config["zero_allow_untested_optimizer"] = True
            optimizer = GlobalNormClipping(optimizer, float(config.get("gradient_clipping") or 0.0), topo)
            config["gradient_clipping"] = 0.0
        # The engine steps the schedule once per optimizer step (at the accumulation boundary). Under pp,
        # mpu is None: the PipelineModule brings its own grid (the same rank order as witscale's Topology).
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, mpu=None if pipelined else topo,
            model_parameters=None if optimizer is not None else groups,
            lr_scheduler=lambda opt: cosine_with_warmup(opt, total_steps, warmup_ratio))
        if dist.get_rank() == 0:    # which wrapper DeepSpeed chose (BF16_Optimizer at bf16 ZeRO-1); bench_gpu reads it
            log.info(f"DeepSpeed optimizer: {type(self.engine.optimizer).__name__} "
                     f"over {type(self.engine.basic_optimizer).__name__}")
        self._finish_init(module, topo, pipelined)

    def _finish_init(self, module, topo, pipelined: bool) -> None:
        self.device = torch.device(self.engine.device)
        self.runner = (_PipelineEngine(self.engine, topo, module.loss_fn, self.objective) if pipelined
                       else _DenseEngine(self.engine, topo, self.objective))
        self.step = 0
        self.skipped_nonfinite: list[int] = []     # steps whose non-finite update was skipped (guard.py)
        # MFU counts model FLOPs: 6 × matmul weights per token plus causal attention's per-document
        # term (ModelShape.training_flops), the same count as tools/bench/bench_gpu.py.
        self.shape = ModelShape.from_config(module.config)

    # --- one optimizer step ------------------------------------------------------------------------
    def train_step(self, batch: StepBatch) -> StepResult:
        if not self.trains:
            raise RuntimeError("this Trainer was built with optimizer_state=False (forward passes only)")
        t0 = time.perf_counter()
        if len(batch.micro_batches) != self.grad_accum:
            raise ValueError(f"the step has {len(batch.micro_batches)} micro-batches, the engine expects "
                             f"{self.grad_accum}")
        # Counted over the global batch before the forward pass (docs/objective.md#global-denominator).
        if batch.shard_counts is not None:
            batch = self._sum_shard_counts(batch)
        denominator = batch.denominators[self.objective.denominator(self.normalization)]
        # A global batch with nothing to learn from (e.g. all weights 0) gives a zero gradient, not NaN.
        scale = self.runner.loss_scale(denominator, self.grad_accum)
        lr = self.scheduler.get_last_lr()[0]
        micro_batches = [mb.to(self.device) for mb in batch.micro_batches]
        poison = nonfinite_weight(self.step + 1)       # test-only (witscale/training/faults.py)
        if poison is not None:
            first = micro_batches[0]
            first.weights = torch.where(first.weights != 0, torch.full_like(first.weights, poison), first.weights)
        if self.weight_learner is not None and self.weight_learner.due(self.step + 1):
            self._learn_weights(micro_batches[0], lr, denominator)
        skipped_before = self.engine.skipped_steps
        totals = self.runner.train(micro_batches, scale, self.device)
        sums = StepSums.from_vector(totals, self.objective.sums)
        grad_norm = self.engine.get_global_grad_norm()      # computed before the transfer: no new sync
        self.step += 1
        elapsed = time.perf_counter() - t0
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = float(grad_norm)
        # Equal on every rank (sums over dp, broadcast over pp; a global norm): every rank decides alike.
        nonfinite = not math.isfinite(sums.weighted_sum) or (grad_norm is not None and not math.isfinite(grad_norm))
        return StepResult(
            step=self.step,
            loss=sums.weighted_sum / denominator if denominator > 0 else 0.0,
            prompt_nll=sums.mean_nll(PROMPT_SIDE),
            response_nll=sums.mean_nll(RESPONSE_SIDE),
            lr=lr,
            grad_norm=None if grad_norm is None or math.isnan(grad_norm) else grad_norm,
            tokens=batch.global_real_tokens,
            tokens_per_s=batch.global_real_tokens / elapsed if elapsed > 0 else 0.0,
            packing_efficiency=batch.global_real_tokens / batch.global_capacity,
            denominator=denominator,
            epoch=batch.epoch,
            mfu=(self.shape.training_flops(batch.global_real_tokens, batch.global_sum_sq_doc_lengths) / elapsed
                 / (self.peak_flops * dist.get_world_size()) if self.peak_flops and elapsed > 0 else None),
            peak_memory_gib=(torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                             if self.device.type == "cuda" else None),
            class_nll=sums.per_class(),
            objective_metrics=self.objective.metrics(sums.objective_sums),
            nonfinite=nonfinite,
            update_skipped=self.engine.skipped_steps > skipped_before,
            raw_grad_norm=grad_norm,
            learned_weights=self.weight_learner.metrics() if self.weight_learner is not None else {},
        )

    def _learn_weights(self, train_mb: MicroBatch, lr: float, denominator: float) -> None:
        """--learn-weights: the hypergradient at this step's θ (before its update) from its first micro-batch,
        then λ's update into the loader's table — the next step's batch is weighted with it."""
        learner = self.weight_learner
        h = learner.hypergradient(self.engine.module, train_mb, learner.val_micro_batch().to(self.device), eta=lr,
                                  denominator=denominator, per_step=self.grad_accum * self.topo.dp, topo=self.topo)
        learner.update(h)
        self.loader.table = learner.apply(self.loader.table)

    def _sum_shard_counts(self, batch: StepBatch) -> StepBatch:
        """A loader that read only this sp rank's part of the rows counted only that part of the denominators:
        exact integers (loader.ShardCounts), summed over the sp group — one small all-reduce and one host
        transfer per optimizer step, before the forward pass."""
        return batch.with_shard_counts_summed(self._sum_over_sp(batch.shard_counts))

    def _sum_over_sp(self, counts: np.ndarray) -> np.ndarray:
        """``counts`` (int64, ShardCounts) summed over the sp group, on the host."""
        if getattr(self.topo, "sp", 1) == 1:
            return counts
        summed = torch.from_numpy(counts).to(self.device)
        dist.all_reduce(summed, group=self.topo.sp_group)
        return summed.cpu().numpy()

    # --- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_loader: "PackedLoader", progress=None) -> dict:
        """Weighted loss (the run's normalization) and per-class NLL over a whole packed eval set.
        ``progress(done, total)``, if given, is called as this rank's micro-batches are scored (a console bar).

        Rows are split over the data-parallel ranks; every rank runs the same number of forwards (ZeRO-3
        gathers and pipeline schedules are collective), scoring an all-masked micro-batch where it has run
        out of rows.
        """
        micro_batches, denominators = [], np.zeros(len(NORMALIZATIONS))
        parts = np.zeros(ShardCounts.SIZE, dtype=np.int64)     # a loader reading each sp rank's part of the rows
        for _, mb in self.rank_micro_batches(eval_loader):
            if mb.sequence_shard is not None:
                parts += ShardCounts.of(mb.labels.numpy(), mb.weights.numpy())
            else:
                counts = denominators_of(mb.labels.numpy(), mb.weights.numpy())
                denominators += [counts[k] for k in NORMALIZATIONS]
            micro_batches.append(mb.to(self.device))
        if getattr(eval_loader, "sp_size", 1) > 1:      # the parts summed over sp (one all-reduce): the whole rows' counts
            whole = ShardCounts.denominators(self._sum_over_sp(parts))
            denominators = np.array([whole[k] for k in NORMALIZATIONS])
        self.engine.eval()
        try:
            totals = self.runner.score(micro_batches, torch.tensor(denominators, dtype=torch.float64,
                                                                   device=self.device), progress=progress)
        finally:
            self.engine.train()
        sums = StepSums.from_vector(totals, self.objective.sums)
        denominator = {**sums.denominators, **sums.objective_sums}[self.objective.denominator(self.normalization)]
        return {"step": self.step,
                "eval_loss": sums.weighted_sum / denominator if denominator > 0 else float("nan"),
                "eval_prompt_nll": sums.mean_nll(PROMPT_SIDE),
                "eval_response_nll": sums.mean_nll(RESPONSE_SIDE),
                **{f"eval_nll_{name}": v for name, v in sums.per_class().items()},
                **self.objective.metrics(sums.objective_sums, prefix="eval_")}

    def rank_micro_batches(self, loader: "PackedLoader") -> list[tuple[np.ndarray, MicroBatch]]:
        """This rank's share of every row of ``loader``'s dataset, in order, as (rows, micro-batch on the host):
        contiguous shares over the data-parallel ranks; every rank gets the same number of micro-batches
        (ZeRO-3 gathers and pipeline schedules are collective), a rank out of rows an empty one (no rows, a
        micro-batch with nothing to predict: ``MicroBatch.without_targets``). Evaluation's row loop, and the
        reference pass's (tools/precompute_reference.py)."""
        rows = np.arange(len(loader.dataset))
        per_rank = int(math.ceil(len(rows) / self.topo.dp))
        mine = rows[self.topo.dp_rank * per_rank:(self.topo.dp_rank + 1) * per_rank]
        mbs = loader.micro_batch_size
        out = []
        for b in range(int(math.ceil(per_rank / mbs))):
            chunk = mine[b * mbs:(b + 1) * mbs]
            mb = loader.make_micro_batch(chunk if len(chunk) else rows[:1])
            out.append((chunk, mb if len(chunk) else mb.without_targets()))
        return out

    @torch.no_grad()
    def forward_only(self, micro_batches: list[MicroBatch], probe) -> list:
        """Each micro-batch's LM-head hook output, no grad, for a ``probe`` with an objective's ``inputs(mb)`` and
        ``head(*inputs)`` (e.g. objectives/reference.py's ``ReferencePass``: the reference log-probs). Collective
        like a forward (ZeRO-3 gathers, the pipeline schedule); under pp only the last stage has them (None on
        the others). Under --sp each rank's hook sees its shard of the rows: a probe adds its sums over
        ``topo.sp_group`` (``ReferencePass(topo.sp_group)``); one that does not say so is refused."""
        sp = getattr(self.topo, "sp", 1)
        if sp > 1 and getattr(probe, "sequence_group", None) is not self.topo.sp_group:
            raise ValueError(f"--sp {sp}: {type(probe).__name__} must add its sums over the sequence-parallel "
                             "group (sequence_group=topo.sp_group); it would return one shard's")
        self.engine.eval()
        try:
            return self.runner.forward_only([mb.to(self.device) for mb in micro_batches], probe)
        finally:
            self.engine.train()

    # --- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint needs besides DeepSpeed's own state: the step, the data position and the layout
        that wrote DeepSpeed's files."""
        return {"step": self.step, "loader": self.loader.state_dict(),
                "layout": {"dp": self.topo.dp, "tp": self.topo.tp, "pp": self.topo.pp,
                           **({"sp": self.topo.sp} if getattr(self.topo, "sp", 1) > 1 else {})},
                "skipped_nonfinite_steps": list(self.skipped_nonfinite),
                **({"learned_weights": self.weight_learner.state_dict()} if self.weight_learner is not None else {})}

    def load_state_dict(self, state: dict, *, data_position: bool = True) -> None:
        self.step = int(state["step"])
        self.skipped_nonfinite = [int(s) for s in state.get("skipped_nonfinite_steps") or []]
        if self.weight_learner is not None and state.get("learned_weights") is not None:
            self.weight_learner.load_state_dict(state["learned_weights"])
            self.loader.table = self.weight_learner.apply(self.loader.table)
        if data_position:
            self.loader.load_state_dict(state["loader"])

    def save_checkpoint(self, root: str, keep: int, **extra) -> str:
        """Collective: DeepSpeed's state, every rank's RNG, and ``state_dict()`` plus ``extra`` (fingerprints,
        the run's settings) committed last (witscale/training/checkpoint.py, docs/checkpoints.md). Weights that
        are not all finite are never saved (``NonFiniteError``); the state records ``finite: true``, which
        checkpoint retention reads."""
        if not self.weights_finite():
            raise NonFiniteError(f"step {self.step}: the weights hold non-finite values; not saving a checkpoint "
                                 "(the last checkpoint holds finite values)")
        return checkpoint.save(self.engine, root, self.step, {**self.state_dict(), "finite": True, **extra}, keep)

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Collective: are all of the model's weights finite on every rank? Each rank reads only what it holds
        (its ZeRO-3 partitions, its tp/pp shards) on its device; one all-reduce and one host read — at a save,
        not per step."""
        flags = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in self.engine.module.parameters()]
        ok = (torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=self.device))
        ok = ok.to(device=self.device, dtype=torch.int32).reshape(1)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def resume(self, spec: str, root: str, *, data_fingerprint: str, model_fingerprint: str,
               allow_data_change: bool = False) -> Optional[str]:
        """Collective: continue from ``spec`` ('auto' → ``root``/latest, or a checkpoint path). Returns the
        checkpoint's path, or None when 'auto' finds none. Every rank checks the checkpoint's files first and
        the ranks agree (``checkpoint.choose``): 'auto' falls back past a damaged checkpoint to the newest one
        that loads. A checkpoint of another model is refused, one of other data too unless
        ``allow_data_change`` (then the data position starts afresh), one of another pp too; one of another
        dp, sp or tp loads through DeepSpeed's universal checkpoint, made on the way (``checkpoint.universal_tag``)."""
        found = checkpoint.choose(spec, root, self.device)
        if found is None:
            return None
        where = os.path.join(*found)
        state = checkpoint.read_state(*found)
        checkpoint.check_fingerprints(state, data_fp=data_fingerprint, model_fp=model_fingerprint,
                                      allow_data_change=allow_data_change, where=where)
        if state.get("data_fingerprint") == data_fingerprint:
            self._check_global_batch(state, where)
        if state.get("learned_weights") is not None and self.weight_learner is None:
            raise checkpoint.CheckpointError(
                f"{where} learned its class weights (--learn-weights); without --learn-weights this run would "
                "train on the flags' weights instead: resume with --learn-weights and the same --learn-classes")
        zero_stage = self.engine.zero_optimization_stage()
        other = checkpoint.layout_change(state, self.state_dict()["layout"], where=where, zero_stage=zero_stage)
        universal = other and zero_stage > 0          # ZeRO-0: the whole optimizer state is in the mp files
        if other and self.topo.rank == 0:     # every rank sees the same change: one line, not one per rank
            saved, mine = state["layout"], self.state_dict()["layout"]
            log.warning(f"{where} was written at {checkpoint.layout_text(saved, mine)}, this run has "
                        f"{checkpoint.layout_text(mine, saved)}"
                        + (": loading it through DeepSpeed's universal checkpoint" if universal
                           else " (ZeRO-0: DeepSpeed's files hold the whole optimizer state)"))
        state = checkpoint.load(self.engine, *found, universal=universal, topo=self.topo)
        self.load_state_dict(state, data_position=state.get("data_fingerprint") == data_fingerprint)
        return where

    def _check_global_batch(self, state: dict, where: str) -> None:
        """The data position is kept in global rows per step (micro × accum × dp), which must not change: a job
        requeued on fewer ranks keeps its global batch (and so its optimization) by a larger --grad-accum.
        Refused before anything loads, in one line that says which --grad-accum keeps it."""
        saved = (state.get("loader") or {}).get("global_rows")
        ld = self.loader
        if saved is None or int(saved) == ld.global_rows:
            return
        per = ld.micro_batch_size * ld.dp_size
        hint = (f"pass --grad-accum {int(saved) // per} to keep it" if int(saved) % per == 0 else
                f"no --grad-accum keeps it at micro-batch {ld.micro_batch_size} × dp {ld.dp_size}")
        raise checkpoint.CheckpointError(
            f"{where} was trained with {saved} rows per step; this run takes {ld.global_rows} (micro-batch "
            f"{ld.micro_batch_size} × grad-accum {ld.grad_accum} × dp {ld.dp_size}): {hint}")

    # --- inspection (tests, export) ----------------------------------------------------------------
    def full_dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Dense HF-named fp32 tensors of the whole model on the host (collective over all ranks)."""
        return dense_state_dict(self.engine.module, self.topo)
