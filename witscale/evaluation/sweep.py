"""The cells of a (λp, λr) sweep (slurm/sweep_weights.sh) and every metric of each, for tools/collect_sweep.py.

A cell ``<sweep>/lp<λp>_lr<λr>`` holds (each optional):
  cell.json          its weights (written when its training job starts)
  train_status.json  how its training job ended: completed | failed (exit code) | requeued
  metrics.jsonl      the trainer's records: the last eval record gives eval_response_nll and
                     eval_prompt_nll (no eval record: the last training record's response_nll/prompt_nll,
                     marked source "train"); eval_loss, each cell's own weighted objective, is not comparable
                     across cells and is left out
  eval_status.json   how its evaluation job ended: completed | failed
  eval_results.json  tools/evaluate.py's results: POSIX (overall and per variant kind) and benchmark scores,
                     with the parts that failed under "errors"

Every metric of every cell is one of: a value, **failed** (its training or the part of its evaluation that
produces it failed — never a zero), or **missing** (not run yet, or not run at all). The cells are those in
``cells.txt`` (the sweep's own list: a cell that never started is missing, not absent) and every cell
directory found.

The paper's summary: ``average`` = the mean of a cell's benchmark scores (every metric of eval_results.json
except POSIX), defined only where all of them are present (and shown only with two benchmarks or more); ``gain`` = the relative change over conventional
instruction tuning, the cell (λp, λr) = (0, 1), in percent and signed so that positive is better (lower
POSIX or NLL, higher score).

**WIT → DPO** (the paper's §4.2; slurm/sweep_dpo.sh): ``<sweep>/dpo`` is a sweep directory of its own, one cell
per SFT cell (same ``lp<λp>_lr<λr>`` name), each a DPO run started from — and referenced to — that cell's
exported model, evaluated like the SFT cells. Its cells also carry the objective's training metrics (each
objective's ``sweep_metrics``, witscale/training/objectives; DPO's ``reward_accuracy``: the fraction of pairs
whose chosen completion gets the larger implicit reward, ``reward_margin``: the mean reward of the chosen minus
the rejected, β·(logp − ref); from the last eval record, else the last training record, marked "train"). ``compare_dpo`` sets each cell's DPO result beside its SFT result: the evaluation
metrics both have (benchmarks, average, POSIX), the gain of DPO over its own SFT start, and the gain over DPO
on the IT cell — the paper's question is whether the best final models start from WIT cells.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from witscale.evaluation.results import read_json_dict

CELL_RE = re.compile(r"^lp([0-9.]+)_lr([0-9.]+)$")
# Held-out NLL per class: comparable across cells. (eval_loss is each cell's own weighted objective — its λ
# weights differ from cell to cell — so it is not compared here.)
NLL_METRICS = ("eval_response_nll", "eval_prompt_nll")
TRAIN_FALLBACK = {"eval_response_nll": "response_nll", "eval_prompt_nll": "prompt_nll"}
# Per-class held-out NLL (eval_nll_<class>; training records' nll_<class> as the fallback): comparable too.
CLASS_NLL_PREFIX = "eval_nll_"
# --learn-weights runs: the λ each learned group ended at (metrics.jsonl's lambda_<group>, the last training
# record): where the run's own tuning took it, reported beside the grid; not a quality, so no direction.
LEARNED_PREFIX = "lambda_"
IT_CELL = (0.0, 1.0)
AVERAGE = "average"
DPO_SUBDIR = "dpo"


def training_metrics() -> dict:
    """The objectives' own training metrics (``Objective.sweep_metrics``: metrics.jsonl name → higher is better;
    eval records prefix them with eval_). Measured on each objective's data, they compare cells of that
    objective with each other, never with SFT's."""
    from witscale.training.objectives import sweep_metrics
    return sweep_metrics()


def fmt_weight(x) -> str:
    """The sweep's spelling of a weight in directory names (as slurm/sweep_weights.sh): 1 → 1.0, 0.20 → 0.2."""
    s = f"{float(x):.6f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def cell_dir_name(prompt_weight, response_weight) -> str:
    return f"lp{fmt_weight(prompt_weight)}_lr{fmt_weight(response_weight)}"


