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


def restate_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """Set every group's learning rate (and the scheduler's last one) from the scheduler's own lambda at its
    current step. After a checkpoint load the optimizer's lr is the one saved — the OLD schedule's — while the
    lambda is this run's: on a rebuilt schedule the next step must train at the new one (not, e.g., at the 0
    an ended cosine left behind). Returns the first group's lr."""
    step = scheduler.last_epoch
    values = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, values):
        group["lr"] = lr
    scheduler._last_lr = values
    return values[0]


def global_grad_norm(parameters, topo) -> torch.Tensor:
    """L2 norm of the gradients of one whole model replica, as a 0-d fp32 tensor on the gradients' device
    (no host sync): TP-sharded parameters count on every TP rank, replicated ones (norms, biases of
    row-parallel layers) on TP rank 0 only, the second copy of a pipeline-tied weight not at all; the
    squares are summed over the model-parallel group (tp × pp). Call after the data-parallel reduction."""
    import torch.distributed as dist

    grads = [p.grad for p in parameters
             if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)
             and (getattr(p, "tensor_model_parallel", False) or topo.tp_rank == 0)]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        sq += g.detach().double().pow(2).sum()
    if topo.tp * topo.pp > 1:
        dist.all_reduce(sq, group=topo.get_model_parallel_group())
    return sq.sqrt().float()


class GlobalNormClipping(torch.optim.Optimizer):
    """Wraps a torch optimizer: measure (and, with ``max_norm`` > 0, clip by) the global gradient norm, then step.

    Used where DeepSpeed measures no norm itself, i.e. ZeRO-0 in fp32 (its ZeRO-1/2/3 and bf16 optimizers
    measure and clip correctly, under pipeline parallelism too). DeepSpeed's own ZeRO-0 clipping counts
    replicated parameters on model-parallel rank 0 only — under pp the first stage — so it is switched off
    (gradient_clipping 0) and done here. DeepSpeed's engine reads ``_global_grad_norm`` after ``step``
    (``engine.get_global_grad_norm()``). Clipping scales by min(1, max_norm / (norm + 1e-6)) as torch's
    ``clip_grad_norm_`` does, on the device.

    A non-finite norm (a NaN or inf loss, a bad weight in the data) skips the update as DeepSpeed's ZeRO-1/2/3
    and bf16 optimizers do (their ``is_invalid_grad_norm``): parameters and Adam state untouched,
    ``overflow`` set, so the engine counts ``skipped_steps`` and does not advance the schedule — one rule for
    every layout (docs/checkpoints.md#non-finite-steps). Reading the norm's finiteness is the one host read
    of the step before the statistics cross (free on the CPU; DeepSpeed's own optimizers read theirs too)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float, topo):
        # Not Optimizer.__init__: the wrapped optimizer owns the parameter groups and the state.
        self.optimizer = optimizer
        self.max_norm = float(max_norm)
        self.topo = topo
        self._global_grad_norm = None
        self.overflow = False       # read by DeepSpeed's engine after step(): True = the update was skipped

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def _params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        params = self._params()
        norm = global_grad_norm(params, self.topo)
        self._global_grad_norm = norm
        # Equal on every rank (gradients all-reduced over dp, the norm over tp × pp): all ranks skip alike.
        self.overflow = not bool(torch.isfinite(norm))
        if self.overflow:
            return None
        if self.max_norm > 0:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
                torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"GlobalNormClipping(max_norm={self.max_norm}, {self.optimizer!r})"
