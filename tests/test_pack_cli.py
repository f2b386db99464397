import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, write_json, write_jsonl
from tests.test_readers import OPENAI_TOOLS, SHAREGPT_TOOLS
from witscale.data.classes import TokenClass as C
from witscale.data.format import PackedDataset
from witscale.data.pack import PackOptions, pack_records

GOOD = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}


def run_cli(*args, env=None):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONPATH="", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "pack_dataset.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)


def test_cli_end_to_end_and_workers_are_deterministic(tmp_path, sp_model_path, synthetic_records):
    path = write_jsonl(tmp_path / "train.jsonl", [r for r in synthetic_records if "messages" not in r])
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"ds{workers}"
        r = run_cli("--input", path, "--tokenizer", sp_model_path, "--seq-len", 256, "--output", out,
                    "--template", "alpaca", "--workers", workers)
        assert r.returncode == 0, r.stderr
        assert "detected format alpaca" in r.stderr and "packing efficiency" in r.stdout
        outs.append(out)
    for name in sorted(os.listdir(outs[0])):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    ds = PackedDataset(str(outs[0]))
    m = ds.manifest
    assert m["counts"]["records_read"] == m["num_documents"] == m["sources"][0]["records"]
    assert m["template"] == "alpaca" and not ds.has_weights and m["tokenizer"]["vocab_size"] == 600
    assert m["counts"]["truncated"] == 0
    assert m["packing_efficiency"] == pytest.approx(m["num_tokens"] / (len(ds) * 256))
    # every document ends with EOT (EOS), begins with BOS
    for i in range(len(ds)):
        row = ds[i]
        ends = np.cumsum(row.doc_lengths)
        assert (row.classes[ends - 1] == C.EOT).all() and (row.tokens[ends - row.doc_lengths] == 1).all()


def test_pack_records_from_python_with_weights(tmp_path, sp_model_path):
    recs = [{"messages": [{"role": "user", "content": "hi", "loss_weight": 0.0},
                          {"role": "assistant", "content": "hello", "loss_weight": 1.0}]},
            {"messages": [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"}],
             "weight": 3}]
    m = pack_records(recs, sp_model_path, str(tmp_path / "ds"), PackOptions(seq_len=64, template="chatml"))
    ds = PackedDataset(str(tmp_path / "ds"))
    assert m["has_weights"] and ds.has_weights
    row = ds[0]
    w = row.weights[:int(row.doc_lengths.sum())]
    assert set(np.unique(w).tolist()) == {0.0, 1.0, 3.0}
    assert (row.weights[row.classes == C.PROMPT] != 1.0).all()


def _bad_cases(tmp_path):
    good = json.dumps(GOOD)
    cases = {
        "invalid_json": (write_jsonl(tmp_path / "a.jsonl", [good, "{oops", good]), "a.jsonl:line 2: invalid JSON"),
        "missing_field": (write_jsonl(tmp_path / "b.jsonl", [GOOD, {"instruction": "x", "input": ""}]),
                          "b.jsonl:line 2: missing field 'output'"),
        "mistyped": (write_jsonl(tmp_path / "c.jsonl", [GOOD, {"instruction": "x", "output": 5}]),
                     "c.jsonl:line 2: field 'output' must be a string"),
        "empty_response": (write_json(tmp_path / "d.json", [GOOD, GOOD, {"instruction": "x", "output": " "}]),
                           "d.json:record 3: message 2: empty response"),
        "unknown_role": (write_jsonl(tmp_path / "e.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                                          {"role": "assistant", "content": "y"}]},
                                                            {"messages": [{"role": "wizard", "content": "x"}]}]),
                         "e.jsonl:line 2: messages[1]: unknown role 'wizard'"),
    }
    bad = tmp_path / "f.jsonl"
    bad.write_bytes(good.encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "y"}\n')
    cases["non_utf8"] = (str(bad), "f.jsonl:line 2: not valid UTF-8")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    cases["tools_in_plain"] = (write_jsonl(tmp_path / "g.jsonl", [share, SHAREGPT_TOOLS]),
                               "g.jsonl:line 2: template 'plain' cannot express tools (the record has tool calls, "
                               "tool results, tools); use --template chatml, llama3 or hf")
    think = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>unclosed"}]}
    cases["unclosed_think"] = (write_jsonl(tmp_path / "h.jsonl", [chat, think]),
                               "h.jsonl:line 2: messages[2]: <think> at the start of the message is never closed")
    return cases


RECORD_CASES = ["invalid_json", "missing_field", "mistyped", "empty_response", "unknown_role", "non_utf8",
                "tools_in_plain", "unclosed_think"]