@dataclass
class Value:
    state: str                        # "ok" | "failed" | "missing"
    value: Optional[float] = None
    note: str = ""                    # e.g. "train" (from a training record), the failure's reason

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass
class Cell:
    name: str
    prompt_weight: float
    response_weight: float
    status: str = "missing"           # ok | failed | running | missing
    detail: str = ""
    step: Optional[int] = None
    source: Optional[str] = None      # "eval" | "train": where the NLL metrics come from
    values: dict = field(default_factory=dict)      # metric → Value (the ones that have a value)
    failed_parts: dict = field(default_factory=dict)  # evaluation part ("posix", "tasks/mmlu") → reason
    train_failed: str = ""            # why training failed ('' if it did not)
    eval_failed: str = ""             # why the whole evaluation job failed ('' if it did not)

    @property
    def weights(self) -> tuple[float, float]:
        return (self.prompt_weight, self.response_weight)


def _last_records(path: str) -> tuple[Optional[dict], Optional[dict]]:
    last_train = last_eval = None
    try:
        f = open(path, encoding="utf-8")
    except OSError:
        return None, None
    with f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:      # a line cut by a kill
                continue
            if any(k.startswith("eval_") for k in rec):
                last_eval = rec
            elif "loss" in rec:
                last_train = rec
    return last_train, last_eval


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_cell(path: str, weights: Optional[tuple[float, float]] = None) -> Optional[Cell]:
    """One cell directory (None if it is not one)."""
    name = os.path.basename(os.path.normpath(path))
    meta = read_json_dict(os.path.join(path, "cell.json"))
    if meta is not None:
        weights = (float(meta["prompt_weight"]), float(meta["response_weight"]))
    elif weights is None and CELL_RE.match(name):
        m = CELL_RE.match(name)
        weights = (float(m.group(1)), float(m.group(2)))
    if weights is None:
        return None
    cell = Cell(name, weights[0], weights[1])
    if not os.path.isdir(path):
        cell.detail = "not started"
        return cell

    train = read_json_dict(os.path.join(path, "train_status.json")) or {}
    evals = read_json_dict(os.path.join(path, "eval_status.json")) or {}
    results = read_json_dict(os.path.join(path, "eval_results.json"))
    last_train, last_eval = _last_records(os.path.join(path, "metrics.jsonl"))

    for metric in NLL_METRICS:
        v = (last_eval or {}).get(metric)
        if _finite(v):
            cell.values[metric] = Value("ok", float(v))
            continue
        v = (last_train or {}).get(TRAIN_FALLBACK[metric])
        if _finite(v):
            cell.values[metric] = Value("ok", float(v), "train")
    for key, v in (last_eval or {}).items():
        if key.startswith(CLASS_NLL_PREFIX) and _finite(v):
            cell.values[key] = Value("ok", float(v))
    for key, v in (last_train or {}).items():
        name = CLASS_NLL_PREFIX + key[len("nll_"):]
        if key.startswith("nll_") and _finite(v) and name not in cell.values and not last_eval:
            cell.values[name] = Value("ok", float(v), "train")
    for metric in training_metrics():
        v = (last_eval or {}).get(f"eval_{metric}")
        if _finite(v):
            cell.values[metric] = Value("ok", float(v))
            continue
        v = (last_train or {}).get(metric)
        if _finite(v):
            cell.values[metric] = Value("ok", float(v), "train")
    for key, v in (last_train or {}).items():
        if key.startswith(LEARNED_PREFIX) and _finite(v):
            cell.values[key] = Value("ok", float(v), "train")
    cell.step = (last_eval or last_train or {}).get("step")
    cell.source = "eval" if last_eval else ("train" if last_train else None)
    for metric, m in ((results or {}).get("metrics") or {}).items():
        if isinstance(m, dict) and _finite(m.get("value")):
            cell.values[metric] = Value("ok", float(m["value"]))
    cell.failed_parts = {part: str(msg)[:300] for part, msg in ((results or {}).get("errors") or {}).items()}

    if train.get("state") == "failed":
        cell.train_failed = f"training failed (exit {train.get('exit_code', '?')})"
    if evals.get("state") == "failed" and not cell.failed_parts:
        cell.eval_failed = f"evaluation failed (exit {evals.get('exit_code', '?')})"

    trained = train.get("state") == "completed" or (not train and (last_train or last_eval) is not None)
    if cell.train_failed or cell.eval_failed or cell.failed_parts:
        cell.status = "failed"
        cell.detail = cell.train_failed or cell.eval_failed or \
            "evaluation failed: " + ", ".join(sorted(cell.failed_parts))
    elif trained:
        cell.status = "ok"
        if results is None and evals.get("state") != "completed" and train:
            cell.status, cell.detail = "running", "evaluation pending"
    elif last_train or last_eval:
        cell.status, cell.detail = "running", train.get("state") or "training"
    else:
        cell.detail = train.get("state") or "no metrics yet"
    return cell


