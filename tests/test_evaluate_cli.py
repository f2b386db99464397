"""tools/evaluate.py end to end on a tiny exported-style model: POSIX, judge generations, a local lm-eval task,
eval_results.json (merging, failures recorded per part), data parallelism over two ranks, bad inputs."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, write_jsonl
from tests.distributed import run_launcher
from tests.eval_helpers import capitals_task, make_tiny_hf, reference_logprob
from witscale.evaluation import harness
from witscale.evaluation.results import merge_results

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false")
PROMPTS = [{"instruction": "What is the capital of Zorvia?"},
           {"instruction": "Reverse the order of these words.", "input": "apple river stone"},
           {"instruction": "This one is past the limit."}]


def evaluate(*args, launcher=None, timeout=300):
    cmd = (launcher or [sys.executable]) + ["tools/evaluate.py", "--no-progress", *map(str, args)]
    return run_launcher(cmd, timeout=timeout, cwd=REPO_ROOT, env=ENV)      # torchrun: its ranks killed on the timeout


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sp_model_path):
    root = tmp_path_factory.mktemp("eval_cli")
    model = make_tiny_hf(root / "hf", sp_model_path, seed=3)
    prompts = write_jsonl(root / "prompts.jsonl", [json.dumps(p) for p in PROMPTS])
    alpaca = root / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"instruction": "Add 2 and 3.", "dataset": "toy", "output": "5", "generator": "x"},
                                  {"instruction": "Name a colour.", "dataset": "toy"}]))
    mt = write_jsonl(root / "question.jsonl", [{"question_id": 81, "category": "writing",
                                                "turns": ["Write a word.", "Now write it twice."]},
                                               {"question_id": 101, "category": "math", "turns": ["Add 1 and 1."]}])
    return {"root": root, "model": model, "prompts": prompts, "alpaca": str(alpaca), "mt": mt}


@pytest.fixture(scope="module")
def single_run(inputs):
    out = inputs["root"] / "out"
    res = evaluate("--model", inputs["model"], "--output", out, "--posix", inputs["prompts"], "--limit", 4,
                   "--max-new-tokens", 6, "--alpaca-eval", inputs["alpaca"], "--mt-bench", inputs["mt"],
                   "--judge-max-new-tokens", 5, "--batch-size", 3, "--max-tokens", 200)
    return {"res": res, "out": out, "results": json.loads((out / "eval_results.json").read_text())
            if (out / "eval_results.json").exists() else None}


def test_posix_and_judge_generations_land_in_eval_results(inputs, single_run):
    res, out, r = single_run["res"], single_run["out"], single_run["results"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    p = r["posix"]
    # --limit 4: the first 4 prompt sets (spelling and template of the first two prompts)
    assert [s["kind"] for s in p["sets"]] == ["spelling", "template", "spelling", "template"]
    assert [s["id"] for s in p["sets"]] == ["spelling-0", "template-0", "spelling-1", "template-1"]
    assert p["posix"] == pytest.approx(np.mean([s["psi"] for s in p["sets"]]))
    assert p["posix_by_kind"]["spelling"] == pytest.approx(np.mean([s["psi"] for s in p["sets"][::2]]))
    assert r["metrics"]["posix"] == {"value": p["posix"], "higher_is_better": False}
    assert {"posix_spelling", "posix_template"} <= set(r["metrics"])
    for s in p["sets"]:
        n = len(s["variants"])
        assert len(s["responses"]) == len(s["response_tokens"]) == n and np.shape(s["logprobs"]) == (n, n)
        assert all(1 <= len(y) <= 6 for y in s["response_tokens"])
    assert p["max_new_tokens"] == 6 and p["template"] == "plain" and "L(y_j)" in p["normalization"]
    # the saved matrices are what an independent computation gives for the saved responses
    from witscale.data.tokenizer import load_tokenizer
    from witscale.evaluation.models import load_generator
    from witscale.evaluation.prompting import PromptFormatter
    hf64 = load_generator(inputs["model"], torch.device("cpu"), torch.float64)
    fmt = PromptFormatter("plain", load_tokenizer(os.path.join(inputs["model"], "tokenizer.model")))
    s = p["sets"][1]
    ref = [[reference_logprob(hf64, fmt.prefix(x), y) for y in s["response_tokens"]] for x in s["variants"]]
    np.testing.assert_allclose(s["logprobs"], ref, rtol=2e-5, atol=2e-4)
    # judge files, in the formats AlpacaEval and FastChat read
    alpaca = json.loads((out / "alpaca_eval" / "model_outputs.json").read_text())
    assert [a["instruction"] for a in alpaca] == ["Add 2 and 3.", "Name a colour."]
    model_id = inputs["root"].name        # <dir>/hf: named after <dir>, as a sweep cell's <cell>/hf
    assert all(isinstance(a["output"], str) and a["generator"] == model_id and "dataset" in a for a in alpaca)
    answers = [json.loads(line) for line in
               (out / "mt_bench" / "model_answer" / f"{model_id}.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 101]
    assert [len(a["choices"][0]["turns"]) for a in answers] == [2, 1]
    assert all(a["model_id"] == model_id and a["answer_id"] for a in answers)
    assert r["generations"]["alpaca_eval"]["count"] == 2 and r["generations"]["mt_bench"]["count"] == 2
    assert r["errors"] == {} and r["settings"]["world_size"] == 1


@pytest.mark.slow
def test_two_ranks_data_parallel_give_the_single_process_results(inputs, single_run):
    out = inputs["root"] / "out_dp"
    res = evaluate("--model", inputs["model"], "--output", out, "--posix", inputs["prompts"], "--limit", 4,
                   "--max-new-tokens", 6, "--batch-size", 3, "--max-tokens", 200,
                   launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads((out / "eval_results.json").read_text())
    ref = single_run["results"]["posix"]
    assert got["settings"]["world_size"] == 2
    assert [s["id"] for s in got["posix"]["sets"]] == [s["id"] for s in ref["sets"]]
    for a, b in zip(got["posix"]["sets"], ref["sets"]):
        assert a["response_tokens"] == b["response_tokens"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-5, atol=1e-5)
    assert got["posix"]["posix"] == pytest.approx(ref["posix"], rel=1e-5)


@pytest.mark.skipif(harness.available() is None, reason="lm-eval is not installed (pip install 'witscale[eval]')")
def test_local_lm_eval_task_score_lands_in_eval_results_and_a_failing_task_is_recorded(inputs, tmp_path):
    tasks = capitals_task(tmp_path / "tasks")
    # a second local task whose data file is gone: it fails at run time, the other task still scores
    broken = (tmp_path / "tasks" / "witscale_capitals.yaml").read_text().replace("task: witscale_capitals",
                                                                                 "task: broken_task")
    broken = broken.replace("witscale_capitals.jsonl", "gone.jsonl")
    (tmp_path / "tasks" / "broken_task.yaml").write_text(broken)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "eval_results.json").write_text(json.dumps({"posix": {"posix": 0.5, "posix_by_kind": {}}}))
    res = evaluate("--model", inputs["model"], "--output", out, "--tasks", "witscale_capitals,broken_task",
                   "--include-path", tasks)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILED tasks/broken_task" in res.stderr
    r = json.loads((out / "eval_results.json").read_text())
    t = r["tasks"]["witscale_capitals"]
    assert t["metric"] == "acc,none" and 0.0 <= t["score"] <= 1.0 and t["num_samples"] == 5 and t["num_fewshot"] == 0
    assert r["metrics"]["witscale_capitals"] == {"value": t["score"], "higher_is_better": True}
    assert "broken_task" not in r["metrics"] and "tasks/broken_task" in r["errors"]
    assert r["posix"]["posix"] == 0.5                       # merged: the earlier POSIX result is kept
    assert r["lm_eval"]["preset"] == "paper" and r["lm_eval"]["model_args"]["add_bos_token"] == "True"


def test_bad_inputs_fail_fast_with_one_line(inputs, tmp_path, capsys):
    """Checked before any model is loaded (in-process: no model is loaded, so this is quick)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(REPO_ROOT, "tools", "evaluate.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    one = write_jsonl(tmp_path / "one.jsonl", [{"variants": ["only one"]}])
    cases = [(["--model", tmp_path, "--output", tmp_path / "o", "--posix", inputs["prompts"]], "no config.json"),
             (["--model", inputs["model"], "--output", tmp_path / "o", "--posix", one], "at least 2 variants"),
             (["--model", inputs["model"], "--output", tmp_path / "o"], "nothing to evaluate"),
             (["--model", inputs["model"], "--output", tmp_path / "o", "--posix", inputs["prompts"],
               "--template", "nope"], "unknown template"),
             (["--model", inputs["model"], "--posix", inputs["prompts"]], "needs --output")]
    if harness.available() is not None:
        cases.append((["--model", inputs["model"], "--output", tmp_path / "o", "--tasks", "no_such_task",
                       "--include-path", tmp_path], "knows no task"))
    for args, msg in cases:
        code = cli.main(["--no-progress", *map(str, args)])
        err = capsys.readouterr().err
        assert code == 2, (args, err[-2000:])
        assert msg in err and err.strip().count("\n") == 0, err
        assert not (tmp_path / "o" / "eval_results.json").exists()


def test_results_merge_replaces_the_parts_a_run_attempted_and_keeps_the_rest():
    old = merge_results(None, {"posix": {"posix": 0.3, "posix_by_kind": {"spelling": 0.2}},
                               "tasks": {"mmlu": {"score": 0.4, "higher_is_better": True}},
                               "errors": {"tasks/bbh": "boom"}, "attempted": ["posix", "tasks/mmlu", "tasks/bbh"]})
    assert set(old["metrics"]) == {"posix", "posix_spelling", "mmlu"} and old["errors"] == {"tasks/bbh": "boom"}
    new = merge_results(old, {"tasks": {"bbh": {"score": 0.1, "higher_is_better": True}}, "errors": {},
                              "attempted": ["tasks/bbh"]})
    assert new["errors"] == {} and new["metrics"]["bbh"]["value"] == 0.1 and new["metrics"]["mmlu"]["value"] == 0.4
    assert new["posix"]["posix"] == 0.3


def test_sweep_mode_evaluates_each_cell_with_a_model_once(inputs, tmp_path):
    import shutil
    sweep = tmp_path / "sweep"
    (sweep / "lp0.0_lr1.0").mkdir(parents=True)
    shutil.copytree(inputs["model"], sweep / "lp0.0_lr1.0" / "hf")
    (sweep / "lp1.0_lr1.0").mkdir()                            # training did not export: skipped, said so
    (sweep / "cells.txt").write_text("0.0 1.0\n1.0 1.0\n")
    args = ("--sweep", sweep, "--posix", inputs["prompts"], "--limit", 1, "--max-new-tokens", 3)
    res = evaluate(*args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "lp1.0_lr1.0: no exported model (hf/): skipped" in res.stdout
    r = json.loads((sweep / "lp0.0_lr1.0" / "eval_results.json").read_text())
    assert r["posix"]["num_sets"] == 1 and not (sweep / "lp1.0_lr1.0" / "eval_results.json").exists()
    again = evaluate(*args)
    assert again.returncode == 0 and "has eval_results.json: skipped" in again.stdout
