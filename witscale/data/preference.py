"""Preference pairs: raw records → (prompt + chosen, prompt + rejected) conversations → two documents.

Layouts (``pack_dataset.py --task preference``; the format is detected from the first record):
  preference           {prompt|messages, chosen, rejected, system?, tools?}    (UltraFeedback / TRL)
  sharegpt_preference  {conversations, chosen, rejected, system?, tools?}
``prompt`` is a string (one user turn) or a message list; ``messages`` / ``conversations`` a message list
(when a record has both ``prompt`` and ``messages``, as UltraFeedback-binarized does, ``prompt`` is the
prompt). ``chosen`` / ``rejected`` are each a string (one assistant turn), one message dict or a message list
(``{role|from, content|value}``, tool calls and reasoning as in SFT records, witscale/data/readers.py). A
list may be the completion alone (it starts with an assistant turn) or, as in TRL's conversational form and
UltraFeedback, the whole conversation repeating the prompt messages first — the repeated prefix must equal
the prompt. TRL's implicit-prompt form (no prompt field; chosen and rejected full conversations) takes their
longest shared prefix, up to the last non-assistant turn, as the prompt.

Both completions are rendered with the SFT templates and token classes, after the same prompt: every
assistant turn of the prompt is prompt-side (as ``--last-turn-only`` makes it), the completion's turns
response-side — so a DPO weight table (prompt side 0, response side 1) selects exactly the completion.

A pair longer than a row is an error, unless ``--max-prompt-length`` asks for TRL's truncation (Truncation):
the prompt is cut first, identically in both documents, then the completions from their end.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from witscale.data.classes import RESPONSE_SIDE
from witscale.data.errors import DataError, RecordError
from witscale.data.readers import Conversation, Message, _check_turns, _string, _tools, _turns
from witscale.data.templates import Document

PREFERENCE_FORMATS = ("preference", "sharegpt_preference")
_RESPONSE_SIDE = np.array(sorted(int(c) for c in RESPONSE_SIDE))


TRUNCATION_MODES = ("keep_end", "keep_start")


class PairDocuments(NamedTuple):
    """One pair, rendered: the prompt then the chosen completion; the same prompt then the rejected one."""
    chosen: Document
    rejected: Document
    truncated: tuple = ()     # what was cut to fit the row: () or some of ('prompt', 'completion')


class Truncation(NamedTuple):
    """TRL's DPO truncation (``max_prompt_length``, ``truncation_mode``) for a pair longer than a row: the
    prompt is cut to `max_prompt_length` tokens first (keep_end: its last ones, keep_start: its first), then
    the completions from their end until both documents fit the row."""
    max_prompt_length: int
    mode: str = "keep_end"


def detect_preference_format(record: Any) -> str:
    if isinstance(record, dict) and "chosen" in record and "rejected" in record:
        return "sharegpt_preference" if "conversations" in record else "preference"
    keys = ", ".join(sorted(record)[:8]) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"cannot detect a preference format from the first record (keys: {keys}); a preference "
                    f"record has 'chosen' and 'rejected' beside 'prompt', 'messages' or 'conversations'")


def _message_list(value: Any, key: str) -> list[Message]:
    """A message list (or one message dict) under `key`, in OpenAI (role/content) or ShareGPT (from/value) keys."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(f"field '{key}' must be a string, a message or a list of messages, got "
                          f"{type(value).__name__}")
    if not value:
        raise RecordError(f"field '{key}' is empty")
    first = value[0]
    sharegpt = isinstance(first, dict) and "from" in first and "role" not in first
    return _turns({key: value}, key, "from" if sharegpt else "role", "value" if sharegpt else "content")


def _same_turn(a: Message, b: Message) -> bool:
    return (a.role, a.full_text(), a.reasoning, a.tool_calls) == (b.role, b.full_text(), b.reasoning, b.tool_calls)


def _completion(record: dict, key: str, prompt: list[Message] | None) -> list[Message]:
    """The completion's messages under `key` (a repeated prompt prefix removed and checked)."""
    if key not in record or record[key] is None:
        raise RecordError(f"missing field '{key}'" if key not in record else f"field '{key}' is null")
    value = record[key]
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"field '{key}' is an empty completion")
        return [Message("assistant", value)]
    msgs = _message_list(value, key)
    if prompt is not None and msgs[0].role != "assistant":
        # the whole conversation (TRL conversational, UltraFeedback): it must repeat the prompt exactly
        body = prompt[1:] if prompt[0].role == "system" and msgs[0].role != "system" else prompt
        for i, want in enumerate(body):
            if i >= len(msgs) or not _same_turn(msgs[i], want):
                raise RecordError(f"field '{key}' repeats the prompt but differs from it at message {i + 1}")
        msgs = msgs[len(body):]
        if not msgs:
            raise RecordError(f"field '{key}' is an empty completion (only the prompt's messages)")
    return msgs


