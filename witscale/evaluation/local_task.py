"""A small lm-evaluation-harness task on local files (no hub): a task YAML next to a JSONL of documents, for
``--include-path``. lm-eval reads local data through the ``json`` dataset builder
(``dataset_path: json``, ``dataset_kwargs: {data_files: …}``), which works offline.

``write_multiple_choice_task(dir, name, docs)``: each doc is ``{"question": …, "choices": [...], "answer": k}``;
lm-eval scores every choice as the continuation of the question (joined by one space — the ``plain``
template's joining space) and reports ``acc`` (and ``acc_norm``).
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence


def write_multiple_choice_task(directory: str, name: str, docs: Sequence[dict]) -> str:
    """Write ``<name>.yaml`` and ``<name>.jsonl`` into ``directory``; returns the directory (--include-path)."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"task name {name!r}: use letters, digits and underscores")
    os.makedirs(directory, exist_ok=True)
    data = os.path.abspath(os.path.join(directory, f"{name}.jsonl"))
    with open(data, "w", encoding="utf-8") as f:
        for d in docs:
            if not (isinstance(d.get("choices"), list) and 0 <= int(d["answer"]) < len(d["choices"])):
                raise ValueError(f"bad document {d}: needs 'question', 'choices' and an 'answer' index")
            f.write(json.dumps({"question": d["question"], "choices": d["choices"], "answer": int(d["answer"])},
                               ensure_ascii=False) + "\n")
    yaml = (f"task: {name}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: {json.dumps(data)}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            "doc_to_text: \"{{question}}\"\n"
            "doc_to_choice: \"{{choices}}\"\n"
            "doc_to_target: \"{{answer}}\"\n"
            "target_delimiter: \" \"\n"
            "metric_list:\n"
            "  - metric: acc\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
            "  - metric: acc_norm\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
            "metadata:\n"
            "  version: 1.0\n")
    with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(yaml)
    return directory
