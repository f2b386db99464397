"""AdamW parameter groups and the warm-up + cosine learning-rate schedule (the paper's recipe)."""
from __future__ import annotations

import math
import os
import time
from typing import Optional

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


def optimizer_settings(scheduler) -> dict:
    """The peak lr, weight decay, betas and eps in effect: after a checkpoint load these are the checkpoint's
    (the scheduler's state holds its base lr, the optimizer's groups the rest), whatever this run's flags say.
    The first group is the decaying one (``param_groups``; DeepSpeed keeps the groups' order)."""
    group = scheduler.optimizer.param_groups[0]
    return {"lr": scheduler.base_lrs[0], "weight_decay": group["weight_decay"],
            "adam_betas": tuple(group["betas"]), "adam_eps": group["eps"]}


def apply_optimizer_settings(scheduler, *, lr: float, weight_decay: float, betas, eps: float) -> None:
    """Put this run's optimizer flags in place of a loaded checkpoint's (a resume with --reschedule); the
    caller then restates the schedule (``restate_schedule``) for the new peak lr."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for i, group in enumerate(scheduler.optimizer.param_groups):
        group["initial_lr"] = lr
        group["betas"] = tuple(betas)
        group["eps"] = eps
        if i == 0:          # the no-decay groups stay at 0
            group["weight_decay"] = weight_decay


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


# --- the optimizer's compiled extension: built before the model loads, or torch's fused AdamW -----------
# DeepSpeed's "optimizer": {"type": "AdamW"} is its FusedAdam, a C++/CUDA extension that JIT-compiles on first
# use (torch.utils.cpp_extension) inside the Trainer — after the model is loaded — behind torch's FileBaton, a
# `lock` file in the build directory whose wait() has no timeout and which a killed builder leaves behind. So
# every rank calls ``prepare_optimizer`` before the model loads: a stale lock is named and a fresh directory
# used, the build runs in a child process bounded by a timeout, and where it cannot be built (no compiler, a
# failed build) the run takes torch's fused AdamW instead, with one warning line. This is the one place that
# chooses between the two.
STALE_LOCK_S = 600.0          # WITSCALE_EXT_LOCK_STALE_S: no builder stays silent that long (nvcc: ~1 min a file)
BUILD_TIMEOUT_S = 1200.0      # WITSCALE_EXT_BUILD_TIMEOUT_S: FusedAdam builds in 1-2 min on a GPU node
_FUSED_ADAM = "fused_adam"


class ExtensionBuildError(RuntimeError):
    """The optimizer's extension could not be built in time; the message is one line."""


def wants_fused_adam(ds_config: dict) -> bool:
    """Will DeepSpeed build its FusedAdam for this config? Its optimizer of type Adam/AdamW, unless torch_adam,
    an offloaded optimizer (DeepSpeedCPUAdam) or fp32 ZeRO-0 (the Trainer uses torch's AdamW there)."""
    opt = ds_config.get("optimizer") or {}
    if str(opt.get("type", "")).lower() not in ("adam", "adamw") or (opt.get("params") or {}).get("torch_adam"):
        return False
    zero = ds_config.get("zero_optimization") or {}
    if ((zero.get("offload_optimizer") or {}).get("device") or "none") != "none":
        return False
    bf16 = (ds_config.get("bf16") or {}).get("enabled") is True
    return bool(int(zero.get("stage", 0) or 0) > 0 or bf16)