def _implicit_prompt(chosen: list[Message], rejected: list[Message]) -> list[Message]:
    """TRL's implicit prompt: the shared prefix of two full conversations, cut after its last non-assistant turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and _same_turn(chosen[n], rejected[n]):
        n += 1
    while n and chosen[n - 1].role == "assistant":
        n -= 1
    if n == 0:
        raise RecordError("missing field 'prompt' (or 'messages'), and chosen and rejected share no prompt turns")
    return chosen[:n]


def normalize_pair(record: Any, fmt: str, *, system: str | None = None) -> tuple[Conversation, Conversation]:
    """One raw pair → (prompt + chosen, prompt + rejected). Raises RecordError (the caller locates it)."""
    if fmt not in PREFERENCE_FORMATS:
        raise DataError(f"unknown preference format {fmt!r}; known: {', '.join(PREFERENCE_FORMATS)}")
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record or record[key] is None:
            raise RecordError(f"missing field '{key}'" if key not in record else f"field '{key}' is null")
    prompt_key = "conversations" if fmt == "sharegpt_preference" else next(
        (k for k in ("prompt", "messages") if record.get(k) is not None), None)
    if prompt_key is None:
        if not all(isinstance(record[k], list) for k in ("chosen", "rejected")):
            hint = "; a 'conversations' prompt is --format sharegpt_preference" if "conversations" in record else ""
            raise RecordError(f"missing field 'prompt' (or 'messages'){hint}")
        chosen_full, rejected_full = _message_list(record["chosen"], "chosen"), _message_list(record["rejected"], "rejected")
        prompt = _implicit_prompt(chosen_full, rejected_full)
        chosen, rejected = chosen_full[len(prompt):], rejected_full[len(prompt):]
    else:
        value = record.get(prompt_key)
        if value is None:
            raise RecordError(f"missing field '{prompt_key}'" if prompt_key not in record else
                              f"field '{prompt_key}' is null")
        if prompt_key == "prompt" and isinstance(value, str):
            prompt = [Message("user", _string(record, prompt_key, nonempty=True))]
        else:
            prompt = _message_list(value, prompt_key)
        chosen = _completion(record, "chosen", prompt)
        rejected = _completion(record, "rejected", prompt)
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[0].role != "assistant":
            raise RecordError(f"field '{key}': the completion must start with an assistant turn, got "
                              f"{msgs[0].role!r}")
        for i, m in enumerate(msgs, 1):
            if m.role == "assistant" and not m.text.strip() and not m.tool_calls:
                raise RecordError(f"field '{key}' is an empty completion" + (f" (message {i})" if len(msgs) > 1 else ""))
    if prompt[-1].role == "assistant":
        raise RecordError(f"field '{prompt_key or 'prompt'}': the prompt ends with an assistant turn; its "
                          f"completions would follow another answer")
    sys_text = _string(record, "system", required=False) if "messages" != prompt_key else None
    if sys_text:
        if prompt[0].role == "system":
            raise RecordError("both a 'system' field and a system message")
        prompt = [Message("system", sys_text)] + prompt
    elif system and prompt[0].role != "system":
        prompt = [Message("system", system)] + prompt
    # the prompt's own assistant turns are given, not generated: prompt-side
    prompt = [m._replace(as_prompt=True) if m.role == "assistant" else m for m in prompt]
    tools = _tools(record.get("tools"))
    # A data weight would multiply a completion's summed log-prob, i.e. scale β for that pair (or for one
    # side only): not a per-pair loss weight. Refused rather than given that meaning silently.
    if record.get("weight") is not None:
        raise RecordError("field 'weight': preference pairs take no data weights (a weight would scale the "
                          "pair's log-prob margin, i.e. its β, not weight its loss); remove it")
    for key, msgs in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        weighted = next((i for i, m in enumerate(msgs, 1) if m.weight is not None), None)
        if weighted is not None:
            raise RecordError(f"field '{key}': message {weighted} has a 'weight'; preference pairs take no data "
                              f"weights (it would scale that side's log-prob, i.e. β); remove it")
    out = []
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        try:
            _check_turns(prompt + msgs)
        except RecordError as e:
            raise RecordError(f"{key}: {e.problem}") from None
        out.append(Conversation(prompt + msgs, None, tools))
    return out[0], out[1]


def _prompt_length(doc: Document) -> int:
    """Tokens before the first response-side one: the rendered prompt, generation header included."""
    response = np.isin(doc.classes, _RESPONSE_SIDE)
    return int(np.argmax(response)) if response.any() else len(doc.classes)


def _cut(doc: Document, keep: np.ndarray) -> Document:
    return Document(doc.ids[keep], doc.classes[keep], None if doc.weights is None else doc.weights[keep])


def truncate_pair(docs: PairDocuments, n_prompt: int, seq_len: int, trunc: Truncation) -> PairDocuments:
    """Fit a too-long pair into `seq_len` (both documents, each with its copy of the prompt), TRL's way: the
    prompt to at most `max_prompt_length` tokens, the same ones in both documents; then, if still too long,
    the completions from their end, the longer one first (each keeps at least one token)."""
    p_keep = min(n_prompt, trunc.max_prompt_length)
    c_len, r_len = len(docs.chosen.ids) - n_prompt, len(docs.rejected.ids) - n_prompt
    budget = seq_len - 2 * p_keep               # room for the two completions
    if budget < 2:
        raise RecordError(f"--max-prompt-length {trunc.max_prompt_length} leaves no room for the completions in "
                          f"a row of {seq_len} (two copies of the prompt); lower it")
    if c_len + r_len > budget:                  # share the room: neither gets less than half unless it is short
        c_keep = min(c_len, max(budget // 2, budget - r_len))
        r_keep = min(r_len, budget - c_keep)
    else:
        c_keep, r_keep = c_len, r_len
    prompt = np.arange(n_prompt - p_keep, n_prompt) if trunc.mode == "keep_end" else np.arange(p_keep)
    out = PairDocuments(_cut(docs.chosen, np.concatenate([prompt, n_prompt + np.arange(c_keep)])),
                        _cut(docs.rejected, np.concatenate([prompt, n_prompt + np.arange(r_keep)])),
                        tuple(k for k, cut in (("prompt", p_keep < n_prompt),
                                               ("completion", (c_keep, r_keep) != (c_len, r_len))) if cut))
    if np.array_equal(out.chosen.ids, out.rejected.ids):
        raise RecordError(f"chosen and rejected are identical once truncated to the row (--seq-len {seq_len}, "
                          f"--max-prompt-length {trunc.max_prompt_length})")
    return out


def render_pair(renderer, chosen: Conversation, rejected: Conversation, seq_len: int,
                truncation: Truncation | None = None) -> PairDocuments:
    """Both documents of a pair, checked: the same prompt tokens and classes, different completions, and
    room for both in one row — a longer pair is an error, or with `truncation` cut to fit (truncate_pair)."""
    docs = PairDocuments(renderer(chosen), renderer(rejected))
    for key, doc in zip(("chosen", "rejected"), docs):
        if _prompt_length(doc) == len(doc.classes):
            raise RecordError(f"{key}: the completion renders no response-side token under this template")
    n_chosen, n_rejected = _prompt_length(docs.chosen), _prompt_length(docs.rejected)
    if n_chosen != n_rejected or not (np.array_equal(docs.chosen.ids[:n_chosen], docs.rejected.ids[:n_chosen]) and
                                      np.array_equal(docs.chosen.classes[:n_chosen], docs.rejected.classes[:n_chosen])):
        raise RecordError("the prompt tokenizes differently before the chosen and the rejected completion (the "
                          "template joins prompt and completion into one token): the pair would compare two prompts")
    if np.array_equal(docs.chosen.ids, docs.rejected.ids):
        raise RecordError("chosen and rejected are identical (the same tokens)")
    total = len(docs.chosen.ids) + len(docs.rejected.ids)
    if total > seq_len:
        if truncation is not None:
            return truncate_pair(docs, n_chosen, seq_len, truncation)
        raise RecordError(f"the pair is {len(docs.chosen.ids)} + {len(docs.rejected.ids)} = {total} tokens, longer "
                          f"than a row (--seq-len {seq_len}); pass --max-prompt-length N (and --truncation-mode) "
                          f"to truncate it as TRL does")
    return docs
