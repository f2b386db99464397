"""Chat templates: Conversation → token ids with one TokenClass per token (and optional data weights).

A template renders a conversation into *items*: special tokens (inserted as ids, never tokenized from text)
and text spans, each with a class and the message it belongs to. Consecutive text spans form a run that is
tokenized as one string with character offsets; every token takes the class of the characters it covers.
Whitespace is neutral (a token " Hello" covering a template space and response text is a response token);
a token whose non-whitespace characters belong to two classes raises BoundaryError: the mask would be
ambiguous. Tokens covering no character (SentencePiece's dummy prefix, leading byte-fallback bytes) take
the class of the character at their position.

Reasoning and tools. What the assistant generates carries its own class *with its markup*: the reasoning
is rendered ``<think>\n{reasoning}\n</think>\n\n`` before the answer (Qwen3's and DeepSeek-R1's convention;
every fixed template does this), all of it ``reasoning``; a tool call is rendered in the template's call
syntax, all of it ``tool_call``. What the model is given is prompt-side: tool results are ``tool`` (their
wrappers and role headers ``template``), tool schemas are ``system`` (the template's boilerplate around them
``template``). ``chatml`` renders tools as Qwen2.5/Qwen3 do (a ``# Tools`` system block, ``<tool_call>``
JSON, ``<tool_response>`` blocks in a user turn); ``llama3`` as Llama 3.1's JSON tool calling (schemas in the
system turn, one ``{"name", "parameters"}`` call per assistant turn, results in ``ipython`` turns). ``plain``,
``alpaca`` and ``tulu`` cannot express tools and refuse such records with one line; ``llama3`` refuses what
Llama 3.1 cannot express (several calls in one turn, text beside a call).

The ``plain`` boundary (the paper's rule). The paper's released code tokenizes the prompt alone, BOS
included, and weights every token after those with λr. plain renders ``BOS prompt ' ' response EOS`` as
one string; where the joining space becomes a token of its own (SentencePiece/LLaMA-2 for a response that
starts with a digit or with a byte-fallback character such as an emoji; Llama 3's BPE likewise), the
character rule would make it ``template`` (λp) while the paper gives it λr. So plain classes by the paper's
rule: a token at index ≥ len(tokenize(BOS + prompt)) is response-side (the class of the answer's first
part), one before it prompt-side — whatever characters it covers. Multi-turn plain applies the same rule at
every user → assistant boundary (tokenize everything before the joining space).
"""
from __future__ import annotations

import bisect
import json
from typing import NamedTuple

import numpy as np

from witscale.data.classes import NUM_CLASSES, TokenClass
from witscale.data.errors import BoundaryError, RecordError
from witscale.data.readers import THINK_CLOSE, THINK_OPEN, Conversation, Message, ToolCall

T, S, P, R, E = TokenClass.TEMPLATE, TokenClass.SYSTEM, TokenClass.PROMPT, TokenClass.RESPONSE, TokenClass.EOT
RS, TC, TL = TokenClass.REASONING, TokenClass.TOOL_CALL, TokenClass.TOOL

ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n")
# Qwen2.5 / Qwen3 chat templates, verbatim
CHATML_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
                     "provided with function signatures within <tools></tools> XML tags:\n<tools>")
CHATML_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                     "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                     "\"arguments\": <args-json-object>}\n</tool_call>")
# Llama 3.1's template with tools_in_user_message=false, without its date lines
LLAMA3_TOOLS_HEAD = ("Environment: ipython\n\nYou have access to the following functions. To call a function, please "
                     "respond with JSON for a function call.Respond in the format {\"name\": function name, "
                     "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n")


class Special(NamedTuple):
    name: str          # symbolic ('bos', 'eos') or the token string ('<|im_start|>')
    cls: int
    msg: int = -1      # index of the message it belongs to, -1: the whole document


