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


def task_manager(tasks: Sequence[str], preset: str = "paper", include_path: Optional[str] = None):
    """lm-eval's TaskManager that knows every task (after the preset's aliases); a ValueError names the first
    unknown one. Only the local tasks are indexed when they are all that is asked for (lm-eval's own index
    of ~15k tasks takes seconds)."""
    if available() is None:
        raise HarnessUnavailable("lm-eval is not installed: pip install 'witscale[eval]' (or lm-eval)")
    from lm_eval.tasks import TaskManager

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    names = [PRESETS[preset]["aliases"].get(t, t) for t in tasks]
    manager = None
    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(n not in manager.all_tasks for n in names):
            manager = TaskManager(include_path=include_path)
    else:
        manager = TaskManager()
    unknown = [t for t, n in zip(tasks, names) if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {unknown[0]!r}" + (f" (nor {include_path})" if include_path else ""))
    return manager


def _task_result(out: dict, name: str, num_fewshot, preferred: Optional[str]) -> dict:
    results = dict(out.get("results", {}))
    results.update({k: v for k, v in (out.get("groups") or {}).items() if k not in results})
    metrics = results.get(name)
    if metrics is None:
        return {"error": f"lm-eval returned no result for {name}"}
    key = primary_metric(metrics, preferred)
    metric = _metric_parts(key)[0] if key else None
    higher = (out.get("higher_is_better") or {}).get(name, {}).get(metric, True) if metric else True
    subtasks = (out.get("group_subtasks") or {}).get(name) or []
    numeric = lambda d: {k: v for k, v in d.items() if "," in k and isinstance(v, (int, float))}  # noqa: E731
    return {"score": float(metrics[key]) if key else None, "metric": key, "higher_is_better": bool(higher),
            "lm_eval_task": name, "metrics": numeric(metrics),
            "num_samples": (out.get("n-samples") or {}).get(name, {}).get("effective"),
            "num_fewshot": (out.get("n-shot") or {}).get(name, num_fewshot),
            "subtasks": {t: numeric(results.get(t, {})) for t in subtasks}}


def run_tasks(model_dir: str, tasks: Sequence[str], *, preset: str = "paper", include_path: Optional[str] = None,
              manager=None, tokenizer: Optional[str] = None, num_fewshot: Optional[int] = None,
              limit: Optional[int] = None, batch_size="auto", device: str = "cpu", dtype: str = "float32",
              backend: str = "hf", add_bos: bool = True, task_metrics: Optional[dict] = None,
              model_args: Optional[dict] = None, device_count: int = 1) -> Optional[dict]:
    """Run lm-eval, the model loaded once and each task on its own (a task that fails is recorded under its
    name with ``error``; the others run): ``{"tasks": {name: result}, "config": …}``, or None on ranks other
    than 0 of a distributed HF run."""
    import lm_eval
    from lm_eval.api.registry import get_model

    manager = manager or task_manager(tasks, preset, include_path)
    if num_fewshot is None:
        num_fewshot = PRESETS[preset]["num_fewshot"]
    resolved = {t: PRESETS[preset]["aliases"].get(t, t) for t in tasks}
    args = model_args_for(backend, model_dir, tokenizer=tokenizer, dtype=dtype, add_bos=add_bos,
                          device_count=device_count, extra=model_args)
    lm = get_model(backend).create_from_arg_obj(
        args, {"batch_size": batch_size, "max_batch_size": 64, "device": device} if backend == "hf"
        else {"batch_size": batch_size})
    section = {}
    for task, name in resolved.items():
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=0,
                                          apply_chat_template=False)
        except Exception as e:              # noqa: BLE001 - one task's failure must not cost the others
            section[task] = {"error": f"{type(e).__name__}: {e}", "lm_eval_task": name}
            continue
        if out is not None:
            section[task] = _task_result(out, name, num_fewshot, (task_metrics or {}).get(task))
    if getattr(lm, "rank", 0) != 0:
        return None
    config = {"lm_eval_version": available(), "backend": backend, "preset": preset, "num_fewshot": num_fewshot,
              "limit": limit, "model_args": {k: str(v) for k, v in args.items()}, "batch_size": str(batch_size),
              "include_path": os.path.abspath(include_path) if include_path else None}
    return {"tasks": section, "config": config}
