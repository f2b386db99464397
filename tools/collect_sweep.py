#!/usr/bin/env python3
"""Gather every metric of every cell of a (λp, λr) sweep (slurm/sweep_weights.sh) into the paper's report.

    python tools/collect_sweep.py runs/sweep [--metric eval_response_nll] [--out DIR]

Metrics per cell (witscale/evaluation/sweep.py): held-out NLL from the trainer's last eval record
(eval_response_nll, eval_prompt_nll, per class eval_nll_<class>; --learn-weights cells: the final λ of each learned
group, lambda_<group>; without an eval record the last training value, marked "(train)"; not
eval_loss, each cell's own weighted objective, which does not compare across cells), and from
tools/evaluate.py's eval_results.json: POSIX (overall and per variant kind; lower is more robust) and each
benchmark's score. Plus the paper's summary: the **average** of the benchmark scores (with two benchmarks or
more) and each cell's **relative gain over conventional instruction tuning**, the cell (λp, λr) = (0, 1), in
%, positive = better. A cell that failed (training or evaluation) or has not run is shown as such — FAILED or
missing, never a number; (0, 0) is the base model ("base").

Writes into --out (default: the sweep directory):

    sweep_report.md    the report: cell states, one table per metric (value and gain; IT cell and best
                       cell marked), a summary of the best cell per metric (also printed)
    sweep_figure.png   one heatmap per metric and the average, in one figure like the paper's (rows λp,
                       columns λr; IT cell boxed in black, best cell in red; failed cells hatched; each cell's
                       value and gain printed; colour: the gain over IT, diverging around the IT cell, at least
                       ±1% wide); a metric equal to another in every cell (posix_given with one variant kind)
                       is shown once; cells identical by construction (only λp:λr matters) are noted
    sweep_cells.csv    one line per cell: weights, state, every metric, the average and every gain
    sweep_grid.csv     --metric as a λp × λr matrix ("" missing, FAILED failed)
    sweep_grid.md      --metric as a markdown table
    sweep_grid.png     --metric alone as a heatmap

With DPO on top of the cells (slurm/sweep_dpo.sh: ``<sweep>/dpo/lp<λp>_lr<λr>``, the paper's WIT → DPO),
the report adds a section "WIT → DPO": per cell and evaluation metric the SFT value, the DPO value, DPO's gain
over its own SFT start and over DPO on the IT cell, and the objective's training metrics (its
``sweep_metrics``, witscale/training/objectives: DPO's reward accuracy and margin);
sweep_cells.csv gains dpo_* columns, and sweep_dpo_figure.png shows the DPO grid. ``collect_sweep.py
<sweep>/dpo`` reports the DPO cells alone, like any sweep.

The figures use matplotlib when installed, else plain PNGs written with zlib (colours only; the numbers
are in the markdown).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import struct
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from witscale.evaluation.sweep import (IT_CELL, DPOComparison, Table, Value, build_table, collect,  # noqa: E402
                                       compare_dpo, duplicate_metrics, equivalent_cells, gain_text)

# Colour scales: with the IT cell in the grid a panel is coloured by the gain over IT on a diverging scale
# centred on IT (0%), symmetric, at least ±GAIN_FLOOR % wide so that a 0.1% difference stays pale instead of
# reading as full contrast; without it, by value, on a scale at least GAIN_FLOOR % of the mean wide.
GAIN_FLOOR = 1.0


def _fmt(w: float) -> str:
    return f"{w:g}" if w != int(w) else f"{w:.1f}"


def _num(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"


def _arrow(metric) -> str:
    if metric.kind == "learned":
        return "the λ --learn-weights ended at; no direction"
    return "higher is better" if metric.higher_is_better else "lower is better"


def cell_text(table: Table, p: float, r: float, metric, markdown: bool = True) -> str:
    cell = table.cell_at(p, r)
    if cell is None:
        return "base" if p == 0 and r == 0 else ""
    v = table.values[(cell.name, metric.name)]
    if v.state == "failed":
        return "FAILED"
    if v.state == "missing":
        return "missing"
    text = _num(v.value) + (" (train)" if v.note == "train" else "")
    g = table.gains.get((cell.name, metric.name))
    if cell.name == table.it:
        text += " [IT]"
    elif g is not None:
        text += f" ({gain_text(g)})"
    if table.best.get(metric.name) == cell.name and markdown:
        text = f"**{text}** ★"
    return text


def metric_markdown(table: Table, metric) -> str:
    ps, rs = table.prompt_weights, table.response_weights
    lines = [f"### {metric.name} ({_arrow(metric)})", "",
             "| λp \\ λr | " + " | ".join(_fmt(r) for r in rs) + " |", "|---" * (len(rs) + 1) + "|"]
    for p in ps:
        lines.append(f"| {_fmt(p)} | " + " | ".join(cell_text(table, p, r, metric) for r in rs) + " |")
    return "\n".join(lines) + "\n"


def _value_text(v: Value) -> str:
    if v.state == "failed":
        return "FAILED"
    if v.state == "missing":
        return "missing"
    return _num(v.value) + (" (train)" if v.note == "train" else "")


def _gain_text(g) -> str:
    return gain_text(g)


def dpo_markdown(cmp: DPOComparison) -> list[str]:
    """The WIT → DPO section: each cell's DPO model beside its SFT start."""
    t = cmp.table
    states = {}
    for c in t.cells:
        states[c.status] = states.get(c.status, 0) + 1
    out = ["## WIT → DPO: DPO on top of each cell", "",
           f"{len(t.cells)} DPO runs ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}), each started "
           f"from its cell's exported SFT model, which is also its reference (`{os.path.join('dpo', 'lp…_lr…')}`). "
           "*vs SFT*: the DPO model's gain over its own SFT start; *vs IT→DPO*: over DPO on the IT cell "
           "(positive = better; **bold ★**: the best DPO model of the metric).", ""]
    order = sorted(t.cells, key=lambda c: c.weights)
    if cmp.metrics:     # the paper's question: do the best final (DPO) models start from WIT cells?
        out += ["| metric | best DPO model: cell (λp, λr) | value | IT→DPO | gain over IT→DPO |", "|---|---|---|---|---|"]
        for m in cmp.metrics:
            b = t.best.get(m.name)
            itv = t.values.get((t.it, m.name)) if t.it else None
            it_text = _value_text(itv) if itv else "—"
            if b is None:
                out.append(f"| {m.name} | — | — | {it_text} | — |")
                continue
            bc = next(c for c in t.cells if c.name == b)
            out.append(f"| {m.name} ({'↑' if m.higher_is_better else '↓'}) | ({_fmt(bc.prompt_weight)}, "
                       f"{_fmt(bc.response_weight)}) | {_value_text(t.values[(b, m.name)])} | {it_text} | "
                       f"{_gain_text(t.gains.get((b, m.name)))} |")
        out.append("")
    for m in cmp.metrics:
        out += [f"### DPO {m.name} ({_arrow(m)})", "", "| λp | λr | SFT | DPO | vs SFT | vs IT→DPO |",
                "|---|---|---|---|---|---|"]
        for c in order:
            d = cmp.dpo[(c.name, m.name)]
            dpo_text = _value_text(d)
            if t.best.get(m.name) == c.name:
                dpo_text = f"**{dpo_text}** ★"
            vs_it = "[IT]" if c.name == t.it else _gain_text(t.gains.get((c.name, m.name)))
            out.append(f"| {_fmt(c.prompt_weight)} | {_fmt(c.response_weight)} | {_value_text(cmp.sft[(c.name, m.name)])} "
                       f"| {dpo_text} | {_gain_text(cmp.gain_over_sft[(c.name, m.name)])} | {vs_it} |")
        out.append("")
    if not cmp.metrics:
        out += ["No evaluation metric that both the SFT and the DPO models have (yet).", ""]
    train = cmp.training_metrics
    if train:
        # The objective's own metrics (Objective.sweep_metrics), each with its declared direction.
        directions = sorted({_arrow(m) for m in train})
        out += [f"### DPO training metrics (on the preference data; {', '.join(directions)})", "",
                "| λp | λr | " + " | ".join(m.name for m in train) + " |", "|---|---|" + "---|" * len(train)]
        for c in order:
            out.append(f"| {_fmt(c.prompt_weight)} | {_fmt(c.response_weight)} | "
                       + " | ".join(_value_text(t.values[(c.name, m.name)]) for m in train) + " |")
        out.append("")
    out += ["### DPO runs", "", "| λp | λr | directory | state | detail |", "|---|---|---|---|---|"]
    for c in order:
        out.append(f"| {_fmt(c.prompt_weight)} | {_fmt(c.response_weight)} | dpo/{c.name} | {c.status} | {c.detail or ''} |")
    return out + [""]


