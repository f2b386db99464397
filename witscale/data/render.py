"""A template bound to a tokenizer: records (``Conversation``) → token ids + a class per token (``Document``).

``Renderer(template, tokenizer)`` renders with one of the fixed templates of witscale/data/templates.py, or,
for ``hf``, with the tokenizer's own chat template (witscale/data/chat_template.py); both share the token
classification of templates.py, and neither imports this module (no import cycle).

A record with tools (schemas, calls or results) under a template that cannot express them is refused with a
RecordError naming what it has; ``plain``'s prompt → response boundary follows the paper's rule (see
templates.py).
"""
from __future__ import annotations

import itertools

import numpy as np

from witscale.data.chat_template import HFChatRenderer
from witscale.data.classes import RESPONSE_SIDE, TokenClass
from witscale.data.errors import DataError, RecordError, TokenizerError
from witscale.data.readers import Conversation
from witscale.data.templates import (TEMPLATE_NAMES, TEMPLATES, TOOL_TEMPLATES, Document, Special, TemplateSpec,
                                     Text, classify_segments)
from witscale.data.tokenizer import ArraySpans, Spans, Tokenizer

_IS_RESPONSE_SIDE = np.zeros(256, dtype=bool)        # by class id (uint8): a lookup, not np.isin's sort
_IS_RESPONSE_SIDE[[int(c) for c in RESPONSE_SIDE]] = True


def _resolve(spec: TemplateSpec, name: str, tokenizer: Tokenizer) -> int | None:
    if name == "bos":
        return tokenizer.bos_id
    if name == "eos":
        return tokenizer.eos_id
    return tokenizer.token_id(name)


