"""The fixed templates as Jinja chat templates, for the exported tokenizer (``chat_template``): what
``tokenizer.apply_chat_template(messages, tools=tools)`` renders is exactly what the packer renders
(witscale/data/templates.py) for the same conversation, so a model trained on packed data is prompted at
inference the way it was trained. Tests hold each pair equal token for token (tests/test_template_travels.py).

Messages are OpenAI style, as ``hf_messages`` writes them: ``content`` a string, the reasoning as
``reasoning_content``, ``tool_calls`` ``[{type: function, function: {name, arguments}}]`` (arguments an object
or a JSON string), ``tool`` messages; a user message may carry Alpaca's ``input`` separately (alpaca renders its
``### Input:`` block, the other templates append it after a blank line). ``add_generation_prompt`` ends the
rendering where the packer's answer would start. The ``hf`` template keeps the tokenizer's own.
"""
from __future__ import annotations

import json

from witscale.data.chat_template import hf_message
from witscale.data.readers import Conversation
from witscale.data.templates import (ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT, CHATML_TOOLS_HEAD, CHATML_TOOLS_TAIL,
                                     LLAMA3_TOOLS_HEAD)


def _lit(s: str) -> str:
    """A Python string as a Jinja string literal (JSON's escaping is a subset Jinja reads)."""
    return json.dumps(s)


# pieces shared by the templates: the reasoning block, a user turn's text (+ Alpaca input)
_THINK = ("{%- if m.reasoning_content is defined and m.reasoning_content is not none -%}"
          "{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' -}}{%- endif -%}")
_TEXT = "{{- m.content if m.content is string else '' -}}{%- if m.input -%}{{- '\\n\\n' + m.input -}}{%- endif -%}"
_ARGS = "{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}"
# BOS, then AFTER_BOS: a space where the tokenizer gives text that follows a special token no word-boundary
# prefix but the packer encodes the text after a leading BOS as a fresh string, with one (SentencePiece /
# LLaMA-2's Metaspace: "<s>Hi" → "Hi", the packer's "▁Hi"); the export picks it (bos_separator)
_BOS = "{%- if bos_token -%}{{- bos_token + AFTER_BOS -}}{%- endif -%}"

PLAIN = (_BOS + "{%- set ns = namespace(prev='') -%}{%- for m in messages -%}"
         "{%- if m.role == 'system' -%}{{- m.content + '\\n\\n' -}}"
         "{%- elif m.role == 'user' -%}{%- if ns.prev == 'assistant' -%}{{- '\\n' -}}{%- endif -%}" + _TEXT +
         "{%- else -%}{{- ' ' -}}" + _THINK + "{{- m.content -}}{%- endif -%}"
         "{%- set ns.prev = m.role -%}{%- endfor -%}"
         "{%- if messages[-1].role == 'assistant' -%}{{- eos_token -}}{%- elif add_generation_prompt -%}{{- ' ' -}}"
         "{%- endif -%}")

ALPACA = (_BOS + "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
          "{%- if messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' -}}"
          "{%- elif users and users[0].input -%}{{- " + _lit(ALPACA_PREAMBLE_INPUT) + " -}}"
          "{%- else -%}{{- " + _lit(ALPACA_PREAMBLE) + " -}}{%- endif -%}"
          "{%- set ns = namespace(seen=false) -%}{%- for m in messages -%}"
          "{%- if m.role == 'user' -%}{%- if ns.seen -%}{{- '\\n\\n' -}}{%- endif -%}"
          "{{- '### Instruction:\\n' + m.content -}}{%- if m.input -%}{{- '\\n\\n### Input:\\n' + m.input -}}"
          "{%- endif -%}{{- '\\n\\n### Response:\\n' -}}{%- set ns.seen = true -%}"
          "{%- elif m.role == 'assistant' -%}" + _THINK + "{{- m.content -}}{%- endif -%}{%- endfor -%}"
          "{%- if messages[-1].role == 'assistant' -%}{{- eos_token -}}{%- endif -%}")