def report_markdown(table: Table, sweep_dir: str, dpo: DPOComparison | None = None) -> str:
    states = {}
    for c in table.cells:
        states[c.status] = states.get(c.status, 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    it = table.it
    out = [f"# Sweep report: {os.path.abspath(sweep_dir)}", "",
           f"{len(table.cells)} cells ({counts}). Conventional instruction tuning (IT) is the cell "
           f"(λp, λr) = ({_fmt(IT_CELL[0])}, {_fmt(IT_CELL[1])})" + ("" if it else " — not in this sweep: no gains") + ".",
           "Each value is followed by its relative gain over IT in % (positive = better); **bold ★** is the "
           "best cell of the metric, [IT] the IT cell. FAILED: the cell's training or this part of its "
           "evaluation failed; missing: not run (yet). *average* is the mean of the benchmark scores.", ""]
    out += ["## Best cell per metric", "", "| metric | best cell (λp, λr) | value | IT value | gain over IT |",
            "|---|---|---|---|---|"]
    duplicates = duplicate_metrics(table)
    for m in table.metrics:
        if m.name in duplicates:
            continue
        b = table.best.get(m.name)
        itv = table.values.get((it, m.name)) if it else None
        if b is None:
            out.append(f"| {m.name} | — | — | {_num(itv.value) if itv and itv.ok else '—'} | — |")
            continue
        bc = next(c for c in table.cells if c.name == b)
        g = table.gains.get((b, m.name))
        out.append(f"| {m.name} ({'↑' if m.higher_is_better else '↓'}) | ({_fmt(bc.prompt_weight)}, "
                   f"{_fmt(bc.response_weight)}) | {_num(table.values[(b, m.name)].value)} | "
                   f"{_num(itv.value) if itv and itv.ok else '—'} | {gain_text(g)} |")
    out += ["", "## Metrics (rows λp, columns λr)", ""]
    if duplicates:
        out += ["Not shown twice (equal in every cell): " + "; ".join(
            f"`{a}` = `{b}`" + (" (one variant kind)" if a.startswith("posix_") and b == "posix" else "")
            for a, b in duplicates.items()) + ".", ""]
    groups = equivalent_cells(sweep_dir, table.cells)
    if groups:
        out += ["**Cells identical by construction.** Scaling (λp, λr) by c trains the same model under the "
                "`weight_sum` normalization, and under `nonzero` (the default) or `tokens` without gradient "
                "clipping — AdamW ignores a constant gradient factor, up to its ε (docs/objective.md, \"Scale "
                "and clipping\") — so only the ratio λp:λr matters, and every (0, λr) cell is the IT cell "
                "(0, 1). What differs between these cells comes from AdamW's ε and floating-point rounding, not from "
                "the weights:", ""]
        out += ["- " + " = ".join(f"({_fmt(c.prompt_weight)}, {_fmt(c.response_weight)})"
                                  + (" [IT]" if c.name == table.it else "") for c in g) for g in groups]
        out.append("")
    for m in table.metrics:
        if m.name not in duplicates:
            out += [metric_markdown(table, m)]
    out += ["## Cells", "", "| λp | λr | directory | state | detail |", "|---|---|---|---|---|"]
    for c in sorted(table.cells, key=lambda c: c.weights):
        out.append(f"| {_fmt(c.prompt_weight)} | {_fmt(c.response_weight)} | {c.name} | {c.status} | "
                   f"{c.detail or ''} |")
    if dpo is not None:
        out += [""] + dpo_markdown(dpo)
    return "\n".join(out) + "\n"


def _csv_value(v: Value):
    return v.value if v.ok else ("FAILED" if v.state == "failed" else "")


def _csv_gain(g):
    return "" if g is None else g


def write_csvs(table: Table, metric, out_dir: str, dpo: DPOComparison | None = None) -> None:
    names = [m.name for m in table.metrics]
    # With DPO runs: their state, every metric of the DPO grid, DPO's gain over its SFT start (dpo_gain_*) and
    # over DPO on the IT cell (dpo_gain_it_*), after the SFT columns (whose order stays as without DPO).
    dpo_names = [m.name for m in dpo.table.metrics] if dpo else []
    compared = {m.name for m in dpo.metrics} if dpo else set()
    dpo_header = (["dpo_state", "dpo_detail", *[f"dpo_{n}" for n in dpo_names],
                   *[f"dpo_gain_{n}" for n in dpo_names if n in compared], *[f"dpo_gain_it_{n}" for n in dpo_names]]
                  if dpo else [])
    with open(os.path.join(out_dir, "sweep_cells.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt_weight", "response_weight", "dir", "state", "detail", "step", "source", *names,
                    *[f"gain_{n}" for n in names], *dpo_header])
        for c in sorted(table.cells, key=lambda c: c.weights):
            vals = [_csv_value(table.values[(c.name, n)]) for n in names]
            gains = [_csv_gain(table.gains[(c.name, n)]) for n in names]
            extra = []
            if dpo:
                d = dpo.table.cell_at(c.prompt_weight, c.response_weight)
                if d is None:
                    extra = ["", ""] + [""] * (len(dpo_header) - 2)
                else:
                    extra = [d.status, d.detail, *[_csv_value(dpo.table.values[(d.name, n)]) for n in dpo_names],
                             *[_csv_gain(dpo.gain_over_sft[(d.name, n)]) for n in dpo_names if n in compared],
                             *[_csv_gain(dpo.table.gains[(d.name, n)]) for n in dpo_names]]
            w.writerow([c.prompt_weight, c.response_weight, c.name, c.status, c.detail, c.step, c.source, *vals, *gains,
                        *extra])
    if metric is None:
        return
    with open(os.path.join(out_dir, "sweep_grid.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([f"{metric.name}: lp \\ lr", *[_fmt(r) for r in table.response_weights]])
        for p in table.prompt_weights:
            row = []
            for r in table.response_weights:
                cell = table.cell_at(p, r)
                v = table.values[(cell.name, metric.name)] if cell else Value("missing")
                row.append(v.value if v.ok else ("FAILED" if v.state == "failed" else ""))
            w.writerow([_fmt(p), *row])


# ------------------------------------------------------------------------------------------------ figures
_VIRIDIS = [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
            (53, 183, 121), (110, 206, 88), (181, 222, 43), (253, 231, 37)]


def _colour(t: float):
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))


def _write_png(path: str, pixels: list[list[tuple]]) -> None:
    h, w = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _matrix(table: Table, metric):
    """[len(ps)][len(rs)] of Value (None where the grid has no cell)."""
    out = []
    for p in table.prompt_weights:
        row = []
        for r in table.response_weights:
            cell = table.cell_at(p, r)
            row.append(table.values[(cell.name, metric.name)] if cell else None)
        out.append(row)
    return out


def _plain_png(table: Table, metrics, path: str) -> None:
    """Panels side by side, one 32-px square per cell, λp rows bottom-up; brighter = better; light grey:
    missing; dark grey and white stripes: failed."""
    size, gap = 32, 16
    ps, rs = table.prompt_weights, table.response_weights
    height = size * len(ps)
    rows = [[(255, 255, 255)] * 0 for _ in range(height)]
    for k, m in enumerate(metrics):
        mat = _matrix(table, m)
        vals = [v.value for row in mat for v in row if v is not None and v.ok]
        scale = _scale(table, m, vals)
        for i, p in enumerate(reversed(range(len(ps)))):
            for y in range(size):
                line = rows[i * size + y]
                if k:
                    line += [(255, 255, 255)] * gap
                for j in range(len(rs)):
                    v = mat[p][j]
                    for x in range(size):
                        if v is None or v.state == "missing":
                            c = (215, 215, 215)
                        elif v.state == "failed":
                            c = (90, 90, 90) if (x + y) % 8 < 4 else (240, 240, 240)
                        else:
                            cell = table.cell_at(ps[p], rs[j])
                            c = _scale_colour(scale, v.value, table.gains.get((cell.name, m.name)), m)
                        line.append(c)
    _write_png(path, rows)


def _scale(table: Table, metric, values) -> tuple:
    """("gain", half-width in %) — a diverging scale centred on the IT cell — or ("value", lo, hi)."""
    it = table.values.get((table.it, metric.name)) if table.it else None
    if it is not None and it.ok and it.value != 0:
        gains = [g for (cell, name), g in table.gains.items() if name == metric.name and g is not None]
        return ("gain", max([GAIN_FLOOR] + [abs(g) for g in gains]))
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    floor = abs((lo + hi) / 2) * GAIN_FLOOR / 100 or 1.0
    if hi - lo < floor:
        mid = (lo + hi) / 2
        lo, hi = mid - floor / 2, mid + floor / 2
    return ("value", lo, hi)


def _diverging(t: float):
    """t in [-1, 1]: red (worse) — white (as IT) — blue (better)."""
    red, white, blue = (178, 24, 43), (247, 247, 247), (33, 102, 172)
    t = min(max(t, -1.0), 1.0)
    a, b, f = (white, blue, t) if t >= 0 else (white, red, -t)
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))


