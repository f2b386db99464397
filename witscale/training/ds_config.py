"""Read a DeepSpeed JSON config and fill its "auto" fields from witscale's flags.

Filled fields (a concrete value in the file must agree with the flag, or it is an error):
- train_micro_batch_size_per_gpu ← --micro-batch-size; gradient_accumulation_steps ← --grad-accum;
  train_batch_size ← micro × accum × data-parallel size.
- gradient_clipping ← --clip-grad, 0 (off, as in the paper) when the flag is not given. DeepSpeed's own
  default is 1.0, so an absent field is written explicitly too.
- bf16.enabled ← true on GPU, false on CPU (CPU trains in fp32). With bf16, gradients accumulate in fp32
  (data_types.grad_accum_dtype; a ZeRO-0 config runs as ZeRO-1, see ``_bf16_with_fp32_gradients``).
- optimizer.params (lr, betas, eps, weight_decay) ← --lr, --adam-betas, --adam-eps, --weight-decay.
  On a machine without CUDA the optimizer section is removed and the trainer passes torch's AdamW
  (DeepSpeed's FusedAdam needs CUDA; its CPU Adam needs a JIT compile).
- ZeRO bucket sizes ← from the model's hidden size (h²; prefetch 0.9·h²; persistence threshold 10·h).
witscale owns the learning-rate schedule (warm-up + cosine): a "scheduler" section is rejected.
"""
from __future__ import annotations

import copy
import json
from typing import Any


class DSConfigError(ValueError):
    pass


def load_ds_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise DSConfigError(f"--ds_config {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DSConfigError(f"--ds_config {path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise DSConfigError(f"--ds_config {path}: expected a JSON object")
    return cfg


def zero_stage(cfg: dict) -> int:
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


def _fill(section: dict, key: str, value: Any, flag: str, where: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise DSConfigError(f"{where}: {key}={current!r} disagrees with {flag}={value!r}; "
                            f"set it to \"auto\" or make them agree")


def fill_ds_config(cfg: dict, *, micro_batch_size: int, grad_accum: int, dp_size: int,
                   clip_grad: float | None, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float, hidden_size: int, use_cuda: bool, path: str = "ds_config") -> dict:
    cfg = copy.deepcopy(cfg)
    if "scheduler" in cfg:
        raise DSConfigError(f"{path}: remove the \"scheduler\" section: witscale drives the learning rate "
                            "(--lr, --warmup-ratio, cosine decay)")
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, "--micro-batch-size", path)
    _fill(cfg, "gradient_accumulation_steps", grad_accum, "--grad-accum", path)
    _fill(cfg, "train_batch_size", micro_batch_size * grad_accum * dp_size,
          "--micro-batch-size × --grad-accum × data-parallel size", path)
    _fill(cfg, "gradient_clipping", float(clip_grad or 0.0), "--clip-grad", path)

    bf16 = cfg.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = bool(use_cuda)
    if (cfg.get("fp16") or {}).get("enabled") is True:
        raise DSConfigError(f"{path}: fp16 is not supported by witscale (use bf16 on GPU, fp32 on CPU)")
    if bf16["enabled"] and not use_cuda:
        raise DSConfigError(f"{path}: bf16 is enabled but there is no GPU; set bf16.enabled to \"auto\"")
    if bf16["enabled"]:
        _bf16_with_fp32_gradients(cfg, path)

    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        for key, value, flag in (("lr", lr, "--lr"), ("weight_decay", weight_decay, "--weight-decay"),
                                 ("betas", list(betas), "--adam-betas"), ("eps", eps, "--adam-eps")):
            _fill(params, key, value, flag, f"{path} optimizer.params")
        if not use_cuda:
            del cfg["optimizer"]
    if "optimizer" not in cfg:
        cfg["zero_allow_untested_optimizer"] = True   # torch AdamW, passed by the trainer

    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    h2 = hidden_size * hidden_size
    for key, value in (("reduce_bucket_size", h2), ("stage3_prefetch_bucket_size", int(0.9 * h2)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise DSConfigError(f"{path}: witscale cannot fill \"auto\" for {', '.join(leftover)}")
    return cfg


def _bf16_with_fp32_gradients(cfg: dict, path: str) -> None:
    """bf16 weights and compute, fp32 gradient accumulation, fp32 master weights and Adam state.

    ``data_types.grad_accum_dtype = "fp32"`` makes DeepSpeed accumulate the micro-batches' gradients in fp32
    (by default it accumulates in the model dtype: bf16 over 8+ micro-batches loses low bits): ZeRO-2/3 keep
    fp32 gradient partitions, ZeRO-1 switches to DeepSpeed's BF16_Optimizer (fp32 gradient buffers, also
    under pipeline parallelism). DeepSpeed has no fp32 accumulation for ZeRO-0, so a bf16 ZeRO-0 config runs
    as ZeRO-1 — identical at dp = 1 (the usual pipeline layout), and at dp > 1 the same gradients with the
    optimizer state partitioned instead of replicated. The master weights and Adam moments are fp32 in every
    DeepSpeed bf16 optimizer."""
    dtypes = cfg.setdefault("data_types", {})
    if dtypes.setdefault("grad_accum_dtype", "fp32") != "fp32":
        raise DSConfigError(f"{path}: data_types.grad_accum_dtype={dtypes['grad_accum_dtype']!r}: witscale "
                            "accumulates bf16 gradients in fp32; remove the field or set it to \"fp32\"")
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if int(zero.get("stage", 0)) == 0:
        zero["stage"] = 1


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _walk(v, name + ".")
        else:
            yield name, v
