"""README's layout table ("ZeRO-3 or 3D?") is what tools/plan.py says today: every figure of every row, recomputed
by the planner (a planner change that moves a figure must update the README with it)."""
from __future__ import annotations

import os
import re

from tests.conftest import REPO_ROOT
from witscale import planner

HEADER = "| model, GPUs | layout | params | grads | optim | activ. | total | fits 80 GB |"
LAYOUT = re.compile(r"tp(\d+)·pp(\d+)·dp(\d+)(?:·sp(\d+))? ZeRO-(\d)")


def _rows() -> list[list[str]]:
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    lines = text[text.index(HEADER):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _layout(text: str) -> planner.Layout:
    tp, pp, dp, sp, zero = LAYOUT.search(text).groups()
    return planner.Layout(int(tp), int(pp), int(dp), int(zero), int(sp or 1))


def test_every_figure_of_the_readme_layout_table_is_the_planners():
    rows = _rows()
    assert len(rows) >= 8, rows
    for model_gpus, layout_text, *figures, fits in rows:
        model, gpus = (x.strip() for x in model_gpus.split(","))
        shape = planner.ModelShape.from_config(planner.NAMED_SIZES[model])
        layout = _layout(layout_text)
        e = planner.estimate(shape, layout, seq_len=4096, micro_batch=1)
        want = [f"{x:.1f}" for x in (e.param_gib, e.grad_gib, e.optim_gib, e.activation_gib, e.total_gib)]
        assert figures == want, (model_gpus, layout_text, figures, want)
        assert fits.startswith("yes" if e.total_gib <= 80 else "no"), (model_gpus, layout_text, fits)
        if layout_text.startswith("best of all layouts"):
            best = min((planner.estimate(shape, x, seq_len=4096, micro_batch=1)
                        for x in planner.valid_layouts(shape, int(gpus), 8)), key=lambda x: x.total_gib)
            assert f"({best.layout.name()})" in layout_text, (layout_text, best.layout.name())