CHATML = ("{%- set start = 0 -%}"
          "{%- if tools -%}{{- '<|im_start|>system\\n' -}}"
          "{%- if messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' -}}{%- endif -%}"
          "{{- " + _lit(CHATML_TOOLS_HEAD) + " -}}"
          "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
          "{{- " + _lit(CHATML_TOOLS_TAIL) + " + '<|im_end|>\\n' -}}{%- endif -%}"
          "{%- for m in messages -%}"
          "{%- if loop.first and tools and m.role == 'system' -%}"
          "{%- elif m.role == 'tool' -%}"
          "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
          "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' -}}"
          "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
          "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' -}}"
          "{%- if m.role == 'assistant' -%}" + _THINK + "{{- m.content if m.content is string else '' -}}"
          "{%- for call in (m.tool_calls or []) -%}"
          "{%- set fn = call.function if call.function is defined else call -%}"
          "{%- if not loop.first or m.content -%}{{- '\\n' -}}{%- endif -%}"
          "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' -}}" + _ARGS +
          "{{- '}\\n</tool_call>' -}}{%- endfor -%}"
          "{%- else -%}" + _TEXT + "{%- endif -%}{{- '<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

_L3_HEADER = "'<|start_header_id|>' + {role} + '<|end_header_id|>\\n\\n'"
LLAMA3 = ("{{- '<|begin_of_text|>' -}}"
          "{%- if tools -%}{{- " + _L3_HEADER.format(role="'system'") + " + " + _lit(LLAMA3_TOOLS_HEAD) + " -}}"
          "{%- for tool in tools -%}{{- (tool | tojson(indent=4)) + '\\n\\n' -}}{%- endfor -%}"
          "{%- if messages[0].role == 'system' -%}{{- messages[0].content -}}{%- endif -%}"
          "{{- '<|eot_id|>' -}}{%- endif -%}"
          "{%- for m in messages -%}"
          "{%- if loop.first and tools and m.role == 'system' -%}"
          "{%- else -%}{{- " + _L3_HEADER.format(role="('ipython' if m.role == 'tool' else m.role)") + " -}}"
          "{%- if m.role == 'assistant' and m.tool_calls -%}"
          "{%- set fn = m.tool_calls[0].function if m.tool_calls[0].function is defined else m.tool_calls[0] -%}"
          + _THINK + "{{- '{\"name\": \"' + fn.name + '\", \"parameters\": ' -}}" + _ARGS + "{{- '}' -}}"
          "{%- elif m.role == 'assistant' -%}" + _THINK + "{{- m.content -}}"
          "{%- else -%}" + _TEXT + "{%- endif -%}{{- '<|eot_id|>' -}}{%- endif -%}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{- " + _L3_HEADER.format(role="'assistant'") + " -}}{%- endif -%}")

TULU = (_BOS + "{%- for m in messages -%}{{- '<|' + m.role + '|>\\n' -}}"
        "{%- if m.role == 'assistant' -%}" + _THINK + "{{- m.content + eos_token -}}"
        "{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}"
        "{%- else -%}" + _TEXT + "{{- '\\n' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}")

_SOURCES = {"plain": PLAIN, "alpaca": ALPACA, "chatml": CHATML, "llama3": LLAMA3, "tulu": TULU}


def jinja_template(name: str, after_bos: str = "") -> str:
    """The chat template of a fixed template; `after_bos`: what follows a leading BOS (see bos_separator)."""
    return _SOURCES[name].replace("AFTER_BOS", _lit(after_bos))


JINJA_TEMPLATES = {name: jinja_template(name) for name in _SOURCES}


def hf_messages(conv: Conversation) -> tuple[list[dict], list | None]:
    """(messages, tools) for ``apply_chat_template`` with the templates above: OpenAI style, Alpaca's input kept
    apart (the templates place it)."""
    out = []
    for m in conv.messages:
        d = hf_message(m)
        if m.input:
            d["content"], d["input"] = m.text, m.input
        out.append(d)
    return out, list(conv.tools) if conv.tools else None


def bos_separator(tokenizer_dir: str, template: str) -> str:
    """What the exported chat template writes after a leading BOS so that the tokenizer of `tokenizer_dir`
    gives the packer's ids: ' ' for a dummy-prefix tokenizer (SentencePiece, LLaMA-2's Metaspace) where text
    follows the BOS (the packer encodes it as a fresh string, "▁Hi"; "<s>Hi" as text gives "Hi"), '' otherwise
    (byte-level BPE; a role marker the vocabulary holds as one token). Chosen by rendering a probe
    conversation both ways; '' when neither agrees."""
    from transformers import AutoTokenizer

    from witscale.data.readers import normalize_record
    from witscale.data.render import Renderer
    from witscale.data.tokenizer import load_tokenizer
    hf = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, trust_remote_code=False)
    conv = normalize_record({"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hello world"},
                                          {"role": "assistant", "content": "Hi there"}]}, "messages")
    try:
        want = Renderer(template, load_tokenizer(tokenizer_dir))(conv).ids.tolist()
    except Exception:                    # a tokenizer this template cannot use: nothing to match
        return ""
    messages, tools = hf_messages(conv)
    for sep in ("", " "):
        ids = hf.apply_chat_template(messages, tools=tools, tokenize=True, chat_template=jinja_template(template, sep))
        if list(ids["input_ids"] if hasattr(ids, "keys") else ids) == want:
            return sep
    return ""


# ---------------------------------------------------------------------------------------------- the export
EXPORT_META = "witscale.json"     # written into an exported HF directory: how the model was trained


def add_chat_template(tokenizer_dir: str, template: str) -> bool:
    """Give the exported tokenizer the packer's template as its chat_template (tokenizer_config.json, and
    chat_template.jinja, which transformers 5 reads first). ``hf`` keeps the tokenizer's own; no
    tokenizer_config.json: nothing to extend (False)."""
    import os
    config = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if template not in JINJA_TEMPLATES or not os.path.exists(config):
        return False
    with open(config, encoding="utf-8") as f:
        cfg = json.load(f)
    text = jinja_template(template, bos_separator(tokenizer_dir, template))
    cfg["chat_template"] = text
    with open(config, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1, ensure_ascii=False)
    with open(os.path.join(tokenizer_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(text)
    return True


def training_meta(data: str | None, weight_table: dict, normalization: str | None, objective: str) -> dict:
    """witscale.json's content: the packed data's template and class table (from its manifest), the loss
    weight per class and the normalization the model was trained with."""
    import os
    manifest = {}
    path = os.path.join(data, "manifest.json") if data else None
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    return {"template": manifest.get("template"), "class_table": manifest.get("class_table"),
            "weights": weight_table, "normalization": normalization, "objective": objective, "data": data}


def read_export_meta(model_dir: str) -> dict:
    """witscale.json of an exported directory ({} when absent: a model not exported by witscale)."""
    import os
    path = os.path.join(model_dir, EXPORT_META)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_eval_template(model_dir: str, explicit: str | None) -> tuple[str, str | None]:
    """(template to evaluate with, a warning line or None): the template the model was trained with
    (witscale.json) unless one is given; a given one that differs is used, with a warning."""
    trained = read_export_meta(model_dir).get("template")
    if explicit is None:
        return trained or "plain", None
    if trained and explicit != trained:
        return explicit, (f"warning: --template {explicit} differs from the template {model_dir} was trained with "
                          f"({trained}, in its {EXPORT_META}); scores will reflect the mismatch")
    return explicit, None
