"""The phases of one evaluation (witscale/evaluation/run.py), each called on its own at one process on a tiny
exported-style model: generation (POSIX responses, judge answers), POSIX scoring, judge files, lm-eval tasks,
the report — and each phase's failure recorded under its own part while the others go on."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import write_jsonl
from tests.eval_helpers import make_tiny_hf, reference_logprob
from witscale.evaluation import harness, models, run as evalrun
from witscale.evaluation.run import EvalOptions, EvalRun, Generations

PROMPTS = [{"instruction": "What is the capital of Zorvia?"},
           {"instruction": "Reverse the order of these words.", "input": "apple river stone"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory, sp_model_path):
    root = tmp_path_factory.mktemp("eval_phases")
    alpaca = root / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"instruction": "Add 2 and 3.", "dataset": "toy"},
                                  {"instruction": "Name a colour.", "dataset": "toy"}]))
    mt = write_jsonl(root / "question.jsonl", [{"question_id": 81, "category": "writing",
                                                "turns": ["Write a word.", "Now write it twice."]},
                                               {"question_id": 101, "category": "math", "turns": ["Add 1 and 1."]}])
    return {"model": make_tiny_hf(root / "cell" / "hf", sp_model_path, seed=3),
            "prompts": write_jsonl(root / "prompts.jsonl", PROMPTS), "alpaca": str(alpaca), "mt": mt}


def options(files, out, **kw) -> EvalOptions:
    base = dict(model_dir=files["model"], output_dir=str(out), posix=files["prompts"], limit=3, max_new_tokens=5,
                alpaca_eval=files["alpaca"], mt_bench=files["mt"], judge_max_new_tokens=4, batch_size=2,
                max_tokens=200, progress=False, device="cpu")
    return EvalOptions(**dict(base, **kw))


def greedy_one_by_one(hf, prefix, stop_ids, max_new_tokens):
    """Greedy decoding of one prefix, token by token, no batch and no padding: the independent computation."""
    ids = list(prefix)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            t = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            if t in stop_ids:
                break
    return ids[len(prefix):]


@pytest.fixture(scope="module")
def generated(files, tmp_path_factory):
    run = EvalRun.start(options(files, tmp_path_factory.mktemp("gen_out")))
    return run, evalrun.generation_phase(run)


def test_generation_phase_gives_each_rank_its_greedy_responses_and_judge_answers(files, generated):
    run, gen = generated
    assert run.errors == {} and "generation" in run.timing and run.model_id == "cell"
    assert [s.id for s in run.sets] == ["spelling-0", "template-0", "spelling-1"]        # --limit 3
    hf = models.load_generator(files["model"], torch.device("cpu"), torch.float32)
    stops = set(run.formatter.stop_ids)
    assert len(gen.prefixes) == len(gen.responses) == 3
    for prefixes, responses, s in zip(gen.prefixes, gen.responses, run.sets):
        assert len(prefixes) == len(responses) == len(s.variants)
        assert prefixes == [run.formatter.prefix(x) for x in s.variants]       # the rendered variants
        for p, y in zip(prefixes, responses):
            assert list(y) == greedy_one_by_one(hf, p, stops, 5)
    alpaca = gen.judge["alpaca_eval"]
    assert [i for i, _ in alpaca] == [0, 1] and [o["instruction"] for _, o in alpaca] == ["Add 2 and 3.",
                                                                                         "Name a colour."]
    assert all(o["generator"] == "cell" and isinstance(o["output"], str) for _, o in alpaca)
    mt = gen.judge["mt_bench"]
    assert [o["question_id"] for _, o in mt] == [81, 101] and [len(o["choices"][0]["turns"]) for _, o in mt] == [2, 1]


def test_a_generator_that_does_not_load_fails_every_generated_part_and_nothing_else(files, tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise OSError("no weights here")
    monkeypatch.setattr(models, "load_generator", broken)
    run = EvalRun.start(options(files, tmp_path))
    gen = evalrun.generation_phase(run)
    assert gen.prefixes is None and gen.responses is None and gen.judge == {}
    assert set(run.errors) == {"posix", "generations/alpaca_eval", "generations/mt_bench"}
    assert all(e == "loading the model for generation: OSError: no weights here" for e in run.errors.values())
    # the parts that need it are then recorded as failed, with no model loaded and no file written
    monkeypatch.setattr(models, "load_scorer", broken)
    evalrun.posix_scoring_phase(run, gen)
    evalrun.judge_files_phase(run, gen)
    assert run.new["attempted"] == ["posix", "generations/alpaca_eval", "generations/mt_bench"]
    assert "posix" not in run.new and "generations" not in run.new and not os.listdir(tmp_path)


def test_posix_scoring_phase_scores_the_generated_responses_as_an_independent_fp64_computation(files, generated):
    run, gen = generated
    evalrun.posix_scoring_phase(run, gen)
    assert run.errors == {} and run.new["attempted"] == ["posix"] and "posix_scoring" in run.timing
    p = run.new["posix"]
    assert [s["id"] for s in p["sets"]] == ["spelling-0", "template-0", "spelling-1"]
    assert p["posix"] == pytest.approx(np.mean([s["psi"] for s in p["sets"]]))
    hf64 = models.load_generator(files["model"], torch.device("cpu"), torch.float64)
    for s, prefixes in zip(p["sets"], gen.prefixes):
        ref = [[reference_logprob(hf64, x, y) for y in s["response_tokens"]] for x in prefixes]
        np.testing.assert_allclose(s["logprobs"], ref, rtol=2e-5, atol=2e-4)


def test_posix_scoring_phase_records_a_scorer_failure_under_posix(files, generated, monkeypatch):
    run, gen = generated
    run = EvalRun.start(run.opts)

    def broken(*a, **kw):
        raise RuntimeError("scorer exploded")
    monkeypatch.setattr(models, "load_scorer", broken)
    evalrun.posix_scoring_phase(run, gen)
    assert run.errors == {"posix": "RuntimeError: scorer exploded"} and "posix" not in run.new


def test_judge_files_phase_writes_the_files_the_judges_read(files, tmp_path):
    run = EvalRun.start(options(files, tmp_path, posix=None))
    outs = {"alpaca_eval": [(1, {"instruction": "b", "dataset": "toy", "output": "B", "generator": "cell"}),
                            (0, {"instruction": "a", "dataset": "toy", "output": "A", "generator": "cell"})],
            "mt_bench": [(0, {"question_id": 81, "answer_id": "x", "model_id": "cell",
                              "choices": [{"index": 0, "turns": ["one"]}], "tstamp": 0.0})]}
    evalrun.judge_files_phase(run, Generations(judge=outs))
    assert run.errors == {} and run.new["attempted"] == ["generations/alpaca_eval", "generations/mt_bench"]
    g = run.new["generations"]
    assert g["alpaca_eval"] == {"file": os.path.join("alpaca_eval", "model_outputs.json"), "count": 2,
                                "model_id": "cell", "max_new_tokens": 4, "decoding": "greedy"}
    assert g["mt_bench"]["file"] == os.path.join("mt_bench", "model_answer", "cell.jsonl")
    written = json.loads((tmp_path / g["alpaca_eval"]["file"]).read_text())
    assert [a["output"] for a in written] == ["A", "B"]          # gathered: in the records' order
    answers = [json.loads(line) for line in (tmp_path / g["mt_bench"]["file"]).read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81]


def test_judge_files_phase_writes_nothing_for_a_failed_benchmark(files, tmp_path):
    run = EvalRun.start(options(files, tmp_path, posix=None))
    run.errors["generations/mt_bench"] = "ValueError: boom"
    outs = {"alpaca_eval": [(0, {"instruction": "a", "dataset": "toy", "output": "A", "generator": "cell"})]}
    evalrun.judge_files_phase(run, Generations(judge=outs))
    assert set(run.new["generations"]) == {"alpaca_eval"} and run.errors == {"generations/mt_bench": "ValueError: boom"}
    assert not (tmp_path / "mt_bench").exists()


@pytest.mark.skipif(harness.available() is None, reason="lm-eval is not installed (pip install 'witscale[eval]')")
def test_harness_tasks_phase_passes_the_run_to_lm_eval_and_records_failed_tasks(files, tmp_path, monkeypatch):
    (tmp_path / "tasks").mkdir()
    calls = []

    def fake_run_tasks(model_dir, tasks, **kw):
        calls.append((model_dir, tasks, kw))
        return {"tasks": {"good": {"score": 0.5, "higher_is_better": True}, "bad": {"error": "ValueError: gone"}},
                "config": {"preset": kw["preset"]}}
    monkeypatch.setattr(harness, "task_manager", lambda tasks, preset, include_path: "manager")
    monkeypatch.setattr(harness, "run_tasks", fake_run_tasks)
    run = EvalRun.start(options(files, tmp_path, posix=None, alpaca_eval=None, mt_bench=None, tasks=["good", "bad"],
                                include_path=str(tmp_path / "tasks")))
    evalrun.harness_tasks_phase(run)
    (model_dir, tasks, kw), = calls
    assert model_dir == files["model"] and tasks == ["good", "bad"]
    assert kw["manager"] == "manager" and kw["batch_size"] == 8 and kw["device"] == "cpu" and kw["dtype"] == "float32"
    assert kw["add_bos"] is True and kw["limit"] == 3 and kw["backend"] == "hf"
    assert run.new["attempted"] == ["tasks/good", "tasks/bad"] and run.new["tasks"]["good"]["score"] == 0.5
    assert run.new["lm_eval"] == {"preset": "paper"} and run.errors == {"tasks/bad": "ValueError: gone"}

    def exploding(*a, **kw):
        raise RuntimeError("lm-eval fell over")
    monkeypatch.setattr(harness, "run_tasks", exploding)
    run = EvalRun.start(run.opts)
    evalrun.harness_tasks_phase(run)
    assert run.errors == {t: "RuntimeError: lm-eval fell over" for t in ("tasks/good", "tasks/bad")}
    assert "tasks" not in run.new and "tasks" in run.timing


def test_write_report_merges_the_run_into_eval_results(files, tmp_path):
    (tmp_path / "eval_results.json").write_text(json.dumps({"tasks": {"mmlu": {"score": 0.4, "higher_is_better": True}},
                                                            "attempted": ["tasks/mmlu"]}))
    run = EvalRun.start(options(files, tmp_path, alpaca_eval=None, mt_bench=None))
    run.new["attempted"].append("posix")
    run.new["posix"] = {"posix": 0.25, "posix_by_kind": {"spelling": 0.25}}
    run.timing["posix_scoring"] = 1.5
    path = evalrun.write_report(run)
    r = json.loads(open(path).read())
    assert r["posix"]["posix"] == 0.25 and r["tasks"]["mmlu"]["score"] == 0.4        # merged: the rest is kept
    assert r["settings"]["world_size"] == 1 and r["settings"]["device"] == "cpu" and r["settings"]["limit"] == 3
    assert r["settings"]["posix_file"] == os.path.abspath(files["prompts"]) and r["timing_s"] == {"posix_scoring": 1.5}
    assert r["errors"] == {} and r["model"] == os.path.abspath(files["model"])
