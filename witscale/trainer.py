"""The training loop: DeepSpeed engine, global-batch loss normalization, metrics.

Read top to bottom: ``Trainer.__init__`` builds the model (partitioned at creation under ZeRO-3), the
loader, the optimizer and schedule and the DeepSpeed engine; ``train_step`` runs one optimizer step over
``grad_accum`` micro-batches; ``fit`` loops and logs.

Normalization. The objective is Σ_{global batch} w·nll / N, N the global batch's denominator for the
chosen normalization (DESIGN.md §1). DeepSpeed *averages* gradients over the data-parallel ranks, so each
micro-batch's loss is ``weighted_sum × dp / N`` and ``backward`` is called with ``scale_wrt_gas=False``
(DeepSpeed would otherwise divide by grad_accum as well). The result is the same gradient whatever dp,
grad_accum or ZeRO stage — tested as dp=2 × accum=2 against dp=1 × accum=4.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from witscale.data.classes import PROMPT_SIDE, RESPONSE_SIDE, NUM_CLASSES
from witscale.data.loader import MicroBatch, PackedLoader, StepBatch
from witscale.ds_config import zero_stage
from witscale.optim import cosine_with_warmup, param_groups

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

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _mean(nll_sum: torch.Tensor, count: torch.Tensor, classes) -> float:
    idx = [int(c) for c in classes]
    n = float(count[idx].sum())
    return float(nll_sum[idx].sum()) / n if n > 0 else float("nan")


class Trainer:
    def __init__(self, *, module: torch.nn.Module, ds_config: dict, loader: PackedLoader, topo,
                 normalization: str, lr: float, weight_decay: float, betas, eps: float,
                 total_steps: int, warmup_ratio: float, output_dir: Optional[str] = None):
        import deepspeed

        self.topo = topo
        self.loader = loader
        self.normalization = normalization
        self.total_steps = total_steps
        self.output_dir = output_dir
        self.is_rank0 = dist.get_rank() == 0
        self.zero_stage = zero_stage(ds_config)

        optimizer = None
        if "optimizer" not in ds_config:
            optimizer = torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
        else:
            # DeepSpeed builds its optimizer from the config; the param groups still exempt norms/biases.
            module_params = param_groups(module, weight_decay)
        # The engine steps the schedule once per optimizer step (at the accumulation boundary).
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_config, mpu=topo,
            model_parameters=None if optimizer is not None else module_params,
            lr_scheduler=lambda opt: cosine_with_warmup(opt, total_steps, warmup_ratio))
        self.step = 0
        self._metrics_file = None
        if output_dir and self.is_rank0:
            os.makedirs(output_dir, exist_ok=True)
            self._metrics_file = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")

    # --- one optimizer step ------------------------------------------------------------------------
    def _forward_backward(self, mb: MicroBatch, scale: float):
        stats = self.engine(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen,
                            mb.labels, mb.weights, mb.target_classes)
        self.engine.backward(stats.weighted_sum * scale, scale_wrt_gas=False)
        self.engine.step()
        return stats

    def train_step(self, batch: StepBatch) -> StepResult:
        t0 = time.perf_counter()
        denominator = batch.denominators[self.normalization]
        # A global batch with nothing to learn from (e.g. all weights 0) gives a zero gradient, not NaN.
        scale = self.topo.dp / denominator if denominator > 0 else 0.0
        lr = self.scheduler.get_last_lr()[0]
        totals = torch.zeros(1 + 2 * NUM_CLASSES, dtype=torch.float64)
        for mb in batch.micro_batches:
            stats = self._forward_backward(mb, scale)
            totals[0] += float(stats.weighted_sum.detach())
            totals[1:1 + NUM_CLASSES] += stats.class_nll_sum.double()
            totals[1 + NUM_CLASSES:] += stats.class_count.double()
        # Sum the logging statistics over the data-parallel replicas (TP peers hold identical numbers).
        dist.all_reduce(totals, group=self.topo.get_data_parallel_group())
        nll_sum, count = totals[1:1 + NUM_CLASSES], totals[1 + NUM_CLASSES:]
        self.step += 1
        elapsed = time.perf_counter() - t0
        grad_norm = self.engine.get_global_grad_norm()
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = float(grad_norm)
        return StepResult(
            step=self.step,
            loss=float(totals[0]) / denominator if denominator > 0 else 0.0,
            prompt_nll=_mean(nll_sum, count, PROMPT_SIDE),
            response_nll=_mean(nll_sum, count, RESPONSE_SIDE),
            lr=lr,
            grad_norm=None if grad_norm is None or math.isnan(grad_norm) else grad_norm,
            tokens=batch.global_real_tokens,
            tokens_per_s=batch.global_real_tokens / elapsed if elapsed > 0 else 0.0,
            packing_efficiency=batch.global_real_tokens / batch.global_capacity,
            denominator=denominator,
            epoch=batch.epoch,
        )

    # --- the loop ----------------------------------------------------------------------------------
    def log_step(self, result: StepResult) -> None:
        if not self.is_rank0:
            return
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(result.as_dict()) + "\n")
            self._metrics_file.flush()
        gn = f"{result.grad_norm:.3f}" if result.grad_norm is not None else "-"
        log.info(f"step {result.step}/{self.total_steps} epoch {result.epoch} loss {result.loss:.4f} "
                 f"prompt_nll {result.prompt_nll:.4f} response_nll {result.response_nll:.4f} "
                 f"lr {result.lr:.3g} grad_norm {gn} tok/s {result.tokens_per_s:.0f}")

    def fit(self) -> list[StepResult]:
        results = []
        while self.step < self.total_steps:
            result = self.train_step(self.loader.next_step())
            self.log_step(result)
            results.append(result)
        return results

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    # --- inspection (tests, export) ----------------------------------------------------------------
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """This rank's full (un-partitioned) parameters, by name; gathers ZeRO-3 partitions."""
        import deepspeed

        module = self.engine.module
        params = list(module.named_parameters())
        if self.zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                return {n: p.detach().clone().float() for n, p in params}
        return {n: p.detach().clone().float() for n, p in params}
