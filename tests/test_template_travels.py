"""The template travels with the model (issue 22 item 4): the exported tokenizer's chat_template renders what
the packer renders, token for token, for every fixed template; the export records the template, and
tools/evaluate.py defaults to it."""
import json

import numpy as np
import pytest

from tests.test_templates import hf_tool_tokenizers  # noqa: F401  (a fixture: byte-level BPE with the specials)
from witscale.data.readers import normalize_record
from witscale.data.render import Renderer
from witscale.data.template_jinja import JINJA_TEMPLATES, hf_messages

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
SIMPLE = {"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Add 2 and 3."},
                       {"role": "assistant", "content": "5", "reasoning_content": "Two plus three."},
                       {"role": "user", "content": "And 4 and 4?"},
                       {"role": "assistant", "content": "8"}]}
ALPACA_INPUT = {"instruction": "Reverse the order.", "input": "apple river", "output": "river apple"}
NO_SYSTEM = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}
# tools: one call per turn (what llama3 expresses), a result, reasoning before the call and an answer
ONE_CALL = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": "", "reasoning_content": "Call the tool.",
                          "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                           "arguments": {"city": "Paris"}}}]},
                         {"role": "tool", "content": "21"},
                         {"role": "assistant", "content": "It is 21 degrees."}], "tools": [TOOL]}
# chatml: text and two calls in one turn, two results in one run, no system prompt
TWO_CALLS = {"messages": [{"role": "user", "content": "Paris and Rome?"},
                          {"role": "assistant", "content": "Checking both.", "tool_calls": [
                              {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                              {"type": "function",
                               "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
                          {"role": "tool", "content": "21"}, {"role": "tool", "content": "25"},
                          {"role": "assistant", "content": "21 and 25."}], "tools": [TOOL]}

CASES = {"plain": [SIMPLE, NO_SYSTEM, ALPACA_INPUT], "alpaca": [SIMPLE, NO_SYSTEM, ALPACA_INPUT],
         "tulu": [SIMPLE, NO_SYSTEM, ALPACA_INPUT], "chatml": [SIMPLE, NO_SYSTEM, ALPACA_INPUT, ONE_CALL, TWO_CALLS],
         "llama3": [SIMPLE, NO_SYSTEM, ALPACA_INPUT, ONE_CALL]}


def _apply(hf, messages, tools, **kw):
    out = hf.apply_chat_template(messages, tools=tools, tokenize=True, **kw)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return list(ids)


@pytest.mark.parametrize("template", sorted(CASES))
def test_chat_template_ids_equal_the_packers(hf_tool_tokenizers, template):  # noqa: F811
    tok = hf_tool_tokenizers["qwen"]
    tok.hf.chat_template = JINJA_TEMPLATES[template]
    renderer = Renderer(template, tok)
    for rec in CASES[template]:
        conv = normalize_record(rec, "alpaca" if "instruction" in rec else "messages")
        messages, tools = hf_messages(conv)
        want = renderer(conv).ids.tolist()
        got = _apply(tok.hf, messages, tools)
        assert got == want, (template, rec, tok.hf.decode(got), tok.hf.decode(want))
        # the generation prompt: the rendering of the conversation up to its last answer
        prompt = _apply(tok.hf, messages[:-1], tools, add_generation_prompt=True)
        assert want[:len(prompt)] == prompt, (template, tok.hf.decode(prompt))


# ------------------------------------------------------------------------------------------ export → evaluate
def _export(tmp_path, sp_model_path, template):
    """A tiny model exported as training exports it, after packing its data with `template`."""
    import torch
    import transformers

    from witscale.data.pack import PackOptions, pack_records
    from witscale.data.template_jinja import training_meta
    from witscale.data.tokenizer import load_tokenizer
    from witscale.model import ModelConfig
    from witscale.training.export import write_hf_dir

    data = tmp_path / "packed"
    pack_records([SIMPLE, NO_SYSTEM], sp_model_path, str(data), PackOptions(seq_len=128, template=template))
    tok = load_tokenizer(sp_model_path)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=False,
                                   bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    config = {k: v for k, v in cfg.to_dict().items() if k in ModelConfig.__dataclass_fields__ or k == "model_type"}
    weights = {"prompt": 0.2, "response": 1.0}
    out = tmp_path / "hf"
    write_hf_dir(model.state_dict(), ModelConfig.from_dict(config), str(out), sp_model_path, dtype="fp32",
                 meta=training_meta(str(data), weights, "nonzero", "sft"))
    return out, data


@pytest.mark.slow  # trains through witscale/train.py in a subprocess, then evaluates the export
def test_export_carries_the_template_and_evaluate_defaults_to_it(tmp_path, sp_model_path):
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from witscale.data.format import PackedDataset
    out, data = _export(tmp_path, sp_model_path, "chatml")
    meta = json.loads((out / "witscale.json").read_text())
    manifest = PackedDataset(str(data)).manifest
    assert meta["template"] == "chatml" and meta["class_table"] == manifest["class_table"]
    assert meta["weights"] == {"prompt": 0.2, "response": 1.0} and meta["normalization"] == "nonzero"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == JINJA_TEMPLATES["chatml"]
    assert (out / "chat_template.jinja").read_text() == JINJA_TEMPLATES["chatml"]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "Add 2 and 3."}) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")

    def evaluate(name, *extra):
        r = subprocess.run([sys.executable, "tools/evaluate.py", "--no-progress", "--model", str(out), "--output",
                            str(tmp_path / name), "--posix", str(prompts), "--posix-kinds", "spelling", "--limit", "1",
                            "--max-new-tokens", "2", *extra], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r, json.loads((tmp_path / name / "eval_results.json").read_text())["settings"]["template"]

    r, used = evaluate("default")
    assert used == "chatml" and "warning" not in r.stderr
    r, used = evaluate("explicit", "--template", "plain")
    warnings = [line for line in r.stderr.splitlines() if "warning: --template" in line]
    assert used == "plain" and len(warnings) == 1 and "trained with (chatml" in warnings[0]


@pytest.mark.parametrize("template", ["plain", "alpaca", "tulu"])
def test_chat_template_after_bos_on_a_dummy_prefix_tokenizer(tmp_path, sp_model_path, template):
    """A Metaspace (SentencePiece / LLaMA-2 style) fast tokenizer gives text after a BOS written as text no
    word-boundary prefix, while the packer encodes the text after a leading BOS as a fresh string: the export
    writes a space after the BOS where text follows it (bos_separator), and the ids agree."""
    import shutil

    from transformers import AutoTokenizer

    from witscale.data.template_jinja import bos_separator, jinja_template
    from witscale.data.tokenizer import load_tokenizer
    src = tmp_path / "sp"
    src.mkdir()
    shutil.copyfile(sp_model_path, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(tmp_path / "hf"))
    tok = load_tokenizer(str(tmp_path / "hf"))
    sep = bos_separator(str(tmp_path / "hf"), template)
    assert tok.kind == "hf" and sep == (" " if template != "tulu" else "")   # tulu: the markers are tokens here
    tok.hf.chat_template = jinja_template(template, sep)
    for rec in (SIMPLE, NO_SYSTEM, ALPACA_INPUT):
        conv = normalize_record(rec, "alpaca" if "instruction" in rec else "messages")
        messages, tools = hf_messages(conv)
        assert _apply(tok.hf, messages, tools) == Renderer(template, tok)(conv).ids.tolist(), (template, rec)
