"""The ``hf`` template: the tokenizer's own chat_template (Jinja, rendered locally by transformers; no remote
code), called with the record's ``tools=`` and OpenAI-style messages (``tool_calls`` with ``arguments`` as an
object, ``tool`` messages with ``name``/``tool_call_id``, the reasoning as ``reasoning_content``).

Classes come from rendering message by message: each longer prefix of the conversation must extend the
previous rendering (prefix stability), and each message's parts must appear in what its turn added:
  * text (system, user, tool result, assistant answer) verbatim, in order; what surrounds it is template;
  * the assistant's reasoning verbatim; from the end of the generation prompt to the answer (or the first
    call) it is all reasoning (the template's ``<think>`` markup included);
  * the assistant's tool calls: the span that rendering the same message *without* its calls removes
    (compared from both ends), which must name every call;
  * tool schemas: each schema's JSON, as the template prints it (compact, indent 2 or 4; the schema or its
    ``function``), inside template text → system.
A non-assistant message whose prefix the template cannot render on its own (Llama 3.1 puts the tools into the
first user message and raises on a system message alone), or whose rendering the next message changes (Qwen
closes a run of tool results only after the last one), is located within the next turn instead.
Anything else fails with the record named, rather than guessing a mask.
"""
from __future__ import annotations

import json

import numpy as np

from witscale.data.classes import TokenClass
from witscale.data.errors import RecordError, TokenizerError
from witscale.data.readers import Conversation, Message
from witscale.data.templates import call_class, classify_tokens, content_class, end_class, reasoning_class
from witscale.data.tokenizer import HFTokenizer

_END = len(TokenClass)   # provisional class: template text after an assistant turn (EOT if special, else TEMPLATE)
T = TokenClass.TEMPLATE


def hf_message(m: Message) -> dict:
    """A Message as chat templates expect it (OpenAI style)."""
    d = {"role": m.role, "content": m.full_text()}
    if m.role == "assistant":
        if m.reasoning is not None:
            d["reasoning_content"] = m.reasoning
        if m.tool_calls:
            d["tool_calls"] = [dict({"type": "function", "function": {"name": c.name, "arguments": c.arguments}},
                                    **({"id": c.id} if c.id else {})) for c in m.tool_calls]
    elif m.role == "tool":
        if m.name:
            d["name"] = m.name
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
    return d


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a: str, b: str, limit: int) -> int:
    i = 0
    while i < limit and a[len(a) - 1 - i] == b[len(b) - 1 - i]:
        i += 1
    return i


def _tool_serializations(tool: dict) -> list[str]:
    out = []
    for obj in (tool, tool.get("function")):
        if not isinstance(obj, dict):
            continue
        for ascii_ in (False, True):
            for kw in ({}, {"indent": 4}, {"indent": 2}, {"separators": (",", ":")}):
                s = json.dumps(obj, ensure_ascii=ascii_, **kw)
                if s not in out:
                    out.append(s)
    return out


