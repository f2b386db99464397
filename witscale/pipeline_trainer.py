"""``Trainer`` for pipeline-parallel layouts (--pp > 1): DeepSpeed's PipelineEngine and its 1F1B schedule.

Same objective, loader, metrics and checkpoints as ``Trainer``; what differs:
- one ``engine.train_batch`` per optimizer step, fed by an iterator over the step's micro-batches; the last
  stage's loss is ``weighted_sum × dp × gas / N`` (see witscale/parallel/pipeline.py for why ×gas);
- the logging statistics exist on the last stage only: summed over dp there, then broadcast to every stage;
- gradient norm and clipping under ZeRO-0 are done here: DeepSpeed's ZeRO-0 clipping counts replicated
  parameters (norms) only on model-parallel rank 0, i.e. only on the first pipeline stage. ZeRO-1 computes
  it correctly (per tensor-parallel rank) and clips itself.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from witscale.data.classes import NUM_CLASSES, PROMPT_SIDE, RESPONSE_SIDE
from witscale.data.loader import IGNORE_INDEX, MicroBatch, PackedLoader, StepBatch, denominators_of
from witscale.ds_config import zero_stage
from witscale.optim import cosine_with_warmup, param_groups
from witscale.parallel.pipeline import _max_seqlen_tensor, dense_state_dict, pipeline_ds_config
from witscale.trainer import StepResult, Trainer, _mean


def _pipe_item(mb: MicroBatch, scale: float):
    inputs = (mb.input_ids, mb.position_ids, mb.cu_seqlens, _max_seqlen_tensor(mb.max_seqlen))
    labels = (mb.labels, mb.weights, mb.target_classes, torch.tensor(scale, dtype=torch.float64))
    return inputs, labels


class PipelineTrainer(Trainer):
    def __init__(self, *, module, ds_config: dict, loader: PackedLoader, topo, normalization: str, lr: float,
                 weight_decay: float, betas, eps: float, total_steps: int, warmup_ratio: float,
                 activation_checkpointing: bool = False):
        import deepspeed

        self.topo = topo
        self.loader = loader
        self.normalization = normalization
        self.total_steps = total_steps
        self.is_rank0 = dist.get_rank() == 0
        self.zero_stage = zero_stage(ds_config)
        self.module_config = module.config
        self.loss_fn = module.loss_fn
        config = pipeline_ds_config(ds_config, activation_checkpointing)
        self.clip = float(config.get("gradient_clipping") or 0.0)
        if self.zero_stage == 0:
            config["gradient_clipping"] = 0.0       # clipped here, with the right norm (module docstring)
        self.grad_accum = int(config["gradient_accumulation_steps"])
        optimizer = None
        module_params = param_groups(module, weight_decay)
        if "optimizer" not in config:
            optimizer = torch.optim.AdamW(module_params, lr=lr, betas=tuple(betas), eps=eps)
        # mpu must be None: the PipelineModule brings its own grid (same rank order as witscale's Topology).
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config,
            model_parameters=None if optimizer is not None else module_params,
            lr_scheduler=lambda opt: cosine_with_warmup(opt, total_steps, warmup_ratio))
        self.step = 0
        self._init_mfu(module.config)
        self._grad_norm: Optional[float] = None
        if self.zero_stage == 0:
            take_step = self.engine._take_model_step

            def norm_clip_then_step(lr_kwargs):
                self._grad_norm = self._clip_and_norm()
                return take_step(lr_kwargs)
            self.engine._take_model_step = norm_clip_then_step

    # --- gradient norm (ZeRO-0) ---------------------------------------------------------------------
    def _clip_and_norm(self) -> float:
        """Global L2 norm of the dp-reduced gradients over the whole model: TP shards on every TP rank,
        replicated parameters on TP rank 0, each pipeline stage its own layers, a tied embedding once."""
        sq = torch.zeros(1, dtype=torch.float64)
        grads = []
        for name, p in self.engine.module.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            if getattr(p, "ds_pipe_replicated", False):     # the second copy of a tied weight
                continue
            if getattr(p, "tensor_model_parallel", False) or self.topo.tp_rank == 0:
                sq += p.grad.detach().double().pow(2).sum()
        # One dp replica's model is spread over its tp × pp ranks.
        dist.all_reduce(sq, group=self.topo.get_model_parallel_group())
        norm = float(sq.sqrt())
        if self.clip > 0 and norm > self.clip:
            for g in grads:
                g.mul_(self.clip / (norm + 1e-6))
        return norm

    # --- one optimizer step ------------------------------------------------------------------------
    def train_step(self, batch: StepBatch) -> StepResult:
        t0 = time.perf_counter()
        if len(batch.micro_batches) != self.grad_accum:
            raise ValueError(f"the step has {len(batch.micro_batches)} micro-batches, the engine expects "
                             f"{self.grad_accum}")
        denominator = batch.denominators[self.normalization]
        scale = self.topo.dp * self.grad_accum / denominator if denominator > 0 else 0.0
        lr = self.scheduler.get_last_lr()[0]
        self._grad_norm = None
        self.loss_fn.records = []
        self.engine.train_batch(iter([_pipe_item(mb, scale) for mb in batch.micro_batches]))
        totals = self._stage_totals(self.loss_fn.pop_stats())
        grad_norm = self._grad_norm if self.zero_stage == 0 else self.engine.get_global_grad_norm()
        return self._finish_step(batch, totals, denominator, lr, grad_norm, t0)

    def _stage_totals(self, records, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[weighted_sum, class_nll_sum…, class_count…] of the global batch on every rank: the last stage
        sums its micro-batches and its dp replicas; the other stages receive that by a pipe broadcast."""
        totals = torch.zeros(1 + 2 * NUM_CLASSES, dtype=torch.float64)
        for stats in records:
            totals[0] += float(stats.weighted_sum.detach())
            totals[1:1 + NUM_CLASSES] += stats.class_nll_sum.double()
            totals[1 + NUM_CLASSES:] += stats.class_count.double()
        if extra is not None:
            totals = torch.cat([totals, extra])
        if self.engine.is_last_stage():
            dist.all_reduce(totals, group=self.topo.get_data_parallel_group())
        last = self.topo.dims.rank_of(self.topo.pp - 1, self.topo.dp_rank, self.topo.tp_rank)
        dist.broadcast(totals, src=last, group=self.topo.get_pipeline_model_parallel_group())
        return totals

    # --- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_loader: PackedLoader) -> dict:
        """As ``Trainer.evaluate``: rows split over dp, every replica runs the same number of micro-batches
        (an exhausted replica scores an all-masked one) through the pipeline's inference schedule."""
        rows = np.arange(len(eval_loader.dataset))
        per_rank = int(math.ceil(len(rows) / self.topo.dp))
        mine = rows[self.topo.dp_rank * per_rank:(self.topo.dp_rank + 1) * per_rank]
        mbs = eval_loader.micro_batch_size
        n_batches = int(math.ceil(per_rank / mbs))
        items, denoms = [], torch.zeros(3, dtype=torch.float64)
        for b in range(n_batches):
            chunk = mine[b * mbs:(b + 1) * mbs]
            mb = eval_loader.make_micro_batch(chunk if len(chunk) else rows[:1])
            if not len(chunk):
                mb.weights.zero_()
                mb.labels.fill_(IGNORE_INDEX)
            d = denominators_of(mb.labels.numpy(), mb.weights.numpy())
            denoms += torch.tensor([d["nonzero"], d["weight_sum"], d["tokens"]], dtype=torch.float64)
            items.append(_pipe_item(mb, 1.0))
        self.loss_fn.records = []
        self.engine.eval_batch(iter(items), compute_loss=True, reduce_output=None, bcast_loss=False,
                               num_micro_batches=n_batches)
        records = self.loss_fn.pop_stats() if self.engine.is_last_stage() else []
        # The denominators are known on every stage; only the last stage's count is kept (no double sum).
        totals = self._stage_totals(records, denoms if self.engine.is_last_stage() else torch.zeros(3, dtype=torch.float64))
        self.engine.train()
        extra = totals[1 + 2 * NUM_CLASSES:]
        denominator = float(extra[("nonzero", "weight_sum", "tokens").index(self.normalization)])
        nll_sum, count = totals[1:1 + NUM_CLASSES], totals[1 + NUM_CLASSES:1 + 2 * NUM_CLASSES]
        return {"step": self.step,
                "eval_loss": float(totals[0]) / denominator if denominator > 0 else float("nan"),
                "eval_prompt_nll": _mean(nll_sum, count, PROMPT_SIDE),
                "eval_response_nll": _mean(nll_sum, count, RESPONSE_SIDE)}

    # --- inspection (tests, export) ----------------------------------------------------------------
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """This stage's parameters by PIPELINE name (not gathered over tp)."""
        return {n: p.detach().clone().float() for n, p in self.engine.module.named_parameters()}

    def full_dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Dense HF-named tensors of the whole model, on every rank (collective)."""
        return dense_state_dict(self.engine.module, self.module_config, self.topo)
