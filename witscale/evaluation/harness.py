"""Benchmarks through lm-evaluation-harness (``lm-eval``; ``pip install 'witscale[eval]'``).

``run_tasks(model_dir, tasks, …)`` evaluates any task lm-eval knows — MMLU, BBH, IFEval, … or a local task
(``include_path``, witscale/evaluation/local_task.py) — and returns the ``tasks`` section of
eval_results.json (and the settings it ran with): per task the score of its primary metric, every metric lm-eval reported, and what it ran.

The ``paper`` preset (default) is the WIT paper's setting: zero-shot, no chain of thought — ``bbh`` runs as
lm-eval's ``bbh_zeroshot`` (its own ``bbh`` is three-shot chain of thought), every task with
``num_fewshot=0`` and no chat template (the models are trained on the packer's templates, not the
tokenizer's chat template). BOS is prepended when the model has one (the ``plain`` template starts with it).
``preset="none"`` leaves lm-eval's task defaults.

Backends: lm-eval's HF backend (default; under torchrun it shards the documents over the ranks itself, through
accelerate) or vLLM when installed (``backend="vllm"``, or ``auto`` on a GPU with vLLM importable; one process,
``data_parallel_size`` over the node's GPUs — run it outside torchrun).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

PRESETS = {
    "paper": {"num_fewshot": 0, "aliases": {"bbh": "bbh_zeroshot"}},
    "none": {"num_fewshot": None, "aliases": {}},
}
# The score of a task, in this order of preference, unless --task-metric names one.
PRIMARY_METRICS = ("acc", "exact_match", "prompt_level_strict_acc", "acc_norm", "f1", "mc2", "em",
                   "bleu", "rouge1", "word_perplexity")
FILTER_ORDER = ("none", "strict-match", "flexible-extract")


class HarnessUnavailable(RuntimeError):
    pass


def available() -> Optional[str]:
    """lm-eval's version, or None when it is not installed."""
    try:
        import lm_eval
    except ImportError:
        return None
    return getattr(lm_eval, "__version__", "?")


def resolve_backend(backend: str, device_type: str, world_size: int) -> str:
    if backend == "auto":
        if device_type == "cuda" and world_size == 1:
            try:
                import vllm  # noqa: F401
                return "vllm"
            except ImportError:
                pass
        return "hf"
    if backend == "vllm" and world_size > 1:
        raise ValueError("the vLLM backend runs as one process (data_parallel_size over the node's GPUs): "
                         "run the benchmarks outside torchrun")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"unknown backend {backend!r} (auto, hf, vllm)")
    return backend


def _metric_parts(key: str) -> tuple[str, str]:
    name, _, filt = key.partition(",")
    return name, filt or "none"


def primary_metric(metrics: dict, preferred: Optional[str] = None) -> Optional[str]:
    """The key ("metric,filter") of a task's score among lm-eval's result keys."""
    keys = [k for k in metrics if "," in k and "_stderr" not in k and isinstance(metrics[k], (int, float))]
    wanted = [preferred] if preferred else list(PRIMARY_METRICS)
    for name in wanted:
        if "," in name:                         # "metric,filter" given in full
            if name in keys:
                return name
            continue
        cands = [k for k in keys if _metric_parts(k)[0] == name]
        if cands:
            return sorted(cands, key=lambda k: (FILTER_ORDER.index(_metric_parts(k)[1])
                                                if _metric_parts(k)[1] in FILTER_ORDER else len(FILTER_ORDER), k))[0]
    return None if preferred else (sorted(keys)[0] if keys else None)


def model_args_for(backend: str, model_dir: str, *, tokenizer: Optional[str], dtype: str, add_bos: bool,
                   device_count: int, extra: Optional[dict] = None) -> dict:
    args = {"pretrained": model_dir, "dtype": dtype, "trust_remote_code": False}
    if tokenizer:
        args["tokenizer"] = tokenizer
    if add_bos:
        args["add_bos_token"] = True
    if backend == "vllm":
        args["data_parallel_size"] = max(1, device_count)
        args.setdefault("gpu_memory_utilization", 0.85)
    args.update(extra or {})
    return args


def run_tasks(model_dir: str, tasks: Sequence[str], *, preset: str = "paper", include_path: Optional[str] = None,
              tokenizer: Optional[str] = None, num_fewshot: Optional[int] = None, limit: Optional[int] = None,
              batch_size="auto", device: str = "cpu", dtype: str = "float32", backend: str = "hf",
              add_bos: bool = True, task_metrics: Optional[dict] = None, model_args: Optional[dict] = None,
              device_count: int = 1) -> Optional[dict]:
    """Run lm-eval: ``{"tasks": {name: result}, "config": …}`` (None on ranks other than 0 of a distributed
    HF run)."""
    if available() is None:
        raise HarnessUnavailable("lm-eval is not installed: pip install 'witscale[eval]' (or lm-eval)")
    import lm_eval
    from lm_eval.tasks import TaskManager

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    aliases = PRESETS[preset]["aliases"]
    if num_fewshot is None:
        num_fewshot = PRESETS[preset]["num_fewshot"]
    resolved = {t: aliases.get(t, t) for t in tasks}
    manager = None
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        needs_defaults = any(name not in local.all_tasks for name in resolved.values())
        manager = TaskManager(include_path=include_path) if needs_defaults else local
    else:
        manager = TaskManager()
    unknown = [t for t, name in resolved.items() if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {unknown[0]!r}"
                         + (" (is --include-path right?)" if include_path else ""))
    args = model_args_for(backend, model_dir, tokenizer=tokenizer, dtype=dtype, add_bos=add_bos,
                          device_count=device_count, extra=model_args)
    kwargs = dict(model=backend, model_args=args, tasks=list(resolved.values()), num_fewshot=num_fewshot,
                  limit=limit, task_manager=manager, log_samples=False, bootstrap_iters=0,
                  apply_chat_template=False)
    if backend == "hf":
        kwargs.update(batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(**kwargs)
    if out is None:                             # a rank other than 0 under torchrun/accelerate
        return None
    results = dict(out.get("results", {}))
    results.update({k: v for k, v in (out.get("groups") or {}).items() if k not in results})
    hib = out.get("higher_is_better", {})
    section = {}
    for task, name in resolved.items():
        metrics = results.get(name)
        if metrics is None:
            section[task] = {"error": f"lm-eval returned no result for {name}"}
            continue
        key = primary_metric(metrics, (task_metrics or {}).get(task))
        clean = {k: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
        metric = _metric_parts(key)[0] if key else None
        higher = hib.get(name, {}).get(metric, True) if metric else True
        subtasks = (out.get("group_subtasks") or {}).get(name) or []
        section[task] = {
            "score": float(metrics[key]) if key else None, "metric": key, "higher_is_better": bool(higher),
            "lm_eval_task": name, "metrics": clean,
            "num_samples": (out.get("n-samples") or {}).get(name, {}).get("effective"),
            "num_fewshot": (out.get("n-shot") or {}).get(name, num_fewshot),
            "subtasks": {s: {k: v for k, v in results.get(s, {}).items() if "," in k and isinstance(v, (int, float))}
                         for s in subtasks}}
    config = {"lm_eval_version": available(), "backend": backend, "preset": preset,
                          "num_fewshot": num_fewshot, "limit": limit, "model_args": {k: str(v) for k, v in args.items()},
                          "include_path": os.path.abspath(include_path) if include_path else None}
    return {"tasks": section, "config": config}