def collect(sweep_dir: str) -> list[Cell]:
    """Every cell of the sweep: those in cells.txt (in its order), then any other cell directory."""
    cells, seen = [], set()
    listed = os.path.join(sweep_dir, "cells.txt")
    if os.path.exists(listed):
        with open(listed, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    p, r = float(parts[0]), float(parts[1])
                    name = cell_dir_name(p, r)
                    cell = read_cell(os.path.join(sweep_dir, name), (p, r))
                    if cell is not None and name not in seen:
                        cells.append(cell)
                        seen.add(name)
    for name in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, name)
        if name not in seen and os.path.isdir(path):
            cell = read_cell(path)
            if cell is not None:
                cells.append(cell)
                seen.add(name)
    return cells


@dataclass
class Metric:
    name: str
    higher_is_better: bool
    kind: str                     # "nll" | "posix" | "benchmark" | "average" | "training" (an objective's) |
                                  # "learned" (--learn-weights' final λ)


def metrics_of(sweep_dir: str, cells: list[Cell]) -> list[Metric]:
    """The metrics present in any cell, in report order: benchmarks, average, POSIX, held-out NLL, the
    objectives' training metrics."""
    own = training_metrics()
    directions: dict[str, bool] = {}
    for c in cells:
        res = read_json_dict(os.path.join(sweep_dir, c.name, "eval_results.json")) or {}
        for name, m in (res.get("metrics") or {}).items():
            directions.setdefault(name, bool(m.get("higher_is_better", True)))
        for part in (res.get("errors") or {}):
            if part.startswith("tasks/"):
                directions.setdefault(part.split("/", 1)[1], True)
            elif part == "posix":
                directions.setdefault("posix", False)
    names = {m for c in cells for m in c.values if not m.startswith("_")}
    bench = sorted(n for n in names | set(directions)
                   if n not in NLL_METRICS and n not in own
                   and not n.startswith(("posix", CLASS_NLL_PREFIX, LEARNED_PREFIX)))
    posix = sorted((n for n in names | set(directions) if n.startswith("posix")), key=lambda n: (n != "posix", n))
    out = [Metric(n, directions.get(n, True), "benchmark") for n in bench]
    if len(bench) > 1:
        out.append(Metric(AVERAGE, True, "average"))
    out += [Metric(n, False, "posix") for n in posix]
    out += [Metric(n, False, "nll") for n in NLL_METRICS if n in names]
    out += [Metric(n, False, "nll") for n in sorted(n for n in names if n.startswith(CLASS_NLL_PREFIX))]
    out += [Metric(n, higher, "training") for n, higher in own.items() if n in names]
    out += [Metric(n, True, "learned") for n in sorted(n for n in names if n.startswith(LEARNED_PREFIX))]
    return out