class Text(NamedTuple):
    text: str
    cls: int
    msg: int = -1
    boundary: bool = False   # plain: the paper's prompt → response boundary is where this text starts


class Document(NamedTuple):
    ids: np.ndarray               # int32 [n]
    classes: np.ndarray           # uint8 [n]
    weights: np.ndarray | None    # float32 [n], only when the record carries weights


def content_class(m: Message) -> int:
    if m.role == "system":
        return S
    if m.role == "tool":
        return TL
    if m.role == "user" or m.as_prompt:
        return P
    return R


def reasoning_class(m: Message) -> int:
    return P if m.as_prompt else RS


def call_class(m: Message) -> int:
    return P if m.as_prompt else TC


def end_class(m: Message) -> int:
    """End-of-turn marker: EOT after a trained assistant turn, prompt-side (TEMPLATE) otherwise."""
    return E if m.role == "assistant" and not m.as_prompt else T


def think_items(m: Message, i: int) -> list:
    """``<think>\\n{reasoning}\\n</think>\\n\\n``, all of it the reasoning class; nothing without reasoning."""
    if m.reasoning is None:
        return []
    c = reasoning_class(m)
    return [Text(THINK_OPEN + "\n", c, i), Text(m.reasoning, c, i), Text("\n" + THINK_CLOSE + "\n\n", c, i)]


def answer_items(m: Message, i: int) -> list:
    """An assistant turn's reasoning block and its text (the text templates have no tool syntax)."""
    return think_items(m, i) + [Text(m.text, content_class(m), i)]


def chatml_call(call: ToolCall) -> str:
    return '<tool_call>\n{"name": "' + call.name + '", "arguments": ' + call.arguments_json() + "}\n</tool_call>"


def llama3_call(call: ToolCall) -> str:
    return '{"name": "' + call.name + '", "parameters": ' + call.arguments_json() + "}"


# ---------------------------------------------------------------------------------------------- templates
def render_plain(conv: Conversation) -> list:
    """The paper's: BOS prompt ' ' response EOS. Multi-turn: turns joined by '\\n', one EOS at the end;
    a system message comes first, followed by a blank line. The joining space marks the paper's boundary."""
    items: list = [Special("bos", T)]
    prev = None
    for i, m in enumerate(conv.messages):
        if m.role == "system":
            items += [Text(m.text, S, i), Text("\n\n", T, i)]
        elif m.role == "user":
            if prev == "assistant":
                items.append(Text("\n", T, i))
            items.append(Text(m.full_text(), P, i))
        else:
            items += [Text(" ", T, i, True)] + answer_items(m, i)
        prev = m.role
    items.append(Special("eos", end_class(conv.messages[-1]), len(conv.messages) - 1))
    return items


def render_alpaca(conv: Conversation) -> list:
    """Stanford Alpaca's prompt; a system message replaces the preamble; later turns repeat the
    Instruction/Response blocks; one EOS at the end."""
    msgs = conv.messages
    items: list = [Special("bos", T)]
    first_user = next(m for m in msgs if m.role == "user")
    if msgs[0].role == "system":
        items += [Text(msgs[0].text, S, 0), Text("\n\n", T, 0)]
    else:
        items.append(Text(ALPACA_PREAMBLE_INPUT if first_user.input else ALPACA_PREAMBLE, T))
    seen_turn = False
    for i, m in enumerate(msgs):
        if m.role == "user":
            if seen_turn:
                items.append(Text("\n\n", T, i))
            items += [Text("### Instruction:\n", T, i), Text(m.text, P, i)]
            if m.input:
                items += [Text("\n\n### Input:\n", T, i), Text(m.input, P, i)]
            items.append(Text("\n\n### Response:\n", T, i))
            seen_turn = True
        elif m.role == "assistant":
            items += answer_items(m, i)
    items.append(Special("eos", end_class(msgs[-1]), len(msgs) - 1))
    return items


