"""tools/collect_sweep.py on a hand-made grid with a failed training, a failed benchmark and a cell that never
ran: every metric of every cell, the average, gains over IT (0, 1), the best cell — and failures shown as
such, never as numbers."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def _cell(root, p, r, *, nll=None, train="completed", exit_code=0, results=None):
    d = root / f"lp{p}_lr{r}"
    d.mkdir()
    (d / "cell.json").write_text(json.dumps({"prompt_weight": float(p), "response_weight": float(r)}))
    (d / "train_status.json").write_text(json.dumps({"state": train, "exit_code": exit_code}))
    if nll is not None:
        (d / "metrics.jsonl").write_text(
            json.dumps({"step": 10, "loss": 3.0, "response_nll": 3.1, "prompt_nll": 3.2}) + "\n"
            + json.dumps({"step": 10, "eval_loss": nll, "eval_response_nll": nll + 0.1, "eval_prompt_nll": nll + 0.2})
            + "\n")
    if results is not None:
        from witscale.evaluation.results import write_results
        write_results(str(d), results)
    return d


def _results(posix, scores, errors=None):
    return {"posix": {"posix": posix, "posix_by_kind": {"spelling": posix / 2, "template": posix * 1.5}},
            "tasks": {t: {"score": v, "higher_is_better": True} for t, v in scores.items()},
            "errors": errors or {}, "attempted": ["posix"] + [f"tasks/{t}" for t in ("mmlu", "bbh")]}


@pytest.fixture()
def grid(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "cells.txt").write_text("0.0 1.0\n0.2 1.0\n1.0 1.0\n0.2 0.6\n0.4 1.0\n")
    _cell(root, "0.0", "1.0", nll=2.0, results=_results(0.5, {"mmlu": 0.40, "bbh": 0.30}))        # IT
    _cell(root, "0.2", "1.0", nll=1.9, results=_results(0.4, {"mmlu": 0.44, "bbh": 0.33}))        # best
    _cell(root, "1.0", "1.0", nll=1.5, train="failed", exit_code=137)                               # died
    _cell(root, "0.2", "0.6", nll=2.1, results=_results(0.6, {"mmlu": 0.38}, {"tasks/bbh": "RuntimeError: x"}))
    return root                                                                                     # 0.4/1.0: never ran


def collect(root, *args):
    res = subprocess.run([sys.executable, "tools/collect_sweep.py", str(root), *args], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def rows(path):
    with open(path, newline="") as f:
        return {(r["prompt_weight"], r["response_weight"]): r for r in csv.DictReader(f)}


def test_report_has_every_metric_for_every_cell_and_failures_as_such(grid):
    res = collect(grid)
    cells = rows(grid / "sweep_cells.csv")
    assert set(cells) == {("0.0", "1.0"), ("0.2", "1.0"), ("1.0", "1.0"), ("0.2", "0.6"), ("0.4", "1.0")}
    metrics = ["bbh", "mmlu", "average", "posix", "posix_spelling", "posix_template", "eval_response_nll",
               "eval_prompt_nll"]
    header = list(next(csv.reader(open(grid / "sweep_cells.csv"))))
    assert header[7:7 + len(metrics)] == metrics               # benchmarks, average, POSIX, NLL: the report order
    it, best, dead, partial, never = (cells[k] for k in (("0.0", "1.0"), ("0.2", "1.0"), ("1.0", "1.0"),
                                                          ("0.2", "0.6"), ("0.4", "1.0")))
    assert it["state"] == best["state"] == "ok"
    assert float(best["mmlu"]) == 0.44 and float(best["average"]) == pytest.approx(0.385)
    assert float(best["gain_mmlu"]) == pytest.approx(10.0)                  # (0.44 − 0.40) / 0.40
    assert float(best["gain_posix"]) == pytest.approx(20.0)                 # lower is better: (0.5 − 0.4) / 0.5
    assert float(best["gain_eval_response_nll"]) == pytest.approx(100 * 0.1 / 2.1)
    assert float(best["gain_average"]) == pytest.approx(100 * (0.385 - 0.35) / 0.35)
    assert float(it["gain_mmlu"]) == 0.0
    # a failed training: every metric FAILED, even the eval NLL it had logged before dying
    assert dead["state"] == "failed" and "exit 137" in dead["detail"]
    assert all(dead[m] == "FAILED" for m in metrics) and all(dead[f"gain_{m}"] == "" for m in metrics)
    # a failed benchmark: that metric and the average FAILED; the rest are numbers
    assert partial["state"] == "failed" and partial["bbh"] == "FAILED" and partial["average"] == "FAILED"
    assert float(partial["mmlu"]) == 0.38 and float(partial["posix"]) == 0.6
    # a cell that never ran: missing, never a number
    assert never["state"] == "missing" and all(never[m] == "" for m in metrics)

    report = (grid / "sweep_report.md").read_text()
    assert "| mmlu (↑) | (0.2, 1.0) | 0.4400 | 0.4000 | +10.0% |" in report
    assert "| posix (↓) | (0.2, 1.0) | 0.4000 | 0.5000 | +20.0% |" in report
    mmlu = report.split("### mmlu")[1].split("###")[0]
    assert "0.4000 [IT]" in mmlu and "**0.4400 (+10.0%)** ★" in mmlu
    assert "FAILED" in mmlu and "missing" in mmlu and "0.0000" not in mmlu
    assert "| 1.0 | 1.0 | lp1.0_lr1.0 | failed | training failed (exit 137) |" in report
    assert report in res.stdout
    for name in ("sweep_figure.png", "sweep_grid.png"):
        assert (grid / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the --metric grid (default eval_response_nll), rows λp, columns λr
    grid_rows = list(csv.reader(open(grid / "sweep_grid.csv")))
    assert grid_rows[0] == ["eval_response_nll: lp \\ lr", "0.6", "1.0"]
    assert [r[0] for r in grid_rows[1:]] == ["0.0", "0.2", "0.4", "1.0"]
    assert grid_rows[2][2] == "2.0" and grid_rows[4][2] == "FAILED" and grid_rows[3][2] == ""


def test_metric_option_and_a_grid_without_evaluation(grid, tmp_path):
    collect(grid, "--metric", "posix", "--out", str(tmp_path / "rep"))
    assert "posix" in (tmp_path / "rep" / "sweep_grid.md").read_text()
    # NLL only (no eval_results anywhere): no benchmark, no average; the NLL metrics still reported
    root = tmp_path / "nll_only"
    root.mkdir()
    _cell(root, "0.0", "1.0", nll=2.0)
    _cell(root, "0.5", "1.0", nll=1.8)
    collect(root)
    header = next(csv.reader(open(root / "sweep_cells.csv")))
    assert [h for h in header[7:] if not h.startswith("gain_")] == ["eval_response_nll", "eval_prompt_nll"]
    res = subprocess.run([sys.executable, "tools/collect_sweep.py", str(root), "--metric", "mmlu"], cwd=REPO_ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "mmlu" in res.stderr


def test_plain_png_without_matplotlib(grid, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("collect_sweep", os.path.join(REPO_ROOT, "tools", "collect_sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = mod.build_table(str(grid))
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # import matplotlib → ImportError
    assert mod.heatmaps(table, table.metrics, str(tmp_path / "f.png")) == "zlib"
    data = (tmp_path / "f.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def _dpo_cell(dpo_root, p, r, *, results=None, train="completed", exit_code=0, accuracy=None):
    d = _cell(dpo_root, p, r, train=train, exit_code=exit_code, results=results)
    if accuracy is not None:                     # the DPO trainer's records (witscale/training/metrics.py names)
        (d / "metrics.jsonl").write_text(
            json.dumps({"step": 4, "loss": 0.69, "reward_accuracy": 0.5, "reward_margin": 0.01, "pairs": 32}) + "\n"
            + json.dumps({"step": 4, "eval_loss": 0.6, "eval_reward_accuracy": accuracy,
                          "eval_reward_margin": accuracy / 10, "eval_response_nll": 3.0}) + "\n")
    return d


def test_dpo_on_top_of_each_cell_beside_the_sft_grid(grid):
    """<sweep>/dpo (slurm/sweep_dpo.sh): each DPO run beside its SFT start — value, gain over the SFT model,
    gain over DPO on the IT cell — its reward metrics, a failed DPO run as FAILED, a DPO run of a cell whose
    SFT model is missing; and the SFT columns of sweep_cells.csv unchanged."""
    dpo = grid / "dpo"
    dpo.mkdir()
    (dpo / "cells.txt").write_text("0.0 1.0\n0.2 1.0\n0.2 0.6\n")
    _dpo_cell(dpo, "0.0", "1.0", accuracy=0.6, results=_results(0.45, {"mmlu": 0.42, "bbh": 0.30}))    # IT → DPO
    _dpo_cell(dpo, "0.2", "1.0", accuracy=0.7, results=_results(0.30, {"mmlu": 0.462, "bbh": 0.33}))   # best
    _dpo_cell(dpo, "0.2", "0.6", train="failed", exit_code=1)
    res = collect(grid)
    cells = rows(grid / "sweep_cells.csv")
    header = next(csv.reader(open(grid / "sweep_cells.csv")))
    sft_metrics = ["bbh", "mmlu", "average", "posix", "posix_spelling", "posix_template", "eval_response_nll",
                   "eval_prompt_nll"]
    assert header[7:7 + len(sft_metrics)] == sft_metrics                    # the SFT columns as without DPO
    best, it, dead, never = cells[("0.2", "1.0")], cells[("0.0", "1.0")], cells[("0.2", "0.6")], cells[("0.4", "1.0")]
    assert best["dpo_state"] == "ok" and float(best["dpo_mmlu"]) == pytest.approx(0.462)
    assert float(best["dpo_gain_mmlu"]) == pytest.approx(5.0)               # (0.462 − 0.44) / 0.44: over its SFT start
    assert float(best["dpo_gain_posix"]) == pytest.approx(25.0)             # (0.4 − 0.3) / 0.4, lower is better
    assert float(best["dpo_gain_it_mmlu"]) == pytest.approx(10.0)           # (0.462 − 0.42) / 0.42: over IT → DPO
    assert float(best["dpo_reward_accuracy"]) == 0.7 and float(it["dpo_gain_it_reward_accuracy"]) == 0.0
    assert float(it["dpo_gain_mmlu"]) == pytest.approx(5.0)                 # (0.42 − 0.40) / 0.40
    assert "dpo_gain_reward_accuracy" not in header and "dpo_gain_eval_response_nll" not in header
    assert dead["dpo_state"] == "failed" and dead["dpo_mmlu"] == "FAILED" and dead["dpo_gain_mmlu"] == ""
    assert never["dpo_state"] == "" and never["dpo_mmlu"] == ""              # no DPO run for that cell
    report = (grid / "sweep_report.md").read_text()
    section = report.split("## WIT → DPO")[1]
    assert "| mmlu (↑) | (0.2, 1.0) | 0.4620 | 0.4200 | +10.0% |" in section      # best DPO model vs IT → DPO
    mmlu = section.split("### DPO mmlu")[1].split("###")[0]
    assert "| 0.2 | 1.0 | 0.4400 | **0.4620** ★ | +5.0% | +10.0% |" in mmlu
    assert "| 0.0 | 1.0 | 0.4000 | 0.4200 | +5.0% | [IT] |" in mmlu
    assert "| 0.2 | 0.6 | 0.3800 | FAILED | — | — |" in mmlu
    training = section.split("### DPO training metrics")[1].split("###")[0]
    assert "| 0.2 | 1.0 | 0.7000 | 0.0700 |" in training
    assert "dpo/lp0.2_lr0.6 | failed | training failed (exit 1)" in section
    assert (grid / "sweep_dpo_figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sweep_dpo_figure.png" in res.stdout
    # the DPO grid alone is a sweep of its own
    collect(dpo)
    assert "reward_accuracy" in (dpo / "sweep_report.md").read_text()


def _class_cell(root, p, r, nll, *, posix=0.5, clip=None):
    """A cell with per-class held-out NLL, one POSIX variant kind and the run's effective_config.json."""
    d = root / f"lp{p}_lr{r}"
    d.mkdir()
    (d / "cell.json").write_text(json.dumps({"prompt_weight": float(p), "response_weight": float(r)}))
    (d / "train_status.json").write_text(json.dumps({"state": "completed", "exit_code": 0}))
    (d / "effective_config.json").write_text(json.dumps({"args": {
        "prompt_weight": float(p), "response_weight": float(r), "normalization": "nonzero", "clip_grad": clip,
        "class_weights": "", "seed": 0, "lr": 2e-5, "max_steps": 10, "epochs": None}}))
    (d / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "loss": 3.0, "response_nll": 3.1, "prompt_nll": 3.2, "nll_tool_call": 9.0}) + "\n"
        + json.dumps({"step": 10, "eval_loss": nll, "eval_response_nll": nll, "eval_prompt_nll": nll + 1,
                      "eval_nll_tool_call": nll + 0.5, "eval_nll_reasoning": nll + 0.25}) + "\n")
    from witscale.evaluation.results import write_results
    write_results(str(d), {"posix": {"posix": posix, "posix_by_kind": {"given": posix}}, "errors": {},
                           "attempted": ["posix"]})


