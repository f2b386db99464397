"""Chat templates: Conversation → token ids with one TokenClass per token (and optional data weights).

A template renders a conversation into *items*: special tokens (inserted as ids, never tokenized from text)
and text spans, each with a class and the message it belongs to. Consecutive text spans form a run that is
tokenized as one string with character offsets; every token takes the class of the characters it covers.
Whitespace is neutral (a token " Hello" covering a template space and response text is a response token);
a token whose non-whitespace characters belong to two classes raises BoundaryError: the mask would be
ambiguous. Tokens covering no character (SentencePiece's dummy prefix, leading byte-fallback bytes) take
the class of the character at their position.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from witscale.data.classes import NUM_CLASSES, TokenClass
from witscale.data.errors import BoundaryError
from witscale.data.readers import Conversation, Message

T, S, P, R, E = TokenClass.TEMPLATE, TokenClass.SYSTEM, TokenClass.PROMPT, TokenClass.RESPONSE, TokenClass.EOT

ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n")


class Special(NamedTuple):
    name: str          # symbolic ('bos', 'eos') or the token string ('<|im_start|>')
    cls: int
    msg: int = -1      # index of the message it belongs to, -1: the whole document


class Text(NamedTuple):
    text: str
    cls: int
    msg: int = -1


class Document(NamedTuple):
    ids: np.ndarray               # int32 [n]
    classes: np.ndarray           # uint8 [n]
    weights: np.ndarray | None    # float32 [n], only when the record carries weights


def content_class(m: Message) -> int:
    if m.role == "system":
        return S
    if m.role == "user" or m.as_prompt:
        return P
    return R


def end_class(m: Message) -> int:
    """End-of-turn marker: EOT after a trained assistant turn, prompt-side (TEMPLATE) otherwise."""
    return E if m.role == "assistant" and not m.as_prompt else T


# ---------------------------------------------------------------------------------------------- templates
def render_plain(conv: Conversation) -> list:
    """The paper's: BOS prompt ' ' response EOS. Multi-turn: turns joined by '\\n', one EOS at the end;
    a system message comes first, followed by a blank line."""
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
            items += [Text(" ", T, i), Text(m.text, content_class(m), i)]
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
            items.append(Text(m.text, content_class(m), i))
    items.append(Special("eos", end_class(msgs[-1]), len(msgs) - 1))
    return items


def render_chatml(conv: Conversation) -> list:
    """Qwen's ChatML: <|im_start|>role\\n content <|im_end|>\\n"""
    items: list = []
    for i, m in enumerate(conv.messages):
        items += [Special("<|im_start|>", T, i), Text(m.role + "\n", T, i), Text(m.full_text(), content_class(m), i),
                  Special("<|im_end|>", end_class(m), i), Text("\n", T, i)]
    return items


def render_llama3(conv: Conversation) -> list:
    """Llama 3: <|begin_of_text|> then <|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>"""
    items: list = [Special("<|begin_of_text|>", T)]
    for i, m in enumerate(conv.messages):
        items += [Special("<|start_header_id|>", T, i), Text(m.role, T, i), Special("<|end_header_id|>", T, i),
                  Text("\n\n", T, i), Text(m.full_text(), content_class(m), i), Special("<|eot_id|>", end_class(m), i)]
    return items


def render_tulu(conv: Conversation) -> list:
    """Tülu: <|user|>\\n content \\n<|assistant|>\\n content EOS (\\n between turns). The role markers are
    special tokens when the tokenizer has them, plain text otherwise (as in Tülu 2's LLaMA tokenizer)."""
    items: list = [Special("bos", T)]
    last = len(conv.messages) - 1
    for i, m in enumerate(conv.messages):
        items += [Special(f"<|{m.role}|>", T, i), Text("\n", T, i), Text(m.full_text(), content_class(m), i)]
        if m.role == "assistant":
            items.append(Special("eos", end_class(m), i))
            if i != last:
                items.append(Text("\n", T, i))
        else:
            items.append(Text("\n", T, i))
    return items


class TemplateSpec(NamedTuple):
    render: object
    required: tuple       # specials the tokenizer must have
    optional_bos: bool    # BOS is dropped when the tokenizer has none
    text_fallback: tuple  # specials rendered as plain text when the tokenizer lacks them


TEMPLATES = {
    "plain": TemplateSpec(render_plain, ("eos",), True, ()),
    "alpaca": TemplateSpec(render_alpaca, ("eos",), True, ()),
    "chatml": TemplateSpec(render_chatml, ("<|im_start|>", "<|im_end|>"), False, ()),
    "llama3": TemplateSpec(render_llama3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                           "<|eot_id|>"), False, ()),
    "tulu": TemplateSpec(render_tulu, ("eos",), True, ("<|system|>", "<|user|>", "<|assistant|>")),
}
TEMPLATE_NAMES = tuple(TEMPLATES) + ("hf",)


# ---------------------------------------------------------------------------------------------- tokenizing
def classify_tokens(text: str, char_cls: np.ndarray, char_msg: np.ndarray, begin: np.ndarray, end: np.ndarray,
                    num_classes: int = NUM_CLASSES):
    """Per token: (class, message index) from the characters it covers. Raises BoundaryError on a token whose
    non-whitespace characters have two classes."""
    n = len(text)
    nonws = np.fromiter((not c.isspace() for c in text), dtype=bool, count=n)
    # prefix counts of non-whitespace characters per class: counts over [b, e) in O(1) per token
    onehot = np.zeros((num_classes, n + 1), dtype=np.int32)
    onehot[char_cls[nonws], np.nonzero(nonws)[0] + 1] = 1
    cum = np.cumsum(onehot, axis=1)
    present = (cum[:, end] - cum[:, begin]) > 0                   # [classes, tokens]
    npresent = present.sum(axis=0)
    bad = np.nonzero(npresent > 1)[0]
    if len(bad):
        k = int(bad[0])
        names = [TokenClass(c).name.lower() if c < NUM_CLASSES else "end-of-turn"
                 for c in np.nonzero(present[:, k])[0]]
        raise BoundaryError(f"token {k} covers {text[begin[k]:end[k]]!r}, which spans classes "
                            f"{' and '.join(names)}: the class boundary falls inside a token")
    # the first non-whitespace character of each token, or its first position when it has none
    next_nonws = np.full(n + 1, n, dtype=np.int64)
    idx = np.nonzero(nonws)[0]
    if len(idx):
        pos = np.searchsorted(idx, np.arange(n + 1), side="left")
        ok = pos < len(idx)
        next_nonws[ok] = idx[pos[ok]]
    first = next_nonws[np.minimum(begin, n)]
    at = np.where(first < end, first, np.minimum(begin, max(n - 1, 0)))
    return char_cls[at], char_msg[at]