class HFChatRenderer:
    def __init__(self, tokenizer):
        if not isinstance(tokenizer, HFTokenizer) or not getattr(tokenizer.hf, "chat_template", None):
            raise TokenizerError("template 'hf' needs a Hugging Face tokenizer directory with a chat_template",
                                 tokenizer.path)
        self.tok = tokenizer
        self._special_ids = np.array(sorted(set(tokenizer.hf.all_special_ids) |
                                            set(tokenizer.hf.added_tokens_decoder)), dtype=np.int64)

    def _apply(self, msgs, generation_prompt: bool, tools) -> str:
        try:
            return self.tok.hf.apply_chat_template(msgs, tools=tools, tokenize=False,
                                                   add_generation_prompt=generation_prompt)
        except Exception as e:  # the template's own raise_exception, or a Jinja error
            raise RecordError(f"chat_template failed: {type(e).__name__}: {e}") from None

    def _try(self, msgs, generation_prompt: bool, tools) -> str | None:
        try:
            return self._apply(msgs, generation_prompt, tools)
        except RecordError:
            return None

    def __call__(self, conv: Conversation):
        requests, _, finish = self.plan(conv)
        return finish([self.tok.encode_with_offsets(t, c) for t, c in requests])

    def plan(self, conv: Conversation):
        """([(the rendered text, continuation=False)], [], its encoding → (ids, classes, message per token)): the
        Jinja rendering and the character classes here; the one encoding can be batched across records
        (Renderer.render_many)."""
        hmsgs = [hf_message(m) for m in conv.messages]
        tools = [dict(t) for t in conv.tools] if conv.tools else None
        text, cls_parts, msg_parts = "", [], []
        last = len(conv.messages) - 1

        def emit(piece: str, c: int, k: int):
            cls_parts.append(np.full(len(piece), c, dtype=np.uint8))
            msg_parts.append(np.full(len(piece), k, dtype=np.int64))

        def stable(new: str, k: int, step: str):
            if not new.startswith(text):
                raise RecordError(f"chat_template is not prefix-stable at message {k + 1} ({step}): rendering "
                                  f"more messages changed earlier text (e.g. a template that drops earlier turns' "
                                  f"reasoning), so the class boundaries are unknown")

        cache: dict = {}

        def render(n: int, generation_prompt: bool) -> str | None:      # msgs[:n], None if the template raises
            if (n, generation_prompt) not in cache:
                cache[n, generation_prompt] = self._try(hmsgs[:n], generation_prompt, tools)
            return cache[n, generation_prompt]

        # messages whose prefix did not render alone, or whose rendering the next message changes (Qwen closes a
        # run of tool results only after the last one): located, in order, in the next turn's text
        pending: list[int] = []
        for k, m in enumerate(conv.messages):
            after_gen = False
            if m.role == "assistant" and not pending:
                gen = render(k, True)
                if gen is not None:
                    stable(gen, k, "generation prompt")
                    emit(gen[len(text):], T, k)
                    text, after_gen = gen, True
            full = render(k + 1, False)
            if full is None:
                if m.role == "assistant" or k == last:
                    self._apply(hmsgs[:k + 1], False, tools)      # raises the template's own error
                pending.append(k)
                continue
            if m.role != "assistant" and k < last:
                nxt = render(k + 1, True) if conv.messages[k + 1].role == "assistant" else render(k + 2, False)
                if nxt is not None and not nxt.startswith(full):
                    pending.append(k)
                    continue
            stable(full, k, "turn")
            delta = full[len(text):]
            if m.role == "assistant":
                pos = self._locate_texts(delta, pending, conv, emit)
                self._assistant(delta, pos, k, m, hmsgs, tools, text, after_gen, emit)
            else:
                pos = self._locate_texts(delta, pending + [k], conv, emit)
                emit(delta[pos:], T, k)
            pending = []
            text = full
        char_cls = np.concatenate(cls_parts) if cls_parts else np.zeros(0, np.uint8)
        char_msg = np.concatenate(msg_parts) if msg_parts else np.zeros(0, np.int64)
        if conv.tools:
            self._mark_tools(text, char_cls, conv.tools)

        def finish(encodings: list):
            ids, begin, end = encodings[0]
            cls, msg = classify_tokens(text, char_cls, char_msg, begin, end, num_classes=_END + 1)
            is_special = np.isin(ids, self._special_ids)
            cls = np.where(cls == _END, np.where(is_special, TokenClass.EOT, TokenClass.TEMPLATE), cls)
            return ids.astype(np.int32), cls.astype(np.uint8), msg
        return [(text, False)], [], finish

    @staticmethod
    def _find(delta: str, content: str, pos: int) -> tuple[int, str]:
        """Where `content` is rendered: verbatim, trimmed (Llama 3 trims messages) or as a JSON string (Llama
        3.1 prints a tool result with tojson); (-1, content) if nowhere."""
        for form in (content, content.strip(), json.dumps(content, ensure_ascii=False)):
            at = delta.find(form, pos) if form or not content else -1
            if at >= 0:
                return at, form
        return -1, content

    def _locate_texts(self, delta: str, ks: list[int], conv: Conversation, emit) -> int:
        """Each (non-assistant) message's text in order within `delta`; the text between is template."""
        pos = 0
        for k in ks:
            m = conv.messages[k]
            at, content = self._find(delta, m.full_text(), pos)
            if at < 0:
                raise RecordError(f"chat_template does not render the text of message {k + 1} verbatim; cannot "
                                  f"locate it")
            emit(delta[pos:at], T, k)
            emit(content, content_class(m), k)
            pos = at + len(content)
        return pos

    def _assistant(self, delta: str, pos: int, k: int, m: Message, hmsgs, tools, text: str, after_gen: bool, emit):
        """Classes of an assistant turn's delta from `pos`: [reasoning] [answer] [calls] end."""
        d = delta
        after = _END if end_class(m) == TokenClass.EOT else T
        # reasoning: from the end of the generation prompt (or where its text starts) to the answer
        r_start, r_end = None, pos
        if m.reasoning is not None:
            if m.reasoning:
                at = d.find(m.reasoning, pos)
                if at < 0:
                    raise RecordError(f"chat_template does not render the reasoning of message {k + 1} (it takes "
                                      f"'reasoning_content'?); cannot locate it")
                r_start, r_end = (pos if after_gen else at), at + len(m.reasoning)
            elif after_gen:
                r_start = pos
        # the answer
        c_start = c_end = None
        if m.text:
            c_start, content = self._find(d, m.text, r_end)
            if c_start < 0:
                raise RecordError(f"chat_template does not render the text of message {k + 1} verbatim; cannot "
                                  f"locate it")
            c_end = c_start + len(content)
        # the calls: what rendering the message without them removes
        x0 = x1 = None
        if m.tool_calls:
            bare = dict(hmsgs[k])
            bare.pop("tool_calls")
            nocalls = self._try(hmsgs[:k] + [bare], False, tools)
            if nocalls is None or not nocalls.startswith(text):
                raise RecordError(f"chat_template renders the tool calls of message {k + 1} in a way witscale cannot "
                                  f"delimit (rendering the message without them fails or changes earlier text)")
            dn = nocalls[len(text):]
            lower = c_end if c_end is not None else r_end
            s = _common_suffix(d, dn, max(0, min(len(d), len(dn)) - lower))
            x1 = len(d) - s
            if c_end is not None:
                x0 = c_end
            else:
                p = max(min(_common_prefix(d, dn), x1), lower)
                # a shared first character ('<' of '<tool_call>' and of '<|im_end|>') is not part of both:
                # start the calls at a token boundary
                _, begins, _ = self.tok.encode_with_offsets(d[lower:x1], continuation=True)
                starts = [lower + int(b) for b in begins if lower + int(b) <= p]
                x0 = max(starts) if starts else p
            leftover = dn[x0:len(dn) - s] if len(dn) - s >= x0 else ""
            missing = [c.name for c in m.tool_calls if c.name not in d[x0:x1]]
            if leftover.strip() or x1 <= x0 or missing:
                raise RecordError(f"chat_template renders the tool calls of message {k + 1} in a way witscale cannot "
                                  f"delimit" + (f" (no {missing[0]!r} where the calls should be)" if missing else ""))
        # emit in order
        first_after_reasoning = c_start if c_start is not None else (x0 if x0 is not None else r_end)
        if r_start is not None:
            emit(d[pos:r_start], T, k)
            emit(d[r_start:first_after_reasoning], reasoning_class(m), k)
        else:
            emit(d[pos:first_after_reasoning], T, k)
        tail = first_after_reasoning
        if c_start is not None:
            emit(d[c_start:c_end], content_class(m), k)
            tail = c_end
        if x0 is not None:
            emit(d[tail:x0], T, k)
            emit(d[x0:x1], call_class(m), k)
            tail = x1
        emit(d[tail:], after, k)

    @staticmethod
    def _mark_tools(text: str, char_cls: np.ndarray, tools) -> None:
        """Each tool schema's JSON, where the template printed it among template text → system."""
        for tool in tools:
            name = (tool.get("function") or {}).get("name") or tool.get("name")
            for s in _tool_serializations(tool):
                at = text.find(s)
                while at >= 0 and not (char_cls[at:at + len(s)] == T).all():
                    at = text.find(s, at + 1)
                if at >= 0:
                    char_cls[at:at + len(s)] = TokenClass.SYSTEM
                    break
            else:
                raise RecordError(f"chat_template does not render tool {name!r} as JSON witscale can locate (tool "
                                  f"schemas are system-class)")
