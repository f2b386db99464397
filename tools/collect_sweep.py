#!/usr/bin/env python3
"""Gather the final metrics of a (λp, λr) sweep (slurm/sweep_weights.sh) into a grid.

    python tools/collect_sweep.py runs/sweep [--metric eval_response_nll] [--out DIR]

Each cell directory (``lp<λp>_lr<λr>``, weights also in its ``cell.json``) holds the trainer's
``metrics.jsonl``. A cell's value is its LAST eval record's metric; a cell without eval records falls back
to its last training record (the metric without the ``eval_`` prefix, else the training loss), marked
"(train)". Writes, into --out (default: the sweep directory):

    sweep_cells.csv   one line per cell: weights, step, source and every final metric
    sweep_grid.csv    the metric as a λp × λr matrix (rows λp, columns λr)
    sweep_grid.md     the same as a markdown table (also printed)
    sweep_grid.png    a heatmap like the paper's figures: matplotlib when installed, else a plain PNG
                      written with zlib (colours only; the numbers are in the markdown)

Lower is better for every NLL/loss metric. (0, 0) is the untrained base model and has no cell.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import struct
import sys
import zlib

CELL_RE = re.compile(r"^lp([0-9.]+)_lr([0-9.]+)$")
FIELDS = ("eval_loss", "eval_response_nll", "eval_prompt_nll", "loss", "response_nll", "prompt_nll")


def read_cell(path: str) -> dict | None:
    """The weights and final metrics of one run directory; None if it is not a cell."""
    name = os.path.basename(os.path.normpath(path))
    weights = None
    if os.path.exists(os.path.join(path, "cell.json")):
        with open(os.path.join(path, "cell.json"), encoding="utf-8") as f:
            c = json.load(f)
        weights = (float(c["prompt_weight"]), float(c["response_weight"]))
    elif CELL_RE.match(name):
        m = CELL_RE.match(name)
        weights = (float(m.group(1)), float(m.group(2)))
    if weights is None:
        return None
    last_train = last_eval = None
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:      # a line cut by a kill: ignore it
                    continue
                if any(k.startswith("eval_") for k in rec):
                    last_eval = rec
                elif "loss" in rec:
                    last_train = rec
    cell = {"dir": name, "prompt_weight": weights[0], "response_weight": weights[1],
            "step": None, "source": None}
    for k in FIELDS:
        cell[k] = None
    if last_train:
        cell["step"] = last_train.get("step")
        for k in ("loss", "response_nll", "prompt_nll"):
            cell[k] = last_train.get(k)
        cell["source"] = "train"
    if last_eval:
        for k in ("eval_loss", "eval_response_nll", "eval_prompt_nll"):
            cell[k] = last_eval.get(k)
        cell["step"] = last_eval.get("step", cell["step"])
        cell["source"] = "eval"
    return cell


def cell_value(cell: dict, metric: str):
    """(value, from_train): the eval metric, else its training counterpart, else the training loss."""
    if cell["source"] == "eval" and cell.get(metric) is not None:
        return cell[metric], False
    train_key = metric[len("eval_"):] if metric.startswith("eval_") else metric
    for key in (train_key, "loss"):
        if cell.get(key) is not None:
            return cell[key], True
    return None, False


def collect(sweep_dir: str) -> list[dict]:
    cells = []
    for name in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, name)
        if os.path.isdir(path):
            cell = read_cell(path)
            if cell is not None:
                cells.append(cell)
    return cells


def _fmt(w: float) -> str:
    return f"{w:g}" if w != int(w) else f"{w:.1f}"


def build_grid(cells: list[dict], metric: str):
    ps = sorted({c["prompt_weight"] for c in cells})
    rs = sorted({c["response_weight"] for c in cells})
    grid = {(c["prompt_weight"], c["response_weight"]): cell_value(c, metric) for c in cells}
    return ps, rs, grid


def write_csvs(cells, ps, rs, grid, metric, out_dir):
    with open(os.path.join(out_dir, "sweep_cells.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt_weight", "response_weight", "dir", "step", "source", metric, *FIELDS])
        for c in sorted(cells, key=lambda c: (c["prompt_weight"], c["response_weight"])):
            v, _ = cell_value(c, metric)
            w.writerow([c["prompt_weight"], c["response_weight"], c["dir"], c["step"], c["source"], v,
                        *[c[k] for k in FIELDS]])
    with open(os.path.join(out_dir, "sweep_grid.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([f"{metric}: lp \\ lr", *[_fmt(r) for r in rs]])
        for p in ps:
            w.writerow([_fmt(p), *["" if grid.get((p, r), (None,))[0] is None else grid[(p, r)][0] for r in rs]])


def markdown(ps, rs, grid, metric) -> str:
    lines = [f"**{metric}** (rows λp, columns λr; lower is better; (train): no eval record, last training value)",
             "", "| λp \\ λr | " + " | ".join(_fmt(r) for r in rs) + " |",
             "|---" * (len(rs) + 1) + "|"]
    for p in ps:
        row = []
        for r in rs:
            v, from_train = grid.get((p, r), (None, False))
            if v is None:
                row.append("base" if p == 0 and r == 0 else "—")
            else:
                row.append(f"{v:.4f}" + (" (train)" if from_train else ""))
        lines.append(f"| {_fmt(p)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ heatmap
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


def heatmap(ps, rs, grid, metric, path) -> str:
    """Returns which renderer wrote the file."""
    values = [v for v, _ in grid.values() if v is not None and math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    span = (hi - lo) or 1.0
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        import numpy as np
        m = np.full((len(ps), len(rs)), np.nan)
        for i, p in enumerate(ps):
            for j, r in enumerate(rs):
                v = grid.get((p, r), (None,))[0]
                if v is not None:
                    m[i, j] = v
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(rs), 0.8 + 0.8 * len(ps)))
        im = ax.imshow(m, origin="lower", cmap="viridis_r")
        ax.set_xticks(range(len(rs)), [_fmt(r) for r in rs])
        ax.set_yticks(range(len(ps)), [_fmt(p) for p in ps])
        ax.set_xlabel("response weight λr")
        ax.set_ylabel("prompt weight λp")
        for i in range(len(ps)):
            for j in range(len(rs)):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=7,
                            color="white" if (m[i, j] - lo) / span > 0.5 else "black")
        fig.colorbar(im, ax=ax, label=metric)
        ax.set_title(metric)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return "matplotlib"
    # Fallback: one 40-px square per cell, λp rows bottom-up like the figure, grey for missing cells.
    # Low (good) values are bright, as with viridis_r above.
    size = 40
    pixels = []
    for p in reversed(ps):
        row = []
        for r in rs:
            v = grid.get((p, r), (None,))[0]
            c = (200, 200, 200) if v is None else _colour(1.0 - (v - lo) / span)
            row += [c] * size
        pixels += [list(row) for _ in range(size)]
    _write_png(path, pixels)
    return "zlib"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir")
    ap.add_argument("--metric", default="eval_response_nll",
                    help="eval_response_nll (default), eval_loss, eval_prompt_nll, loss, response_nll, prompt_nll")
    ap.add_argument("--out", default=None, help="output directory (default: the sweep directory)")
    args = ap.parse_args(argv)
    if args.metric not in FIELDS:
        ap.error(f"--metric {args.metric}: choose from {', '.join(FIELDS)}")
    if not os.path.isdir(args.sweep_dir):
        print(f"error: {args.sweep_dir}: no such directory", file=sys.stderr)
        return 2
    cells = collect(args.sweep_dir)
    if not cells:
        print(f"error: {args.sweep_dir} holds no cell directories (lp<λp>_lr<λr>)", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir
    os.makedirs(out, exist_ok=True)
    ps, rs, grid = build_grid(cells, args.metric)
    write_csvs(cells, ps, rs, grid, args.metric, out)
    md = markdown(ps, rs, grid, args.metric)
    with open(os.path.join(out, "sweep_grid.md"), "w", encoding="utf-8") as f:
        f.write(md)
    renderer = heatmap(ps, rs, grid, args.metric, os.path.join(out, "sweep_grid.png"))
    missing = [c["dir"] for c in cells if cell_value(c, args.metric)[0] is None]
    print(md)
    print(f"{len(cells)} cells; wrote sweep_cells.csv, sweep_grid.csv, sweep_grid.md, sweep_grid.png ({renderer}) "
          f"to {out}" + (f"; no metrics yet: {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
