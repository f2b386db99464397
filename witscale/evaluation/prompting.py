"""Prompts as the model saw them in training: the packer's templates, cut where the response begins.

``PromptFormatter(template, tokenizer)`` renders a conversation that ends with a user turn through
witscale/data/render.py's ``Renderer`` — the very code that packed the training data — with a placeholder
assistant turn appended, and keeps the tokens before the response: the generation prefix. Where the
response begins is the renderer's own class boundary (the last run of response-side tokens), so every
template and the paper's boundary rule for ``plain`` come for free:

* ``plain`` (the paper's): BOS and the prompt, tokenized alone — the paper's code computes the prompt
  length the same way. The joining space belongs to the response: in training it is the "▁" of the
  response's first token ("▁The"), so the model generates it as it learnt it, and the decoded response
  starts after it.
* ``chatml``/``llama3``/``tulu``/``hf``: everything up to and including the assistant header.

The prefix is rendered twice with different placeholders and must not depend on them (a template whose
prompt tokens merge with the response's would be refused here, not silently mis-cut). The stop tokens are
the end-of-turn tokens of the rendered answer (EOS for ``plain``, ``<|im_end|>`` for ``chatml`` …) and the
tokenizer's EOS.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from witscale.data.classes import RESPONSE_SIDE, TokenClass
from witscale.data.readers import Conversation, Message
from witscale.data.render import Renderer
from witscale.data.tokenizer import Tokenizer

_RESPONSE_SIDE = np.array(sorted(int(c) for c in RESPONSE_SIDE))
_PLACEHOLDERS = ("Sure", "42")


class PromptFormatter:
    def __init__(self, template: str, tokenizer: Tokenizer, system: Optional[str] = None):
        self.template = template
        self.tokenizer = tokenizer
        self.system = system
        self.renderer = Renderer(template, tokenizer)
        ids, classes, start = self._render([("user", "Hello")], _PLACEHOLDERS[0])
        answer = slice(start, None)
        stops = {int(i) for i, c in zip(ids[answer], classes[answer]) if c == TokenClass.EOT}
        if tokenizer.eos_id is not None:
            stops.add(int(tokenizer.eos_id))
        if not stops:
            raise ValueError(f"template {template!r} with this tokenizer has no end-of-turn token to stop at")
        self.stop_ids = sorted(stops)

    def _render(self, turns: Sequence[tuple[str, str]], placeholder: str):
        msgs = ([Message("system", self.system)] if self.system else []) + \
               [Message(role, text) for role, text in turns] + [Message("assistant", placeholder)]
        doc = self.renderer(Conversation(msgs))
        side = np.isin(doc.classes, _RESPONSE_SIDE)
        last = int(np.nonzero(side)[0][-1])
        start = last
        while start > 0 and side[start - 1]:
            start -= 1
        return doc.ids, doc.classes, start

    def prefix(self, turns: Sequence[tuple[str, str]] | str) -> list[int]:
        """Token ids the model continues with its response. ``turns``: the prompt (a string) or the
        conversation so far as (role, text) pairs ending with a user turn."""
        if isinstance(turns, str):
            turns = [("user", turns)]
        if not turns or turns[-1][0] != "user":
            raise ValueError("a prompt must end with a user turn")
        cuts = []
        for placeholder in _PLACEHOLDERS:
            ids, _, start = self._render(turns, placeholder)
            cuts.append(ids[:start].tolist())
        if cuts[0] != cuts[1]:
            raise ValueError(f"template {self.template!r}: the prompt's tokens depend on the response that follows "
                             f"(its last prompt token merges with the response); cannot cut a generation prefix")
        return cuts[0]


def decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """Text of token ids (specials spelled out), with the joining whitespace at the start removed."""
    return tokenizer.decode([int(i) for i in ids]).lstrip()


def strip_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """A response without its final stop token (if it ended with one)."""
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] in set(stop_ids) else ids