def render_chatml(conv: Conversation) -> list:
    """Qwen's ChatML: <|im_start|>role\\n content <|im_end|>\\n. Tools as Qwen2.5/Qwen3 render them: the
    schemas (one JSON per line) in a system turn after the system prompt; an assistant turn's calls after its
    text as <tool_call>\\n{"name": …, "arguments": …}\\n</tool_call>; consecutive tool results in one user
    turn, each in <tool_response>\\n…\\n</tool_response>."""
    msgs = conv.messages
    items: list = []
    i = 0
    if conv.tools:
        owner = 0 if msgs[0].role == "system" else -1
        items += [Special("<|im_start|>", T, owner), Text("system\n", T, owner)]
        if owner == 0:
            items += [Text(msgs[0].text, S, 0), Text("\n\n", T, 0)]
            i = 1
        items.append(Text(CHATML_TOOLS_HEAD, T, owner))
        for tool in conv.tools:
            items += [Text("\n", T, owner), Text(json.dumps(tool, ensure_ascii=False), S, owner)]
        items += [Text(CHATML_TOOLS_TAIL, T, owner), Special("<|im_end|>", T, owner), Text("\n", T, owner)]
    while i < len(msgs):
        m = msgs[i]
        if m.role == "tool":
            items += [Special("<|im_start|>", T, i), Text("user", T, i)]
            while i < len(msgs) and msgs[i].role == "tool":
                items += [Text("\n<tool_response>\n", T, i), Text(msgs[i].text, TL, i),
                          Text("\n</tool_response>", T, i)]
                i += 1
            items += [Special("<|im_end|>", T, i - 1), Text("\n", T, i - 1)]
            continue
        items += [Special("<|im_start|>", T, i), Text(m.role + "\n", T, i)]
        if m.role == "assistant":
            items += answer_items(m, i)
            for j, call in enumerate(m.tool_calls):
                sep = "\n" if (j or m.text) else ""
                items.append(Text(sep + chatml_call(call), call_class(m), i))
        else:
            items.append(Text(m.full_text(), content_class(m), i))
        items += [Special("<|im_end|>", end_class(m), i), Text("\n", T, i)]
        i += 1
    return items


def render_llama3(conv: Conversation) -> list:
    """Llama 3: <|begin_of_text|> then <|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>.
    Tools as Llama 3.1's JSON tool calling: the schemas (JSON, indent 4) in the system turn before the
    system prompt; a call is the whole assistant turn, {"name": …, "parameters": …}; results in ipython turns."""
    msgs = conv.messages
    items: list = [Special("<|begin_of_text|>", T)]

    def header(role: str, i: int) -> list:
        return [Special("<|start_header_id|>", T, i), Text(role, T, i), Special("<|end_header_id|>", T, i),
                Text("\n\n", T, i)]

    start = 0
    if conv.tools:
        owner = 0 if msgs[0].role == "system" else -1
        items += header("system", owner) + [Text(LLAMA3_TOOLS_HEAD, T, owner)]
        for tool in conv.tools:
            items += [Text(json.dumps(tool, ensure_ascii=False, indent=4), S, owner), Text("\n\n", T, owner)]
        if owner == 0:
            items.append(Text(msgs[0].text, S, 0))
            start = 1
        items.append(Special("<|eot_id|>", T, owner))
    for i in range(start, len(msgs)):
        m = msgs[i]
        items += header("ipython" if m.role == "tool" else m.role, i)
        if m.role == "assistant" and m.tool_calls:
            if len(m.tool_calls) > 1:
                raise RecordError(f"message {i + 1}: template 'llama3' expresses one tool call per assistant "
                                  f"message (Llama 3.1's JSON format); this one has {len(m.tool_calls)}")
            if m.text.strip():
                raise RecordError(f"message {i + 1}: template 'llama3' cannot express text and a tool call in one "
                                  f"assistant message (Llama 3.1's JSON format)")
            items += think_items(m, i) + [Text(llama3_call(m.tool_calls[0]), call_class(m), i)]
        elif m.role == "assistant":
            items += answer_items(m, i)
        else:
            items.append(Text(m.full_text(), content_class(m), i))
        items.append(Special("<|eot_id|>", end_class(m), i))
    return items