def duplicate_metrics(table: "Table") -> dict:
    """metric → the earlier metric whose value it equals in every cell (e.g. posix_given = posix when the
    evaluation has one variant kind): shown once, not as a second panel."""
    same = {}
    for k, m in enumerate(table.metrics):
        mine = [table.values[(c.name, m.name)] for c in table.cells]
        if not any(v.ok for v in mine):
            continue
        for earlier in table.metrics[:k]:
            if earlier.name in same:
                continue
            theirs = [table.values[(c.name, earlier.name)] for c in table.cells]
            if all((a.state, a.value) == (b.state, b.value) for a, b in zip(mine, theirs)):
                same[m.name] = earlier.name
                break
    return same


def equivalent_cells(sweep_dir: str, cells: list[Cell]) -> list[list[Cell]]:
    """Groups (two cells or more) that train the same model by construction (docs/objective.md, "Scale and
    clipping"): scaling (λp, λr) by c leaves training unchanged under weight_sum, and under nonzero or tokens
    when there is no gradient clipping (AdamW ignores a constant gradient factor, up to its ε) — so only the
    ratio λp:λr matters, e.g. every (0, λr) cell equals the IT cell (0, 1). A cell's normalization, clipping
    and class overrides come from its effective_config.json (defaults — nonzero, no clipping — if absent);
    cells with class overrides (fixed weights that do not scale), and cells of an objective for which scaling
    the weights changes training (``Objective.weight_ratio_invariant`` false, e.g. DPO), are never grouped."""
    from witscale.training.objectives import find_objective
    groups: dict = {}
    for c in cells:
        if c.train_failed:
            continue
        eff = read_json_dict(os.path.join(sweep_dir, c.name, "effective_config.json")) or {}
        args = eff.get("args") if isinstance(eff.get("args"), dict) else {}
        norm = args.get("normalization") or "nonzero"
        clip = args.get("clip_grad")
        objective = find_objective(args.get("objective") or "sft")
        if args.get("class_weights") or objective is None or not objective.weight_ratio_invariant:
            continue
        if norm != "weight_sum" and clip not in (None, 0, 0.0):
            continue
        p, r = c.prompt_weight, c.response_weight
        if p == 0 and r == 0:
            continue
        ratio = round(p / r, 9) if r else math.inf
        key = (ratio, norm, None if norm == "weight_sum" else clip,
               args.get("seed", 0), args.get("lr"), args.get("max_steps"), args.get("epochs"))
        groups.setdefault(key, []).append(c)
    return [sorted(g, key=lambda c: c.weights) for g in groups.values() if len(g) > 1]


def value_of(cell: Cell, metric: Metric, bench: list[str]) -> Value:
    """A cell's value of a metric: its number, failed (why), or missing."""
    if metric.kind == "average":
        vals = [value_of(cell, Metric(b, True, "benchmark"), bench) for b in bench]
        if any(v.state == "failed" for v in vals):
            return Value("failed", None, "a benchmark failed")
        if not vals or any(v.state == "missing" for v in vals):
            return Value("missing")
        return Value("ok", sum(v.value for v in vals) / len(vals))
    if cell.train_failed:                     # partial numbers of a failed run are not results
        return Value("failed", None, cell.train_failed)
    if metric.name in cell.values:
        return cell.values[metric.name]
    if metric.kind not in ("nll", "training", "learned"):    # no evaluation part produces these
        part = "posix" if metric.kind == "posix" else f"tasks/{metric.name}"
        if part in cell.failed_parts:
            return Value("failed", None, cell.failed_parts[part])
        if cell.eval_failed:
            return Value("failed", None, cell.eval_failed)
    return Value("missing")


def gain(v: Value, it: Value, higher_is_better: bool) -> Optional[float]:
    """Relative change over the IT cell in %, positive = better; None without both values."""
    if not (v.ok and it.ok) or it.value == 0:
        return None
    change = (v.value - it.value) / abs(it.value) * 100.0
    return (change if higher_is_better else -change) + 0.0      # + 0.0: no "-0.0" for the IT cell


def gain_text(g: Optional[float]) -> str:
    """A gain as the report prints it: one decimal, and a gain that rounds to zero without a sign (not "-0.0%")."""
    if g is None:
        return "—"
    shown = round(g, 1)
    return "0.0%" if shown == 0 else f"{shown:+.1f}%"