@pytest.mark.parametrize("case", RECORD_CASES)
def test_bad_records_fail_cleanly_or_are_skipped(tmp_path, sp_model_path, case):
    path, message = _bad_cases(tmp_path)[case]
    out = tmp_path / "out"
    r = run_cli("--input", path, "--tokenizer", sp_model_path, "--seq-len", 64, "--output", out)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and message in line and "Traceback" not in r.stderr
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]
    r = run_cli("--input", path, "--tokenizer", sp_model_path, "--seq-len", 64, "--output", out, "--skip-invalid",
                "--max-skip-fraction", 1)
    assert r.returncode == 0, r.stderr
    m = PackedDataset(str(out)).manifest
    assert m["counts"]["skipped"] == 1 and message.split(": ", 1)[1] in m["skipped"][0]
    assert m["counts"]["records_read"] == m["num_documents"] + 1
    assert "records skipped      1" in r.stdout


@pytest.mark.parametrize("case", ["empty_file", "bad_tokenizer", "unknown_format", "no_special", "exists", "utf16",
                                  "no_glob_match", "hub_offline"])
def test_run_level_errors(tmp_path, sp_model_path, case):
    good = write_jsonl(tmp_path / "g.jsonl", [GOOD])
    args = {"input": good, "tokenizer": sp_model_path, "extra": []}
    if case == "empty_file":
        (tmp_path / "empty.jsonl").write_text("")
        args["input"], needle = str(tmp_path / "empty.jsonl"), "empty.jsonl: input file is empty"
    elif case == "bad_tokenizer":
        (tmp_path / "tok.model").write_bytes(b"not a model")
        args["tokenizer"], needle = str(tmp_path / "tok.model"), "tok.model: cannot load SentencePiece model"
    elif case == "unknown_format":
        args["input"] = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
        needle = "u.jsonl:line 1: cannot detect the format from the first record (keys: answer, question); known formats"
    elif case == "no_special":
        import sentencepiece as s
        s.SentencePieceTrainer.train(sentence_iterator=iter(["some plain text"] * 10), vocab_size=300,
                                     model_prefix=str(tmp_path / "p"), byte_fallback=True, hard_vocab_limit=False,
                                     minloglevel=2)
        args["tokenizer"], args["extra"] = str(tmp_path / "p.model"), ["--template", "llama3"]
        needle = "needs the special token '<|begin_of_text|>'"
    elif case == "utf16":
        (tmp_path / "w.jsonl").write_bytes(json.dumps(GOOD).encode("utf-16"))
        args["input"], needle = str(tmp_path / "w.jsonl"), "w.jsonl: the file is UTF-16"
    elif case == "no_glob_match":
        args["input"], needle = str(tmp_path / "*.parquet"), "*.parquet: no file matches this pattern"
    elif case == "hub_offline":
        args["input"] = "some-org/no-such-dataset"
        needle = "some-org/no-such-dataset: cannot load as a Hugging Face dataset"
    else:
        (tmp_path / "out").mkdir()
        needle = "output already exists; pass --overwrite"
    r = run_cli("--input", args["input"], "--tokenizer", args["tokenizer"], "--seq-len", 64,
                "--output", tmp_path / "out", *args["extra"], env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert needle in r.stderr.strip().splitlines()[-1], r.stderr
    if case != "exists":
        assert not (tmp_path / "out").exists()


def test_windows_file_with_bom_crlf_blank_lines_and_null_input(tmp_path, sp_model_path):
    lines = [json.dumps(GOOD), "", json.dumps({"instruction": "Say hi.", "input": None, "output": "hi"}), ""]
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    r = run_cli("--input", path, "--tokenizer", sp_model_path, "--seq-len", 64, "--output", tmp_path / "out",
                "--template", "alpaca")
    assert r.returncode == 0, r.stderr
    m = PackedDataset(str(tmp_path / "out")).manifest
    assert m["counts"]["records_read"] == m["num_documents"] == 2 and m["counts"]["skipped"] == 0


def test_tool_calling_data_packs_with_its_own_classes(tmp_path, sp_model_path):
    """ShareGPT function_call/observation data and OpenAI tool_calls data, detected and said so, packed with
    chatml: the manifest counts tokens of every new class; the stats table lists them."""
    a = write_jsonl(tmp_path / "a.jsonl", [SHAREGPT_TOOLS] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [OPENAI_TOOLS] * 2)
    out = tmp_path / "out"
    r = run_cli("--input", a, b, "--tokenizer", sp_model_path, "--seq-len", 1024, "--output", out,
                "--template", "chatml")
    assert r.returncode == 0, r.stderr
    assert "a.jsonl: detected format sharegpt (tool calls, tool results, tools)" in r.stderr
    assert "b.jsonl: detected format messages (reasoning, tool calls, tool results, tools)" in r.stderr
    ds = PackedDataset(str(out))
    per = ds.manifest["tokens_per_class"]
    assert all(per[c] > 0 for c in ("system", "prompt", "response", "eot", "reasoning", "tool_call", "tool"))
    assert "  tool_call" in r.stdout and "  reasoning" in r.stdout
    assert ds.num_classes == 9 and int(ds.classes.max()) == C.TOOL


def test_dataset_directories_and_globs_as_inputs(tmp_path, sp_model_path):
    """A save_to_disk DatasetDict with --split; a folder of JSONL files (datasets.load_dataset); a glob."""
    import datasets
    train = [GOOD, {"instruction": "Say hi.", "input": None, "output": "hi"}]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train * 3),
                          "test": datasets.Dataset.from_list(train)}).save_to_disk(str(saved))
    env = {"HF_HOME": str(tmp_path / "hf")}
    r = run_cli("--input", saved, "--split", "test", "--tokenizer", sp_model_path, "--seq-len", 64,
                "--output", tmp_path / "o1", env=env)
    assert r.returncode == 0, r.stderr
    assert f"{saved}[test]: detected format alpaca" in r.stderr
    m = PackedDataset(str(tmp_path / "o1")).manifest
    assert m["num_documents"] == 2 and m["sources"][0]["split"] == "test" and len(m["sources"][0]["sha256"]) == 64
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", train * 2)
    r = run_cli("--input", folder, "--tokenizer", sp_model_path, "--seq-len", 64, "--output", tmp_path / "o2", env=env)
    assert r.returncode == 0, r.stderr
    assert PackedDataset(str(tmp_path / "o2")).manifest["num_documents"] == 4
    r = run_cli("--input", str(tmp_path / "folder" / "*.jsonl"), "--tokenizer", sp_model_path, "--seq-len", 64,
                "--output", tmp_path / "o3", env=env)
    assert r.returncode == 0, r.stderr
    m = PackedDataset(str(tmp_path / "o3")).manifest
    assert m["num_documents"] == 4 and m["sources"][0]["path"] == str(folder / "train.jsonl")
    # a record error inside a dataset names the dataset, split and record
    bad = tmp_path / "bad"
    datasets.Dataset.from_list([GOOD, {"instruction": "x", "input": "", "output": " "}]).save_to_disk(str(bad))
    r = run_cli("--input", bad, "--tokenizer", sp_model_path, "--seq-len", 64, "--output", tmp_path / "o4", env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {bad}[train]:record 2: message 2: empty response"


def test_auto_summarizes_the_whole_input_and_skips_are_counted_by_reason(tmp_path, sp_model_path):
    """--format auto reports what the whole input holds (not just its first record); --skip-invalid counts the
    skipped records by reason and fails, writing nothing, above --max-skip-fraction (default 0.05). A lone
    surrogate is one such record error, not a crash."""
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    v1_call = {"messages": [
        {"role": "system", "content": [{"type": "text", "value": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "value": "Weather in Paris?"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Call it."},
                                          {"type": "tool_call", "value": '{"name": "w", "arguments": {"c": "P"}}'}]},
        {"role": "tool", "content": [{"type": "text", "value": "21"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "21 degrees."}]}]}
    multi = {"messages": chat["messages"] * 2}
    robot = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    lines = [json.dumps(r) for r in [chat] * 30 + [v1_call] * 5 + [multi] * 3]
    lines += [json.dumps(robot)] * 2 + ['{"instruction": "x", "output": "bad \\ud800"}']
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = ["--input", path, "--tokenizer", sp_model_path, "--seq-len", 128, "--template", "chatml", "--skip-invalid"]
    r = run_cli(*base, "--output", tmp_path / "refused")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "refused").exists()
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --skip-invalid skipped 3 of 41 records (7.3%), more than --max-skip-fraction "
                           "0.05 allows; by reason: 2 unknown role '…'; known roles: ") and "1 output: a lone" in line
    out = tmp_path / "ok"
    r = run_cli(*base, "--output", out, "--max-skip-fraction", 0.1)
    assert r.returncode == 0, r.stderr
    assert (f"{path}: messages, 41 records: 5 with tool calls, 5 with tool results, 5 with reasoning, "
            f"5 with system, 3 multi-turn") in r.stderr
    assert "skipped 2 (4.9%): unknown role '…'" in r.stdout
    m = PackedDataset(str(out)).manifest
    assert m["counts"]["skipped"] == 3 and sum(m["counts"]["skipped_by_reason"].values()) == 3
    assert m["sources"][0]["content"]["tool calls"] == 5 and m["num_documents"] == 38
    assert any(s.startswith(f"{path}:line 41: output: a lone surrogate \\ud800") for s in m["skipped"])
    assert m["tokens_per_class"]["tool_call"] > 0 and m["tokens_per_class"]["reasoning"] > 0
