"""Generations for the judge-based benchmarks (AlpacaEval, MT-Bench), in the files those tools read.

Judging needs an API model and stays outside witscale; what is written here is the model's side:

* **AlpacaEval** — input: the evaluation set (``alpaca_eval.json`` of ``tatsu-lab/alpaca_eval``: a JSON array, or
  JSONL, of ``{"instruction", "dataset", …}``); output ``alpaca_eval/model_outputs.json``: the same records with
  ``output`` (the model's response) and ``generator`` (the model id), which
  ``alpaca_eval --model_outputs alpaca_eval/model_outputs.json`` reads.
* **MT-Bench** — input: FastChat's ``question.jsonl`` (``{"question_id", "category", "turns": [...]}``); output
  ``mt_bench/model_answer/<model_id>.jsonl`` in FastChat's answer format (``{"question_id", "answer_id",
  "model_id", "choices": [{"index": 0, "turns": [...]}], "tstamp"}``), the file ``gen_judgment.py
  --model-list <model_id>`` looks for under ``data/mt_bench/model_answer/``. The second turn is generated with
  the first question and the model's own first answer in the conversation.

Decoding is greedy (the WIT paper's setting) with the packer's template; ``max_new_tokens`` bounds each turn.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Sequence

# A function from conversations (lists of (role, text) ending with a user turn) to response texts.
GenerateFn = Callable[[Sequence[Sequence[tuple[str, str]]]], list[str]]


def _read_json_or_jsonl(path: str) -> list:
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_alpaca_eval(path: str) -> list[dict]:
    records = _read_json_or_jsonl(path)
    for k, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise ValueError(f"{path}: record {k + 1} has no 'instruction'")
    return records


def alpaca_eval_outputs(records: Sequence[dict], generate: GenerateFn, model_id: str) -> list[dict]:
    texts = generate([[("user", r["instruction"])] for r in records])
    return [{"instruction": r["instruction"], "dataset": r.get("dataset", ""), "output": t, "generator": model_id}
            for r, t in zip(records, texts)]


def read_mt_bench(path: str) -> list[dict]:
    questions = _read_json_or_jsonl(path)
    for k, q in enumerate(questions):
        if not isinstance(q, dict) or "question_id" not in q or not isinstance(q.get("turns"), list) or not q["turns"]:
            raise ValueError(f"{path}: question {k + 1} needs 'question_id' and a non-empty 'turns' list")
    return questions


def mt_bench_answers(questions: Sequence[dict], generate: GenerateFn, model_id: str) -> list[dict]:
    """Turn by turn, all questions at once: turn t sees the earlier questions and the model's answers."""
    history = [[] for _ in questions]
    answers = [[] for _ in questions]
    for t in range(max(len(q["turns"]) for q in questions)):
        active = [k for k, q in enumerate(questions) if t < len(q["turns"])]
        convs = [history[k] + [("user", questions[k]["turns"][t])] for k in active]
        texts = generate(convs)
        for k, conv, text in zip(active, convs, texts):
            history[k] = conv + [("assistant", text)]
            answers[k].append(text)
    now = time.time()
    return [{"question_id": q["question_id"], "answer_id": f"{model_id}-{q['question_id']}", "model_id": model_id,
             "choices": [{"index": 0, "turns": a}], "tstamp": now} for q, a in zip(questions, answers)]


def write_alpaca_eval(outputs: list[dict], out_dir: str) -> str:
    path = os.path.join(out_dir, "alpaca_eval", "model_outputs.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(outputs, f, ensure_ascii=False, indent=1)
    return path


def write_mt_bench(answers: list[dict], out_dir: str, model_id: str) -> str:
    path = os.path.join(out_dir, "mt_bench", "model_answer", f"{model_id}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for a in answers:
            f.write(json.dumps(a, ensure_ascii=False) + "\n")
    return path