@dataclass
class Table:
    """Everything the report shows: cells, metrics, values, gains over IT and the best cell per metric."""
    cells: list[Cell]
    metrics: list[Metric]
    values: dict                        # (cell name, metric name) → Value
    gains: dict                         # (cell name, metric name) → float | None
    best: dict                          # metric name → cell name | None
    it: Optional[str]                   # the IT cell's name, if in the grid

    @property
    def prompt_weights(self) -> list[float]:
        return sorted({c.prompt_weight for c in self.cells})

    @property
    def response_weights(self) -> list[float]:
        return sorted({c.response_weight for c in self.cells})

    def cell_at(self, p: float, r: float) -> Optional[Cell]:
        return next((c for c in self.cells if math.isclose(c.prompt_weight, p) and math.isclose(c.response_weight, r)),
                    None)


def build_table(sweep_dir: str, cells: Optional[list[Cell]] = None) -> Table:
    cells = collect(sweep_dir) if cells is None else cells
    metrics = metrics_of(sweep_dir, cells)
    bench = [m.name for m in metrics if m.kind == "benchmark"]
    values = {(c.name, m.name): value_of(c, m, bench) for c in cells for m in metrics}
    it = next((c.name for c in cells if math.isclose(c.prompt_weight, IT_CELL[0])
               and math.isclose(c.response_weight, IT_CELL[1])), None)
    gains, best = {}, {}
    for m in metrics:
        it_value = values[(it, m.name)] if it else Value("missing")
        directed = m.kind != "learned"             # a learned λ is where a run went, neither better nor worse
        for c in cells:
            gains[(c.name, m.name)] = gain(values[(c.name, m.name)], it_value, m.higher_is_better) if directed else None
        ok = [(values[(c.name, m.name)].value, c.name) for c in cells if values[(c.name, m.name)].ok]
        best[m.name] = (max(ok) if m.higher_is_better else min(ok))[1] if ok and directed else None
    return Table(cells, metrics, values, gains, best, it)


# --------------------------------------------------------------------------------------------- WIT → DPO
@dataclass
class DPOComparison:
    """Each SFT cell's DPO run beside it (``<sweep>/dpo``, see the module docstring)."""
    table: Table                        # the DPO cells' own table: gains there are over DPO on the IT cell
    metrics: list[Metric]               # evaluation metrics both grids have (benchmarks, average, POSIX)
    sft: dict                           # (cell name, metric name) → Value of the SFT model
    dpo: dict                           # (cell name, metric name) → Value of the DPO model started from it
    gain_over_sft: dict                 # (cell name, metric name) → % (positive = DPO better) | None

    @property
    def cells(self) -> list[Cell]:
        return self.table.cells

    @property
    def training_metrics(self) -> list[Metric]:
        return [m for m in self.table.metrics if m.kind == "training"]


def dpo_dir(sweep_dir: str) -> str:
    return os.path.join(sweep_dir, DPO_SUBDIR)


def compare_dpo(sweep_dir: str, sft: Table) -> Optional[DPOComparison]:
    """The WIT → DPO comparison, or None when the sweep has no DPO cells."""
    path = dpo_dir(sweep_dir)
    if not os.path.isdir(path):
        return None
    cells = collect(path)
    if not cells:
        return None
    table = build_table(path, cells)
    sft_metrics = {m.name: m for m in sft.metrics}
    shared = [m for m in table.metrics if m.kind in ("benchmark", "average", "posix") and m.name in sft_metrics]
    sft_values, dpo_values, gains = {}, {}, {}
    for c in cells:
        base = sft.cell_at(c.prompt_weight, c.response_weight)
        for m in shared:
            s = sft.values[(base.name, m.name)] if base else Value("missing")
            d = table.values[(c.name, m.name)]
            sft_values[(c.name, m.name)], dpo_values[(c.name, m.name)] = s, d
            gains[(c.name, m.name)] = gain(d, s, m.higher_is_better)
    return DPOComparison(table, shared, sft_values, dpo_values, gains)
