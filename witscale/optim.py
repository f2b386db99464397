"""AdamW parameter groups and the warm-up + cosine learning-rate schedule (the paper's recipe)."""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; exempt biases and norm weights (1-D tensors), as HF's Trainer does."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Under ZeRO-3 a partitioned parameter's .dim() is 1 (flat); ds_shape keeps the real shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(total_steps * warmup_ratio))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ceil(ratio × total) steps, then cosine decay to min_lr_ratio × lr."""
    warmup = warmup_steps_for(total_steps, warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup   # step 0 already trains, at lr/warmup (never at exactly 0)
        progress = (step - warmup) / max(1, total_steps - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