class Renderer:
    """A template bound to a tokenizer: checks up front that every special token it needs exists."""

    def __init__(self, template: str, tokenizer: Tokenizer):
        if template == "hf":
            self._hf = HFChatRenderer(tokenizer)
        elif template not in TEMPLATES:
            raise DataError(f"unknown template {template!r}; known templates: {', '.join(TEMPLATE_NAMES)}")
        else:
            self._hf = None
            self.spec = TEMPLATES[template]
            for name in self.spec.required:
                if _resolve(self.spec, name, tokenizer) is None:
                    what = {"eos": "an EOS token", "bos": "a BOS token"}.get(name, f"the special token {name!r}")
                    add = "" if name in ("bos", "eos") else ", or pass --add-special-tokens to add it"
                    raise TokenizerError(f"template {template!r} needs {what}, which this tokenizer lacks; pick "
                                         f"another --template or a tokenizer that defines it{add}", tokenizer.path)
        self.template = template
        self.tokenizer = tokenizer

    def items(self, conv: Conversation) -> list:
        return self.spec.render(conv)

    def render_text(self, conv: Conversation) -> str:
        """The rendered document as one string (specials spelled out), for inspection and tests."""
        out = []
        for it in self.items(conv):
            if isinstance(it, Special):
                tid = _resolve(self.spec, it.name, self.tokenizer)
                if tid is None:
                    out.append(it.name if it.name not in ("bos", "eos") else "")
                else:
                    out.append(self.tokenizer.vocabulary()[tid] if it.name in ("bos", "eos") else it.name)
            else:
                out.append(it.text)
        return "".join(out)

    def check(self, conv: Conversation) -> None:
        """Refuse (RecordError) a record this template cannot express."""
        if self._hf is None and not self.spec.tools and conv.uses_tools:
            what = ", ".join(f for f in conv.features() if f != "reasoning")
            raise RecordError(f"template {self.template!r} cannot express tools (the record has {what}); use "
                              f"--template {', '.join(TOOL_TEMPLATES[:-1])} or {TOOL_TEMPLATES[-1]}")

    def __call__(self, conv: Conversation) -> Document:
        """One record, its strings encoded one call each (the reference the batched path must equal)."""
        self.check(conv)
        requests, lengths_only, finish, _ = self._plan(conv)
        encodings = [self.tokenizer.encode_with_offsets(t, c) for t, c in requests]
        return self._document(conv, finish([len(e[0]) if i in lengths_only else e for i, e in enumerate(encodings)]))

    def render_many(self, convs: list) -> list:
        """Documents of many records — the same as ``[self(c) for c in convs]`` — with every string they need
        encoded in one ``Tokenizer.encode_spans`` call (``encode_many`` for ``hf``; a fast tokenizer's batch API:
        one call per record through transformers' Python wrapper cost more than the tokenizing; a second for
        ``plain``'s prompts whose count is not read off their run: ``_encode``). A record this
        template cannot express gives its RecordError in its place (not located: the caller knows where the
        record came from)."""
        plans = []
        for conv in convs:
            try:
                self.check(conv)
                plans.append(self._plan(conv))
            except RecordError as e:
                plans.append(e)
        requests, lengths_only, prefixes = [], set(), {}
        for p in plans:
            if not isinstance(p, RecordError):
                base = len(requests)
                lengths_only.update(base + i for i in p[1])
                prefixes.update((base + j, (base + at, c)) for j, (at, c) in p[3].items())
                requests.extend(p[0])
        encodings = iter(self._encode(requests, lengths_only, prefixes))
        out = []
        for conv, p in zip(convs, plans):
            if isinstance(p, RecordError):
                out.append(p)
                continue
            mine = [next(encodings) for _ in p[0]]
            try:
                out.append(self._document(conv, p[2](mine)))
            except RecordError as e:
                out.append(e)
        return out

    def _encode(self, requests: list, lengths_only: set, prefixes: dict) -> list:
        """The encodings of ``requests`` (token counts for ``lengths_only``). ``prefixes``: of those counted, the
        ones that are a run's text up to character c — request j → (the run's request, c). Where the tokenizer
        is prefix-stable (Tokenizer.prefix_count) and the run's tokens break at c, the count is read off the
        run's encoding; the others are encoded in a second call."""
        # the fixed templates' runs need only the tokens near their class changes (Spans); the hf template
        # classes every token from its characters' arrays
        encode = self.tokenizer.encode_many if self._hf is not None else self.tokenizer.encode_spans
        if not prefixes or not self.tokenizer.prefix_stable:
            return encode(requests, lengths_only)
        first = [i for i in range(len(requests)) if i not in prefixes]
        encodings: list = [None] * len(requests)
        sub = {i: k for k, i in enumerate(first)}
        for i, e in zip(first, encode([requests[i] for i in first], {sub[i] for i in lengths_only if i in sub})):
            encodings[i] = e
        missing = []
        for j, (at, c) in prefixes.items():
            encodings[j] = self.tokenizer.prefix_count(encodings[at], c)
            if encodings[j] is None:
                missing.append(j)
        if missing:
            for j, n in zip(missing, encode([requests[j] for j in missing], set(range(len(missing))))):
                encodings[j] = n
        return encodings

    def _plan(self, conv: Conversation):
        """(the strings to encode — (text, continuation) pairs —, the indices of those of which only the number
        of tokens is needed, a function of their encodings in that order (those: an int) → (ids, classes,
        message index per token), and of the counted ones those that are a prefix of another request's text:
        {index: (that request's index, the prefix's length in characters)}). Everything but the encoding:
        rendering is per record, encoding can be batched across records."""
        if self._hf is not None:
            return (*self._hf.plan(conv), {})
        return self._plan_items(self.items(conv))

    @staticmethod
    def _document(conv: Conversation, tokenized) -> Document:
        ids, classes, msgs = tokenized
        weights = None
        if conv.has_weights:
            mw = np.array([m.weight if m.weight is not None else 1.0 for m in conv.messages] + [1.0], dtype=np.float32)
            weights = mw[msgs] * np.float32(conv.weight if conv.weight is not None else 1.0)
        return Document(ids, classes, weights)

    def _plan_items(self, items: list):
        # pieces in document order: a special token (its id, class, message) or a run of consecutive texts
        # encoded as one string, with the index of its encoding and of each boundary prefix's (plain)
        pieces: list = []
        requests: list[tuple[str, bool]] = []
        lengths_only: list[int] = []
        prefix_of: dict[int, tuple[int, int]] = {}
        run: list[Text] = []
        started = False          # has a token other than a leading BOS been emitted?

        def flush():
            nonlocal started
            if not run:
                return
            text = "".join(t.text for t in run)
            requests.append((text, started))
            at = len(requests) - 1
            bounds = _boundaries(run)
            requests.extend((text[:c], started) for _, _, c, _ in bounds)
            prefixes = list(range(at + 1, len(requests)))        # plain's boundary: only their token counts
            lengths_only.extend(prefixes)
            prefix_of.update((j, (at, c)) for j, (_, _, c, _) in zip(prefixes, bounds))
            pieces.append((text, at, prefixes, bounds, *_segments(run)))
            started = True
            run.clear()

        for k, it in enumerate(items):
            if isinstance(it, Text):
                if it.text:
                    run.append(it)
                continue
            flush()
            tid = _resolve(self.spec, it.name, self.tokenizer)
            if tid is None:
                if it.name == "bos" and self.spec.optional_bos:
                    continue
                if it.name in self.spec.text_fallback:
                    run.append(Text(it.name, it.cls, it.msg))
                    continue
                raise TokenizerError(f"template {self.template!r} needs {it.name!r}, which the tokenizer lacks",
                                     self.tokenizer.path)
            pieces.append((tid, it.cls, it.msg))
            if not (k == 0 and it.name == "bos"):
                started = True
        flush()

        def finish(encodings: list):
            ids, classes, msgs = [], [], []
            for piece in pieces:
                if len(piece) == 3:
                    tid, c, m = piece
                    ids.append(_one(tid, np.int32))
                    classes.append(_one(c, np.uint8))
                    msgs.append(_one(m, np.int64))
                    continue
                text, at, prefixes, bounds, starts, seg_cls, seg_msg = piece
                spans = encodings[at]
                if not isinstance(spans, Spans):          # encode_with_offsets' arrays (the one-record path)
                    spans = ArraySpans(*spans)
                cls, msg = classify_segments(text, starts, seg_cls, seg_msg, spans)
                if prefixes:
                    cls, msg = self._paper_boundary(bounds, spans, cls, msg, [encodings[j] for j in prefixes])
                ids.append(spans.ids.astype(np.int32, copy=False))
                classes.append(cls.astype(np.uint8, copy=False))
                msgs.append(msg)
            return np.concatenate(ids), np.concatenate(classes), np.concatenate(msgs)
        return requests, lengths_only, finish, prefix_of

    @staticmethod
    def _paper_boundary(bounds: list, spans: Spans, cls: np.ndarray, msg: np.ndarray, n_prompts: list):
        """The paper's rule at each boundary-marked text (plain's joining space before an answer): the tokens
        of the answer's turn at index ≥ len(tokenize(everything before the boundary)) are response-side,
        those before it prompt-side — whatever characters they cover. ``n_prompts``: those lengths, one per
        boundary of ``bounds`` (``_boundaries(run)``). The turn's tokens: those that begin before its end —
        the first ``first_from(turn_end)`` where begins never decrease."""
        cls, msg = cls.copy(), msg.copy()
        for (turn, first, _, turn_end), n_prompt in zip(bounds, n_prompts):
            if spans.monotone:                     # the turn's tokens after the prompt's: a range (views)
                stop = spans.first_from(turn_end)
                c, m = cls[n_prompt:stop], msg[n_prompt:stop]
                flip = ~_IS_RESPONSE_SIDE[c]
                c[flip], m[flip] = first, turn
            else:
                after = np.nonzero(spans.arrays()[0] < turn_end)[0]
                after = after[after >= n_prompt]
                flip = after[~_IS_RESPONSE_SIDE[cls[after]]]
                cls[flip], msg[flip] = first, turn
            c, m = cls[:n_prompt], msg[:n_prompt]
            c[(m == turn) & _IS_RESPONSE_SIDE[c]] = TokenClass.PROMPT
        return cls, msg