def _scale_colour(scale, value, g, metric):
    if scale[0] == "gain":
        return _diverging((g or 0.0) / scale[1])
    t = (value - scale[1]) / (scale[2] - scale[1])
    return _colour(t if metric.higher_is_better else 1.0 - t)


def heatmaps(table: Table, metrics, path: str, title: str = "") -> str:
    """One heatmap per metric in one figure; returns which renderer wrote it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        _plain_png(table, metrics, path)
        return "zlib"
    import numpy as np

    ps, rs = table.prompt_weights, table.response_weights
    n = len(metrics)
    cols = min(n, 4)
    rows_n = math.ceil(n / cols)
    w, h = 1.2 + 0.85 * len(rs), 1.2 + 0.7 * len(ps)
    fig, axes = plt.subplots(rows_n, cols, figsize=(w * cols, h * rows_n), squeeze=False)
    for k, m in enumerate(metrics):
        ax = axes[k // cols][k % cols]
        mat = _matrix(table, m)
        data = np.array([[v.value if (v is not None and v.ok) else np.nan for v in row] for row in mat], dtype=float)
        scale = _scale(table, m, [x for x in data.flat if np.isfinite(x)])
        if scale[0] == "gain":      # colour = gain over IT, centred on IT; the values are printed in the cells
            shown = np.array([[table.gains.get((table.cell_at(p, r).name, m.name)) if np.isfinite(data[i][j])
                               and table.cell_at(p, r) else None for j, r in enumerate(rs)] for i, p in enumerate(ps)],
                             dtype=float)
            cmap = plt.get_cmap("RdBu").copy()
            vmin, vmax = -scale[1], scale[1]
        else:
            shown = data
            cmap = plt.get_cmap("viridis" if m.higher_is_better else "viridis_r").copy()
            vmin, vmax = scale[1], scale[2]
        cmap.set_bad((0.88, 0.88, 0.88))
        im = ax.imshow(shown, origin="lower", cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(rs)), [_fmt(r) for r in rs], fontsize=7)
        ax.set_yticks(range(len(ps)), [_fmt(p) for p in ps], fontsize=7)
        ax.set_xlabel("λr (response weight)", fontsize=8)
        ax.set_ylabel("λp (prompt weight)", fontsize=8)
        ax.set_title(f"{m.name} ({'↑' if m.higher_is_better else '↓'})", fontsize=9)
        for i, p in enumerate(ps):
            for j, r in enumerate(rs):
                v = mat[i][j]
                cell = table.cell_at(p, r)
                if v is None:
                    if p == 0 and r == 0:
                        ax.text(j, i, "base", ha="center", va="center", fontsize=6, color="0.4")
                    continue
                if v.state == "failed":
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=(0.75, 0.75, 0.75), hatch="xx",
                                           edgecolor="0.45", linewidth=0))
                    ax.text(j, i, "failed", ha="center", va="center", fontsize=6, color="black")
                    continue
                if v.state == "missing":
                    ax.text(j, i, "missing", ha="center", va="center", fontsize=6, color="0.4")
                    continue
                g = table.gains.get((cell.name, m.name))
                if scale[0] == "gain":
                    dark = abs((g or 0.0) / scale[1]) > 0.6
                else:
                    t = (v.value - scale[1]) / (scale[2] - scale[1])
                    dark = (t if m.higher_is_better else 1 - t) <= 0.6
                label = _num(v.value) if abs(v.value) >= 0.001 else f"{v.value:.1e}"
                if cell.name == table.it:
                    label += "\nIT"
                elif g is not None:
                    label += f"\n{gain_text(g)}"
                ax.text(j, i, label, ha="center", va="center", fontsize=6, color="white" if dark else "black")
                if cell.name == table.it:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
                if table.best.get(m.name) == cell.name:
                    ax.add_patch(Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor="red", linewidth=2))
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        bar.ax.tick_params(labelsize=6)
        bar.set_label("gain over IT (%)" if scale[0] == "gain" else m.name, fontsize=6)
    for k in range(n, rows_n * cols):
        axes[k // cols][k % cols].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return "matplotlib"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir")
    ap.add_argument("--metric", default="eval_response_nll",
                    help="the metric of sweep_grid.{csv,md,png} (default eval_response_nll; any metric of the "
                         "report, e.g. posix, average, mmlu, eval_nll_tool_call)")
    ap.add_argument("--out", default=None, help="output directory (default: the sweep directory)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.sweep_dir):
        print(f"error: {args.sweep_dir}: no such directory", file=sys.stderr)
        return 2
    cells = collect(args.sweep_dir)
    if not cells:
        print(f"error: {args.sweep_dir} holds no cell directories (lp<λp>_lr<λr>) and no cells.txt", file=sys.stderr)
        return 2
    table = build_table(args.sweep_dir, cells)
    names = [m.name for m in table.metrics]
    metric = next((m for m in table.metrics if m.name == args.metric), None)
    if metric is None and table.metrics and args.metric != "eval_response_nll":
        print(f"error: --metric {args.metric}: the sweep has {', '.join(names)}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir
    os.makedirs(out, exist_ok=True)
    dpo = compare_dpo(args.sweep_dir, table)
    report = report_markdown(table, args.sweep_dir, dpo)
    with open(os.path.join(out, "sweep_report.md"), "w", encoding="utf-8") as f:
        f.write(report)
    write_csvs(table, metric, out, dpo)
    written = ["sweep_report.md", "sweep_cells.csv"]
    duplicates = duplicate_metrics(table)
    if table.metrics:
        renderer = heatmaps(table, [m for m in table.metrics if m.name not in duplicates],
                            os.path.join(out, "sweep_figure.png"),
                            f"(λp, λr) sweep: {os.path.basename(os.path.abspath(args.sweep_dir))}")
        written.append(f"sweep_figure.png ({renderer})")
    if dpo is not None and dpo.table.metrics:
        heatmaps(dpo.table, dpo.table.metrics, os.path.join(out, "sweep_dpo_figure.png"),
                 "DPO on top of each (λp, λr) cell (gains over DPO on IT)")
        written.append("sweep_dpo_figure.png")
    if metric is not None:
        with open(os.path.join(out, "sweep_grid.md"), "w", encoding="utf-8") as f:
            f.write(metric_markdown(table, metric))
        heatmaps(table, [metric], os.path.join(out, "sweep_grid.png"))
        written += ["sweep_grid.csv", "sweep_grid.md", "sweep_grid.png"]
    print(report)
    not_ok = [f"{c.name} ({c.status}{': ' + c.detail if c.detail else ''})" for c in table.cells if c.status != "ok"]
    if dpo is not None:
        not_ok += [f"dpo/{c.name} ({c.status}{': ' + c.detail if c.detail else ''})" for c in dpo.cells
                   if c.status != "ok"]
    print(f"{len(cells)} cells{f' (+ {len(dpo.cells)} DPO runs)' if dpo else ''}, {len(table.metrics)} metrics; wrote {', '.join(written)} to {out}"
          + (f"; not ok: {'; '.join(not_ok)}" if not_ok else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
