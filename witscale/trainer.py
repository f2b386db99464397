"""One optimizer step on the DeepSpeed engine, with the global-batch loss normalization; evaluation.

``Trainer.__init__`` wraps the (already built, under ZeRO-3 already partitioned) module in the DeepSpeed
engine with AdamW and the warm-up + cosine schedule; ``train_step`` runs one optimizer step over
``grad_accum`` micro-batches; ``evaluate`` scores a packed eval set. The loop (checkpoints, preemption,
metrics) is ``witscale.train.train_loop``.

Normalization. The objective is Σ_{global batch} w·nll / N, N the global batch's denominator for the
chosen normalization (DESIGN.md §1). DeepSpeed *averages* gradients over the data-parallel ranks, so each
micro-batch's loss is ``weighted_sum × dp / N`` and ``backward`` is called with ``scale_wrt_gas=False``
(DeepSpeed would otherwise divide by grad_accum as well). The result is the same gradient whatever dp,
grad_accum or ZeRO stage — tested as dp=2 × accum=2 against dp=1 × accum=4.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from witscale.data.classes import PROMPT_SIDE, RESPONSE_SIDE, NUM_CLASSES
from witscale.data.loader import IGNORE_INDEX, MicroBatch, PackedLoader, StepBatch, denominators_of
from witscale.ds_config import zero_stage
from witscale.optim import cosine_with_warmup, param_groups
from witscale.planner import ModelShape

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

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


# Dense bf16 peak FLOP/s by GPU name (datasheet figures, no sparsity); MFU is reported only for these.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def gpu_peak_flops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in _PEAK_BF16.items() if key in name), None)


def _mean(nll_sum: torch.Tensor, count: torch.Tensor, classes) -> float:
    idx = [int(c) for c in classes]
    n = float(count[idx].sum())
    return float(nll_sum[idx].sum()) / n if n > 0 else float("nan")


class Trainer:
    def __init__(self, *, module: torch.nn.Module, ds_config: dict, loader: PackedLoader, topo,
                 normalization: str, lr: float, weight_decay: float, betas, eps: float,
                 total_steps: int, warmup_ratio: float):
        import deepspeed

        self.topo = topo
        self.loader = loader
        self.normalization = normalization
        self.total_steps = total_steps
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
        self._init_mfu(module.config)

    def _init_mfu(self, model_config) -> None:
        self.peak_flops = gpu_peak_flops()
        # Training FLOPs per token ≈ 6 × parameters (matmuls, forward + backward); attention's extra
        # O(context) term is left out, so MFU is slightly understated for long documents.
        self.flops_per_token = 6 * ModelShape.from_config(model_config).total_params()

    # --- one optimizer step ------------------------------------------------------------------------
    def _forward_backward(self, mb: MicroBatch, scale: float, last: bool):
        stats = self.engine(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen,
                            mb.labels, mb.weights, mb.target_classes)
        self.engine.backward(stats.weighted_sum * scale, scale_wrt_gas=False)
        if last and self.zero_stage == 0:
            # Without ZeRO, DeepSpeed reports no grad norm; the gradients are all-reduced by now.
            self._grad_norm = self._local_grad_norm()
        self.engine.step()
        return stats

    def _local_grad_norm(self) -> float:
        """Global L2 norm of the (already data-parallel-reduced) gradients; TP shards summed, replicas once."""
        sq = torch.zeros(1, dtype=torch.float64)
        for p in self.engine.module.parameters():
            if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or self.topo.tp_rank == 0):
                sq += p.grad.detach().double().pow(2).sum()
        if self.topo.tp > 1:
            dist.all_reduce(sq, group=self.topo.get_tensor_model_parallel_group())
        return float(sq.sqrt())

    def train_step(self, batch: StepBatch) -> StepResult:
        t0 = time.perf_counter()
        denominator = batch.denominators[self.normalization]
        # A global batch with nothing to learn from (e.g. all weights 0) gives a zero gradient, not NaN.
        scale = self.topo.dp / denominator if denominator > 0 else 0.0
        lr = self.scheduler.get_last_lr()[0]
        totals = torch.zeros(1 + 2 * NUM_CLASSES, dtype=torch.float64)
        self._grad_norm = None
        for i, mb in enumerate(batch.micro_batches):
            stats = self._forward_backward(mb, scale, last=i == len(batch.micro_batches) - 1)
            totals[0] += float(stats.weighted_sum.detach())
            totals[1:1 + NUM_CLASSES] += stats.class_nll_sum.double()
            totals[1 + NUM_CLASSES:] += stats.class_count.double()
        # Sum the logging statistics over the data-parallel replicas (TP peers hold identical numbers).
        dist.all_reduce(totals, group=self.topo.get_data_parallel_group())
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._grad_norm
        return self._finish_step(batch, totals, denominator, lr, grad_norm, t0)

    def _finish_step(self, batch: StepBatch, totals: torch.Tensor, denominator: float, lr: float, grad_norm,
                     t0: float) -> StepResult:
        """Count the step and turn the global-batch sums [weighted_sum, class_nll…, class_count…] into metrics."""
        nll_sum, count = totals[1:1 + NUM_CLASSES], totals[1 + NUM_CLASSES:]
        self.step += 1
        elapsed = time.perf_counter() - t0
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
            mfu=(batch.global_real_tokens * self.flops_per_token / elapsed / (self.peak_flops * dist.get_world_size())
                 if self.peak_flops and elapsed > 0 else None),
        )

    # --- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_loader: "PackedLoader") -> dict:
        """Weighted loss (the run's normalization) and per-class NLL over a whole packed eval set.

        Rows are split over the data-parallel ranks; every rank runs the same number of forwards (ZeRO-3
        gathers are collective), padding with an empty batch where a rank has run out of rows.
        """
        self.engine.eval()
        rows = np.arange(len(eval_loader.dataset))
        per_rank = int(math.ceil(len(rows) / self.topo.dp))
        mine = rows[self.topo.dp_rank * per_rank:(self.topo.dp_rank + 1) * per_rank]
        mbs = eval_loader.micro_batch_size
        n_batches = int(math.ceil(per_rank / mbs))
        totals = torch.zeros(4 + 2 * NUM_CLASSES, dtype=torch.float64)
        for b in range(n_batches):
            chunk = mine[b * mbs:(b + 1) * mbs]
            mb = eval_loader.make_micro_batch(chunk if len(chunk) else rows[:1])
            if not len(chunk):
                mb.weights.zero_()
                mb.labels.fill_(IGNORE_INDEX)
            stats = self.engine(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen,
                                mb.labels, mb.weights, mb.target_classes)
            totals[0] += float(stats.weighted_sum)
            for i, key in enumerate(("nonzero", "weight_sum", "tokens")):
                totals[1 + i] += denominators_of(mb.labels.numpy(), mb.weights.numpy())[key]
            totals[4:4 + NUM_CLASSES] += stats.class_nll_sum.double()
            totals[4 + NUM_CLASSES:] += stats.class_count.double()
        dist.all_reduce(totals, group=self.topo.get_data_parallel_group())
        self.engine.train()
        denominator = float(totals[1 + ("nonzero", "weight_sum", "tokens").index(self.normalization)])
        nll_sum, count = totals[4:4 + NUM_CLASSES], totals[4 + NUM_CLASSES:]
        return {"step": self.step,
                "eval_loss": float(totals[0]) / denominator if denominator > 0 else float("nan"),
                "eval_prompt_nll": _mean(nll_sum, count, PROMPT_SIDE),
                "eval_response_nll": _mean(nll_sum, count, RESPONSE_SIDE)}

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

    def full_dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Dense HF-named tensors of the whole model (collective): ZeRO partitions gathered, TP shards
        concatenated, vocabulary padding trimmed."""
        from witscale.parallel.layers import gather_dense

        module = self.engine.module
        local = self.full_parameters()
        vocab = module.config.vocab_size
        group = self.topo.get_tensor_model_parallel_group() if self.topo.tp > 1 else None
        return {name: gather_dense(p, local[name], group, vocab if getattr(p, "padded_dense_rows", None) else None)
                for name, p in module.named_parameters()}