def _one(value: int, dtype) -> np.ndarray:
    """A read-only one-element array, shared (documents concatenate them, never write into them)."""
    key = (value, dtype)
    a = _ONE.get(key)
    if a is None:
        a = _ONE[key] = np.array([value], dtype=dtype)
        a.flags.writeable = False
    return a


_ONE: dict = {}


def _segments(run: list):
    """(the first character of each segment, its class uint8[k], its message int64[k]): a run's texts, those
    next to each other with one class and message merged (classify_segments' input; texts are never empty)."""
    starts, cls, msg = [], [], []
    pos = 0
    for t in run:
        if not cls or t.cls != cls[-1] or t.msg != msg[-1]:
            starts.append(pos)
            cls.append(t.cls)
            msg.append(t.msg)
        pos += len(t.text)
    return starts, np.array(cls, dtype=np.uint8), np.array(msg, dtype=np.int64)


def _boundaries(run: list) -> list:
    """(turn, its first response-side class, the boundary's character offset in the run's text, the turn's end
    offset) for each boundary-marked text of a run whose turn has a response-side text; an answer demoted to
    prompt-side (--last-turn-only) has no boundary. Computed once per run (the plan keeps it for the assembly)."""
    if not any(t.boundary for t in run):
        return []
    offsets = list(itertools.accumulate((len(t.text) for t in run), initial=0))
    out = []
    for k, t in enumerate(run):
        if not t.boundary:
            continue
        turn = t.msg
        first = next((u.cls for u in run[k:] if u.msg == turn and u.cls in RESPONSE_SIDE), None)
        if first is None:
            continue
        turn_end = offsets[max(j for j, u in enumerate(run) if u.msg == turn) + 1]
        out.append((turn, first, offsets[k], turn_end))
    return out