def test_two_by_two_sweep_with_per_class_metrics(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    _class_cell(root, "0.0", "1.0", 2.0)                  # IT
    _class_cell(root, "0.0", "0.5", 2.0008)               # = IT by construction (λp 0: only the ratio matters)
    _class_cell(root, "0.5", "1.0", 1.9, posix=0.45)
    _class_cell(root, "0.5", "0.5", 2.1, posix=0.55, clip=1.0)   # clipped: not scale-invariant, not grouped
    res = collect(root, "--metric", "eval_nll_tool_call")
    grid_md = (root / "sweep_grid.md").read_text()
    assert "eval_nll_tool_call" in grid_md and "2.4000" in grid_md and "2.5000 [IT]" in grid_md
    report = (root / "sweep_report.md").read_text()
    for metric in ("eval_nll_tool_call", "eval_nll_reasoning"):
        assert f"### {metric} (lower is better)" in report
    # posix_given equals posix in every cell: one panel/table, said once
    assert "### posix (" in report and "### posix_given" not in report
    assert "`posix_given` = `posix` (one variant kind)" in report
    # the gain of 2.0008 over 2.0 is -0.04%: printed without a sign, never "-0.0%"
    assert "-0.0%" not in report + res.stdout and "2.0008 (0.0%)" in report
    # identical by construction: the λp = 0 cells; not the clipped one
    assert "Cells identical by construction" in report
    assert "- (0.0, 0.5) = (0.0, 1.0) [IT]" in report and "(0.5, 0.5) =" not in report
    header = next(csv.reader(open(root / "sweep_cells.csv")))
    assert "eval_nll_tool_call" in header and "gain_eval_nll_reasoning" in header


def test_colour_scales_are_centred_on_it_and_not_stretched(tmp_path):
    spec = importlib.util.spec_from_file_location("collect_sweep", os.path.join(REPO_ROOT, "tools", "collect_sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tmp_path / "sweep"
    root.mkdir()
    _class_cell(root, "0.0", "1.0", 2.0)
    _class_cell(root, "0.5", "1.0", 1.998)                # 0.1% better than IT
    table = mod.build_table(str(root))
    metric = next(m for m in table.metrics if m.name == "eval_response_nll")
    scale = mod._scale(table, metric, [2.0, 1.998])
    assert scale == ("gain", mod.GAIN_FLOOR)              # ±1% at least: 0.1% stays pale
    pale = mod._scale_colour(scale, 1.998, table.gains[("lp0.5_lr1.0", "eval_response_nll")], metric)
    assert mod._scale_colour(scale, 2.0, 0.0, metric) == (247, 247, 247)      # IT: the centre, white
    assert all(abs(a - b) < 30 for a, b in zip(pale, (247, 247, 247)))
    assert mod._scale_colour(scale, 0, 5.0, metric) == (33, 102, 172)         # a real gain: full blue
    assert "matplotlib" == mod.heatmaps(table, table.metrics, str(tmp_path / "f.png"))


def test_learned_weights_are_reported_without_a_direction(tmp_path):
    """--learn-weights cells: the λ each learned group ended at (the last training record's lambda_<group>) is a
    reportable metric (--metric, a table, the cells CSV), with no best cell and no gain: it is where the run's own
    tuning went, not a quality."""
    root = tmp_path / "sweep"
    root.mkdir()
    _class_cell(root, "0.0", "1.0", 2.0)                  # IT: fixed weights, no λ learned
    _class_cell(root, "0.5", "1.0", 1.9)
    d = root / "lp0.5_lr1.0"
    (d / "metrics.jsonl").write_text(
        json.dumps({"step": 9, "loss": 3.1, "lambda_prompt_side": 0.4}) + "\n"
        + json.dumps({"step": 10, "loss": 3.0, "response_nll": 3.1, "lambda_prompt_side": 0.62}) + "\n"
        + json.dumps({"step": 10, "eval_loss": 1.9, "eval_response_nll": 1.9, "eval_prompt_nll": 2.9}) + "\n")
    res = collect(root, "--metric", "lambda_prompt_side")
    grid_md = (root / "sweep_grid.md").read_text()
    assert "lambda_prompt_side" in grid_md and "0.6200" in grid_md
    report = (root / "sweep_report.md").read_text()
    assert "### lambda_prompt_side (the λ --learn-weights ended at; no direction)" in report
    assert "★" not in report.split("### lambda_prompt_side", 1)[1].split("###", 1)[0]
    header = next(csv.reader(open(root / "sweep_cells.csv")))
    assert "lambda_prompt_side" in header
    assert res.returncode == 0