def render_tulu(conv: Conversation) -> list:
    """Tülu: <|user|>\\n content \\n<|assistant|>\\n content EOS (\\n between turns). The role markers are
    special tokens when the tokenizer has them, plain text otherwise (as in Tülu 2's LLaMA tokenizer)."""
    items: list = [Special("bos", T)]
    last = len(conv.messages) - 1
    for i, m in enumerate(conv.messages):
        items += [Special(f"<|{m.role}|>", T, i), Text("\n", T, i)]
        if m.role == "assistant":
            items += answer_items(m, i)
            items.append(Special("eos", end_class(m), i))
            if i != last:
                items.append(Text("\n", T, i))
        else:
            items += [Text(m.full_text(), content_class(m), i), Text("\n", T, i)]
    return items


class TemplateSpec(NamedTuple):
    render: object
    required: tuple       # specials the tokenizer must have
    optional_bos: bool    # BOS is dropped when the tokenizer has none
    text_fallback: tuple  # specials rendered as plain text when the tokenizer lacks them
    tools: bool = False   # can express tool schemas, calls and results


TEMPLATES = {
    "plain": TemplateSpec(render_plain, ("eos",), True, ()),
    "alpaca": TemplateSpec(render_alpaca, ("eos",), True, ()),
    "chatml": TemplateSpec(render_chatml, ("<|im_start|>", "<|im_end|>"), False, (), tools=True),
    "llama3": TemplateSpec(render_llama3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                           "<|eot_id|>"), False, (), tools=True),
    "tulu": TemplateSpec(render_tulu, ("eos",), True, ("<|system|>", "<|user|>", "<|assistant|>")),
}
TEMPLATE_NAMES = tuple(TEMPLATES) + ("hf",)
TOOL_TEMPLATES = tuple(n for n, spec in TEMPLATES.items() if spec.tools) + ("hf",)


# ---------------------------------------------------------------------------------------------- tokenizing
# is_space[c] = chr(c).isspace() for every code point up to U+3001 (none above U+3000 is whitespace): the
# whitespace of a whole text in one vectorized lookup
_IS_SPACE = np.array([chr(c).isspace() for c in range(0x3002)], dtype=bool)


def classify_tokens(text: str, char_cls: np.ndarray, char_msg: np.ndarray, begin: np.ndarray, end: np.ndarray,
                    num_classes: int = NUM_CLASSES):
    """Per token: (class, message index) from the characters it covers. Raises BoundaryError on a token whose
    non-whitespace characters have two classes. (``num_classes``: the classes' range, values ≥ NUM_CLASSES
    named "end-of-turn" in the error; the check itself needs no per-class table.)"""
    n = len(text)
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    nonws = np.nonzero(~_IS_SPACE[np.minimum(code_points, len(_IS_SPACE) - 1)])[0]   # positions, ascending
    # each token's non-whitespace characters are nonws[lo:hi]; they have two classes iff the class changes
    # between two consecutive ones inside that range (prefix counts of the changes: O(1) per token)
    lo = np.searchsorted(nonws, np.minimum(begin, n), side="left")
    hi = np.searchsorted(nonws, end, side="left")
    nw_cls = char_cls[nonws]
    changes = np.concatenate([[0], np.cumsum(nw_cls[1:] != nw_cls[:-1])])       # changes[j]: among nonws[:j+1]
    last = max(len(nonws) - 1, 0)
    spans = (hi - lo > 1) & (changes[np.clip(hi - 1, 0, last)] > changes[np.minimum(lo, last)]) if len(nonws) \
        else np.zeros(len(begin), dtype=bool)
    bad = np.nonzero(spans)[0]
    if len(bad):
        k = int(bad[0])
        names = [TokenClass(c).name.lower() if c < NUM_CLASSES else "end-of-turn"
                 for c in np.unique(nw_cls[lo[k]:hi[k]])]
        raise BoundaryError(f"token {k} covers {text[begin[k]:end[k]]!r}, which spans classes "
                            f"{' and '.join(names)}: the class boundary falls inside a token")
    # the first non-whitespace character of each token, or its first position when it has none
    first = np.where(lo < len(nonws), nonws[np.minimum(lo, last)], n) if len(nonws) \
        else np.full(len(begin), n, dtype=np.int64)
    at = np.where(first < end, first, np.minimum(begin, max(n - 1, 0)))
    return char_cls[at], char_msg[at]


