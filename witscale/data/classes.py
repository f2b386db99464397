"""Token classes: one small integer per token, stored in the packed data (uint8).

The packed dataset never stores loss weights for the classes; the trainer looks each class up in a
weight table at train time, so one packed dataset serves a whole (λp, λr) grid.
"""
from __future__ import annotations

import enum


class TokenClass(enum.IntEnum):
    PAD = 0        # padding after the last document of a row; never predicted, weight always 0
    TEMPLATE = 1   # BOS, role headers, separators and other template/special tokens
    SYSTEM = 2     # system prompt content
    PROMPT = 3     # user turns (the instruction / input)
    RESPONSE = 4   # assistant content
    EOT = 5        # end-of-turn markers and EOS closing an assistant turn


NUM_CLASSES = len(TokenClass)
CLASS_NAMES = [c.name.lower() for c in TokenClass]

# The paper's mapping (Chatterjee et al. 2025): everything in the prompt string gets λp, the response and
# the EOS appended to it get λr. PAD is never weighted.
PROMPT_SIDE = (TokenClass.TEMPLATE, TokenClass.SYSTEM, TokenClass.PROMPT)
RESPONSE_SIDE = (TokenClass.RESPONSE, TokenClass.EOT)


def class_from_name(name: str) -> TokenClass:
    try:
        return TokenClass[name.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown token class {name!r}; known classes: {', '.join(CLASS_NAMES)}") from None