def fused_adam_prebuilt() -> bool:
    """Installed with DeepSpeed (DS_BUILD_FUSED_ADAM=1 pip install deepspeed) for this accelerator."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops
    return bool(installed_ops.get(_FUSED_ADAM)) and accelerator_name == get_accelerator()._name


def missing_build_tools() -> list[str]:
    """What a JIT build of the extension needs and this node lacks."""
    import shutil

    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    missing = [] if is_ninja_available() else ["ninja"]
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx})")
    if torch.cuda.is_available():
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else ""
        if not os.access(nvcc, os.X_OK):
            missing.append("nvcc (CUDA_HOME " + (f"{CUDA_HOME} has no bin/nvcc)" if CUDA_HOME else "not found)"))
    return missing


def extension_build_dir(name: str = _FUSED_ADAM) -> str:
    """Where torch builds extension ``name``: $TORCH_EXTENSIONS_DIR/name, else its per-user default."""
    from torch.utils.cpp_extension import _get_build_directory
    return _get_build_directory(name, verbose=False)


def stale_build_lock(build_dir: str, stale_after_s: float = STALE_LOCK_S, now: Optional[float] = None) -> Optional[str]:
    """The path of torch's FileBaton ``lock`` in ``build_dir`` if it was left by a builder that is gone: older than
    ``stale_after_s`` while nothing in the directory changed for as long (a live build writes its object files).
    None when there is no lock or a build may still be running."""
    now = time.time() if now is None else now
    lock = os.path.join(build_dir, "lock")
    try:
        newest = os.stat(lock).st_mtime
    except FileNotFoundError:
        return None
    for entry in os.scandir(build_dir):
        try:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        except FileNotFoundError:
            continue
    return lock if now - newest >= stale_after_s else None


def _job_key() -> str:
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "MASTER_PORT"):
        if os.environ.get(var):
            return os.environ[var]
    return str(os.getpid())


def _built(build_dir: str, name: str = _FUSED_ADAM) -> bool:
    import glob
    return bool(glob.glob(os.path.join(build_dir, f"{name}*.so")))


def _build_in_child(build_dir: str, timeout_s: float) -> Optional[str]:
    """Build FusedAdam in a child process (torch's own JIT build, the same directory); None when built, else the
    reason it failed. A timeout raises: the build or a lock held by a live process took longer than allowed."""
    import subprocess
    import sys

    code = "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(verbose=False)"
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ExtensionBuildError(
            f"DeepSpeed's {_FUSED_ADAM} extension did not build within {timeout_s:.0f} s in {build_dir} (a build or "
            "its lock held by another process; WITSCALE_EXT_BUILD_TIMEOUT_S sets the limit)") from None
    if res.returncode == 0:
        return None
    lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
    return f"the build in {build_dir} failed ({lines[-1].strip() if lines else f'exit {res.returncode}'})"


def prepare_optimizer(ds_config: dict, log=None) -> tuple[dict, Optional[str]]:
    """Before the model loads, on every rank: make sure the optimizer the DeepSpeed config asks for can be had
    without waiting on anything unbounded. Returns (the config to use, why torch's AdamW replaces FusedAdam or
    None). Without an "optimizer" the Trainer builds torch's AdamW (fused on CUDA) from the run's flags."""
    if not wants_fused_adam(ds_config) or fused_adam_prebuilt():
        return ds_config, None
    missing = missing_build_tools()
    reason = f"cannot build DeepSpeed's FusedAdam here: no {', '.join(missing)}" if missing else None
    if reason is None:
        build_dir = extension_build_dir()
        stale = stale_build_lock(build_dir, float(os.environ.get("WITSCALE_EXT_LOCK_STALE_S", STALE_LOCK_S)))
        if stale is not None:
            import tempfile
            fresh = os.path.join(tempfile.gettempdir(), f"witscale-ext-{_job_key()}")
            if log is not None:
                log.warning(f"{stale}: a stale extension-build lock (no builder has written there for "
                            f"{(time.time() - os.stat(stale).st_mtime) / 60:.0f} min; a killed build left it): "
                            f"building in {fresh} instead (delete the lock once no job uses {build_dir})")
            os.environ["TORCH_EXTENSIONS_DIR"] = fresh       # read by torch at build time, here and in the Trainer
            build_dir = extension_build_dir()
        if not _built(build_dir):
            reason = _build_in_child(build_dir, float(os.environ.get("WITSCALE_EXT_BUILD_TIMEOUT_S", BUILD_TIMEOUT_S)))
    if reason is None:
        return ds_config, None
    return {k: v for k, v in ds_config.items() if k != "optimizer"}, reason