def classify_segments(text: str, starts: list, seg_cls: np.ndarray, seg_msg: np.ndarray, spans):
    """:func:`classify_tokens` where the characters' class and message are constant over segments — segment j
    holds characters ``starts[j]`` up to the next start (``starts[0] == 0``) — from the token spans near the
    segment boundaries only (``spans``: a tokenizer.Spans). The same classes, messages and BoundaryError:

    * a token whose characters lie in one segment takes that segment's class and message — the one of
      character ``min(begin, n - 1)`` (classify_tokens' ``at`` is a character of the token, or that one);
      since begins never decrease, those tokens are cut into the segments at ``first_from(start)``;
    * a token that covers a segment start p (begin < p < end) — since ends never decrease, the tokens just
      before ``first_from(p)`` whose end is past p — goes through classify_tokens' rule one token at a time.

    Spans that are not monotone fall back to classify_tokens on their arrays."""
    n = len(text)
    if not spans.monotone:
        begin, end = spans.arrays()
        lens = np.diff(np.append(starts, n))
        return classify_tokens(text, np.repeat(seg_cls, lens), np.repeat(seg_msg, lens), begin, end)
    if len(starts) == 1:
        return np.full(len(spans), seg_cls[0], np.uint8), np.full(len(spans), seg_msg[0], np.int64)
    cuts = spans.firsts_from(starts[1:])
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, len(spans)])]
    cls, msg = seg_cls.repeat(counts), seg_msg.repeat(counts)       # (methods: no numpy dispatch wrapper)
    across = set()                           # tokens that cover a segment start
    for p, k in zip(starts[1:], cuts):
        i = k - 1
        while i >= 0 and spans.span(i)[1] > p:
            across.add(i)
            i -= 1
    for i in sorted(across):                 # ascending: the first token that spans two classes is the one named
        begin, end = spans.span(i)
        j = _segment_token_at(text, begin, end, i, starts, seg_cls)
        cls[i], msg[i] = seg_cls[j], seg_msg[j]
    return cls, msg


def _segment_token_at(text: str, begin: int, end: int, k: int, starts: list, seg_cls) -> int:
    """classify_tokens' rule for one token k: the segment of its first non-whitespace character (of character
    ``min(begin, n - 1)`` when it has none); BoundaryError when its non-whitespace characters have two classes."""
    n = len(text)
    top = len(_IS_SPACE) - 1
    at, classes = None, set()
    for q in range(min(begin, n), end):
        if not _IS_SPACE[min(ord(text[q]), top)]:
            if at is None:
                at = q
            classes.add(int(seg_cls[bisect.bisect_right(starts, q) - 1]))
    if len(classes) > 1:
        names = [TokenClass(c).name.lower() if c < NUM_CLASSES else "end-of-turn" for c in sorted(classes)]
        raise BoundaryError(f"token {k} covers {text[begin:end]!r}, which spans classes "
                            f"{' and '.join(names)}: the class boundary falls inside a token")
    if at is None:
        at = min(begin, max(n - 1, 0))
    return bisect.bisect_right(starts, at) - 1
