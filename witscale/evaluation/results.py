"""``eval_results.json``: one file per model, the sections of every evaluation run on it.

    {"schema": 1, "model": …, "updated": …,
     "metrics": {"posix": {"value": …, "higher_is_better": false}, "posix_spelling": …, "mmlu": …},   # flat
     "posix": {"posix": …, "posix_by_kind": {…}, "posix_max_new_tokens": …, "sets": [per-set results]},
     "tasks": {"mmlu": {"score": …, "metric": "acc,none", "higher_is_better": true, "metrics": {…}}, …},
     "lm_eval": {settings of the last benchmark run},
     "generations": {"alpaca_eval": "alpaca_eval/model_outputs.json", "mt_bench": "mt_bench/model_answer/….jsonl"},
     "errors": {"posix": "…", "tasks/ifeval": "…"},          # what failed, by part
     "settings": {…}, "timing_s": {…}}

A later run on the same directory merges into the file: the parts it ran replace theirs (a task at a time),
the others stay. ``metrics`` is recomputed from the sections on every write; it is what
tools/collect_sweep.py reads. The file is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

RESULTS_FILE = "eval_results.json"
SCHEMA = 1


def read_json_dict(path: str) -> Optional[dict]:
    """A JSON object from ``path``; None when the file is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_results(path: str) -> Optional[dict]:
    """The results in a file or directory; None when there are none (or the file is unreadable)."""
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_FILE)
    return read_json_dict(path)


def flat_metrics(results: dict) -> dict:
    """name → {"value", "higher_is_better"}: POSIX (overall and per variant kind) and each task's score."""
    out = {}
    posix = results.get("posix")
    if isinstance(posix, dict) and posix.get("posix") is not None:
        out["posix"] = {"value": posix["posix"], "higher_is_better": False}
        for kind, v in sorted((posix.get("posix_by_kind") or {}).items()):
            out[f"posix_{kind}"] = {"value": v, "higher_is_better": False}
    for task, r in sorted((results.get("tasks") or {}).items()):
        if isinstance(r, dict) and r.get("score") is not None:
            out[task] = {"value": r["score"], "higher_is_better": bool(r.get("higher_is_better", True))}
    return out


def merge_results(old: Optional[dict], new: dict) -> dict:
    merged = dict(old or {})
    for key, value in new.items():
        if key in ("tasks", "generations", "timing_s") and isinstance(value, dict):
            merged[key] = {**(merged.get(key) or {}), **value}
        elif key == "errors":
            continue
        else:
            merged[key] = value
    # errors: those of the parts this run attempted are replaced by this run's outcome
    errors = dict(merged.get("errors") or {})
    for part in new.get("attempted", []):
        errors = {k: v for k, v in errors.items() if k != part and not k.startswith(part + "/")}
    errors.update(new.get("errors") or {})
    merged["errors"] = errors
    merged.pop("attempted", None)
    merged["schema"] = SCHEMA
    merged["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    merged["metrics"] = flat_metrics(merged)
    return merged


def write_results(out_dir: str, new: dict) -> str:
    """Merge ``new`` into ``out_dir/eval_results.json`` (see the module doc); returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RESULTS_FILE)
    merged = merge_results(read_results(path), new)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(merged, f, ensure_ascii=False, indent=1, default=str)
    os.replace(tmp, path)
    return path
